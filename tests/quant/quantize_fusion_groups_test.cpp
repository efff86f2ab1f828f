// nibble quantize's default global scales: one per fusion group (a layer's q/k/v, an MLP's or an expert's
// gate/up) from the group's joint amax, written to every member, as ModelOpt's export and llm-compressor
// do (quantize.cpp says where). Checked against the same checkpoint quantized with one scale per tensor
// (--per-tensor-global-scales, which quantize_test.cpp and quantize_moe_test.cpp hold bit-identical to the
// torch recipe): the group's scale is its members' largest, every byte not touched by the change is equal,
// each member's weights dequantize within NVFP4's rounding bound of the source, and the CPU forward of the
// result is as close to the BF16 model's as the per-tensor one is.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "quant_test_util.h"
#include "base/thread_pool.h"
#include "checkpoint/safetensors.h"
#include "model/model.h"
#include "ops/attention/kv_cache.h"
#include "quant/quantize.h"
#include "tensor/convert.h"
#include "tensor/float_formats.h"
#include "tensor/nvfp4.h"

namespace nibble {
namespace {

namespace fs = std::filesystem;
using namespace quant_test;

fs::path source_of(const std::string& fixture_name) { return fixture(fixture_name) / "model"; }

void quantize(const std::string& fixture_name, const TempDir& out, QuantLayout layout, bool fusion_groups,
              const std::map<std::string, float>& input_amax = {}) {
    ThreadPool pool(2);
    QuantizeOptions opt{.src_dir = source_of(fixture_name).string(),
                        .dst_dir = out.path.string(),
                        .layout = layout,
                        .fusion_group_global_scales = fusion_groups,
                        .input_amax = input_amax,
                        .progress = false};
    quantize_checkpoint(opt, pool);
}

// The NVFP4 linears of a loaded model by name, and grouped by global_scale_group.
struct Linears {
    std::map<std::string, const LinearWeight*> by_name;
    std::map<std::string, std::vector<const LinearWeight*>> by_group;
};
Linears nvfp4_linears(const Model& model) {
    Linears out;
    for (const LinearWeight* w : model.linear_weights()) {
        if (w->format != WeightFormat::Nvfp4) continue;
        out.by_name[w->name] = w;
        out.by_group[global_scale_group(w->name)].push_back(w);
    }
    return out;
}

// Every dequantized weight of w within NVFP4's rounding bound of the source tensor's value. Per block of 16,
// with t = block_amax / (6 g) the exact block scale and s the stored E4M3 one: s is t rounded to E4M3
// (relative error <= 2^-4 for normals; at most 2^-9 away where t is subnormal or lifted to the 2^-9 floor),
// and with u = s * g each element is x / u rounded to the E2M1 grid {0, 0.5, 1, 1.5, 2, 3, 4, 6}, whose widest
// gap is 2 (4 to 6): |x - deq| <= u where |x| <= 6u, else |x| - 6u (clamped to 6). One float32 rounding in
// each of x / u and the dequantization adds at most a few ulps of |x|.
void expect_within_nvfp4_bound(const LinearWeight& w, const TensorInfo& src) {
    ASSERT_EQ(src.shape, (Shape{w.n_out, w.n_in})) << w.name;
    const int64_t k = w.n_in, blocks = k / kNvfp4BlockSize;
    std::vector<float> x(static_cast<size_t>(k)), deq(static_cast<size_t>(k));
    int64_t bad_scales = 0, bad_elements = 0;
    for (int64_t r = 0; r < w.n_out; ++r) {
        decode_to_float(src.data + r * k * static_cast<int64_t>(dtype_size(src.dtype)), src.dtype, k, x.data());
        w.dequantize_row(r, deq.data());
        for (int64_t b = 0; b < blocks; ++b) {
            const float* xb = x.data() + b * kNvfp4BlockSize;
            const float* db = deq.data() + b * kNvfp4BlockSize;
            float block_amax = 0.0f;
            for (int i = 0; i < kNvfp4BlockSize; ++i) block_amax = std::max(block_amax, std::fabs(xb[i]));
            const float s = e4m3_to_float(w.block_scales[r * blocks + b]);
            if (block_amax == 0.0f) {
                bad_scales += s != 1.0f;  // an all-zero block: scale 1.0, every element 0
                for (int i = 0; i < kNvfp4BlockSize; ++i) bad_elements += db[i] != 0.0f;
                continue;
            }
            const double t = static_cast<double>(block_amax) / (6.0 * w.scale);
            bad_scales += std::fabs(s - t) > std::max(t / 16.0, std::ldexp(1.0, -9)) * (1 + 1e-6);
            const double u = static_cast<double>(s) * w.scale;
            for (int i = 0; i < kNvfp4BlockSize; ++i) {
                const double ax = std::fabs(xb[i]);
                const double bound = (ax <= 6.0 * u ? u : ax - 6.0 * u) + 4e-7 * ax;
                bad_elements += std::fabs(static_cast<double>(xb[i]) - db[i]) > bound;
            }
        }
    }
    EXPECT_EQ(bad_scales, 0) << w.name << ": block scales not the E4M3 rounding of block_amax / (6 * " << w.scale
                             << ")";
    EXPECT_EQ(bad_elements, 0) << w.name << ": elements outside the NVFP4 rounding bound";
}

// A fixture quantized both ways (ModelOpt layout), loaded.
class FusionGroupScales : public ::testing::TestWithParam<const char*> {
protected:
    void SetUp() override {
        quantize(GetParam(), fused_dir_, QuantLayout::ModelOpt, true);
        quantize(GetParam(), own_dir_, QuantLayout::ModelOpt, false);
        fused_ = load_model(fused_dir_.path.string(), pool_);
        own_ = load_model(own_dir_.path.string(), pool_);
    }
    ThreadPool pool_{2};
    TempDir fused_dir_{"fused"}, own_dir_{"own"};
    std::unique_ptr<Model> fused_, own_;
};

// Groups of more than one projection each fixture has: per layer q/k/v and the dense MLP's gate/up; MoE
// layers have q/k/v, one gate/up per expert and the shared expert's.
int64_t expected_shared_groups(const std::string& name) {
    if (name == "qwen3_moe") return 2 + 1 + 8;      // layer 0 dense; layer 1: 8 experts
    if (name == "qwen2_moe") return 2 + 1 + 4 + 1;  // layer 0 dense; layer 1: 4 experts and a shared expert
    return 2 * 2;                                   // 2 dense layers
}

TEST_P(FusionGroupScales, GroupSharesItsMembersLargestScale) {
    const Linears fused = nvfp4_linears(*fused_), own = nvfp4_linears(*own_);
    ASSERT_EQ(fused.by_name.size(), own.by_name.size());
    Checkpoint fused_ck(fused_dir_.path.string()), own_ck(own_dir_.path.string());
    std::set<float> group_scales;
    int64_t shared_groups = 0, rescaled = 0;
    for (const auto& [group, members] : fused.by_group) {
        float largest_own = 0.0f;
        for (const LinearWeight* m : members) largest_own = std::max(largest_own, own.by_name.at(m->name)->scale);
        for (const LinearWeight* m : members) {
            EXPECT_EQ(m->scale, largest_own) << m->name << " in group " << group;
            // What the file stores is what the loader read: a 0-d F32 per member.
            EXPECT_EQ(read_scalar(fused_ck, m->name + ".weight_scale_2"), m->scale) << m->name;
            // A member that already had the group's scale is quantized exactly as before.
            const bool kept = own.by_name.at(m->name)->scale == largest_own;
            rescaled += !kept;
            if (!kept) continue;
            for (const char* suffix : {".weight", ".weight_scale"})
                EXPECT_TRUE(same_bytes(fused_ck.get(m->name + suffix), own_ck.get(m->name + suffix)))
                    << m->name << suffix;
        }
        if (members.size() > 1) {
            ++shared_groups;
            group_scales.insert(members[0]->scale);
        }
    }
    EXPECT_EQ(shared_groups, expected_shared_groups(GetParam()));
    // Different groups keep different scales (random weights: different amax), and the test is not vacuous:
    // every shared group has a member whose own amax was smaller.
    EXPECT_EQ(static_cast<int64_t>(group_scales.size()), shared_groups);
    EXPECT_GE(rescaled, shared_groups);
    // No calibration: every input scale is the default.
    for (const auto& [name, w] : fused.by_name)
        EXPECT_EQ(read_scalar(fused_ck, name + ".input_scale"), kDefaultInputScale) << name;
    // Everything else (o_proj, down_proj, norms, embeddings, routers) is byte for byte the per-tensor output.
    std::set<std::string> member_tensors;
    for (const auto& [group, members] : fused.by_group)
        if (members.size() > 1)
            for (const LinearWeight* m : members)
                for (const char* suffix : {".weight", ".weight_scale", ".weight_scale_2"})
                    member_tensors.insert(m->name + suffix);
    ASSERT_EQ(fused_ck.names(), own_ck.names());
    for (const std::string& name : fused_ck.names()) {
        if (member_tensors.count(name)) continue;
        EXPECT_TRUE(same_bytes(fused_ck.get(name), own_ck.get(name))) << name;
    }
}

TEST_P(FusionGroupScales, DequantizedWeightsWithinNvfp4BoundOfSource) {
    Checkpoint src(source_of(GetParam()).string());
    int64_t checked = 0;
    for (const auto& [name, w] : nvfp4_linears(*fused_).by_name) {
        expect_within_nvfp4_bound(*w, src.get(name + ".weight"));
        ++checked;
    }
    EXPECT_GT(checked, 0);
}

// logits [n, vocab] of one prefill over tokens, every position, F32 cache.
std::vector<float> cpu_logits(Model& model, const std::vector<int32_t>& tokens) {
    const int64_t block_size = 16, n = static_cast<int64_t>(tokens.size());
    const int64_t n_blocks = (n + block_size - 1) / block_size;
    KvCache cache(model.kv_cache_shape(n_blocks, block_size, KvDtype::F32));
    std::vector<int32_t> table(static_cast<size_t>(n_blocks));
    for (int64_t b = 0; b < n_blocks; ++b) table[static_cast<size_t>(b)] = static_cast<int32_t>(b);
    ForwardSequence seq{.tokens = tokens, .kv = {.block_table = table.data(), .n_table = n_blocks}, .all_logits = true};
    std::vector<float> logits;
    model.forward(std::span(&seq, 1), cache, logits);
    return logits;
}

double rms_difference(const std::vector<float>& a, const std::vector<float>& b) {
    EXPECT_EQ(a.size(), b.size());
    double s = 0.0;
    for (size_t i = 0; i < a.size(); ++i) s += (static_cast<double>(a[i]) - b[i]) * (static_cast<double>(a[i]) - b[i]);
    return std::sqrt(s / static_cast<double>(a.size()));
}

// The CPU forward of the shared-scale export: as close to the BF16 model's logits as the per-tensor export's.
// Both round every weight to NVFP4 with a relative RMS error of ~0.1, and a member under its group's larger
// global scale keeps E4M3 block scales of the same relative precision, so its error stays the same: the
// logits' distance to BF16 may differ by the luck of the roundings, not in size (1.5x allows that; measured
// 0.9-1.1x).
TEST_P(FusionGroupScales, CpuForwardAsCloseToBf16AsPerTensor) {
    ThreadPool pool(2);
    std::unique_ptr<Model> bf16 = load_model(source_of(GetParam()).string(), pool);
    std::vector<int32_t> tokens;
    for (int32_t i = 0; i < 24; ++i) tokens.push_back((i * 37 + 5) % static_cast<int32_t>(bf16->config().vocab_size));
    const std::vector<float> ref = cpu_logits(*bf16, tokens);
    const double fused_err = rms_difference(cpu_logits(*fused_, tokens), ref);
    const double own_err = rms_difference(cpu_logits(*own_, tokens), ref);
    EXPECT_GT(own_err, 0.0);
    EXPECT_LE(fused_err, 1.5 * own_err) << "per-tensor " << own_err;
    EXPECT_GE(fused_err, own_err / 1.5) << "per-tensor " << own_err;
}

INSTANTIATE_TEST_SUITE_P(Fixtures, FusionGroupScales,
                         ::testing::Values("llama_gqa", "qwen3_qknorm", "qwen3_moe", "qwen2_moe"),
                         [](const auto& info) { return std::string(info.param); });

// The compressed-tensors layout stores the reciprocal, 2688 / amax: the group's smallest, as llm-compressor's
// update_fused_layer_weight_global_scales leaves it.
TEST(FusionGroupScalesCompressedTensors, GroupSharesItsMembersSmallestReciprocal) {
    TempDir fused_dir("ct-fused"), own_dir("ct-own");
    quantize("llama_gqa", fused_dir, QuantLayout::CompressedTensors, true);
    quantize("llama_gqa", own_dir, QuantLayout::CompressedTensors, false);
    Checkpoint fused(fused_dir.path.string()), own(own_dir.path.string());
    const std::vector<std::vector<std::string>> groups = {{"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"},
                                                          {"mlp.gate_proj", "mlp.up_proj"}};
    std::set<float> seen;
    for (int layer = 0; layer < 2; ++layer)
        for (const auto& group : groups) {
            const std::string p = "model.layers." + std::to_string(layer) + ".";
            float smallest = INFINITY;
            for (const auto& m : group) smallest = std::min(smallest, read_scalar(own, p + m + ".weight_global_scale"));
            for (const auto& m : group) {
                EXPECT_EQ(read_scalar(fused, p + m + ".weight_global_scale"), smallest) << p + m;
                EXPECT_EQ(fused.get(p + m + ".weight_global_scale").shape, (Shape{1})) << p + m;
            }
            seen.insert(smallest);
        }
    EXPECT_EQ(seen.size(), 4u);
    ThreadPool pool(2);
    std::unique_ptr<Model> model = load_model(fused_dir.path.string(), pool);
    Checkpoint src(source_of("llama_gqa").string());
    for (const auto& [name, w] : nvfp4_linears(*model).by_name) expect_within_nvfp4_bound(*w, src.get(name + ".weight"));
}

// Calibrated input scales: a group's members share the largest (ModelOpt's preprocess_linear_fusion). q, k and
// v read one input, so calibration measures one amax for all three; two different ones here show the rule.
TEST(FusionGroupScalesInput, MembersShareTheLargestInputScale) {
    TempDir out("input");
    quantize("llama_gqa", out, QuantLayout::ModelOpt, true,
             {{"model.layers.0.self_attn.q_proj", 13.44f},
              {"model.layers.0.self_attn.k_proj", 26.88f},
              {"model.layers.0.mlp.up_proj", 5.376f},
              {"model.layers.0.mlp.down_proj", 2.688f}});
    Checkpoint c(out.path.string());
    for (const char* m : {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"})
        EXPECT_FLOAT_EQ(read_scalar(c, std::string("model.layers.0.") + m + ".input_scale"), 0.01f) << m;
    for (const char* m : {"mlp.gate_proj", "mlp.up_proj"})
        EXPECT_FLOAT_EQ(read_scalar(c, std::string("model.layers.0.") + m + ".input_scale"), 0.002f) << m;
    EXPECT_FLOAT_EQ(read_scalar(c, "model.layers.0.mlp.down_proj.input_scale"), 0.001f);
    EXPECT_EQ(read_scalar(c, "model.layers.0.self_attn.o_proj.input_scale"), kDefaultInputScale);
    EXPECT_EQ(read_scalar(c, "model.layers.1.self_attn.q_proj.input_scale"), kDefaultInputScale);
}

TEST(FusionGroupScalesNames, GroupsAreQkvAndGateUpOfOneParent) {
    const std::string l0 = "model.layers.0.";
    EXPECT_EQ(global_scale_group(l0 + "self_attn.q_proj"), global_scale_group(l0 + "self_attn.k_proj"));
    EXPECT_EQ(global_scale_group(l0 + "self_attn.q_proj"), global_scale_group(l0 + "self_attn.v_proj"));
    EXPECT_EQ(global_scale_group(l0 + "mlp.gate_proj"), global_scale_group(l0 + "mlp.up_proj"));
    EXPECT_EQ(global_scale_group(l0 + "mlp.experts.3.gate_proj"), global_scale_group(l0 + "mlp.experts.3.up_proj"));
    EXPECT_NE(global_scale_group(l0 + "mlp.experts.3.up_proj"), global_scale_group(l0 + "mlp.experts.4.up_proj"));
    EXPECT_NE(global_scale_group(l0 + "mlp.shared_expert.up_proj"), global_scale_group(l0 + "mlp.up_proj"));
    EXPECT_NE(global_scale_group(l0 + "self_attn.q_proj"), global_scale_group("model.layers.1.self_attn.q_proj"));
    EXPECT_NE(global_scale_group(l0 + "self_attn.q_proj"), global_scale_group(l0 + "mlp.gate_proj"));
    for (const std::string& own : {l0 + "self_attn.o_proj", l0 + "mlp.down_proj", std::string("lm_head"),
                                  std::string("backbone.layers.0.mixer.in_proj")})
        EXPECT_EQ(global_scale_group(own), own);
}

// NemotronH: relu2 MLPs and experts have no gate, so their up_proj keeps its own scale; with the attention
// layers quantized too, their q/k/v share one.
TEST(FusionGroupScalesNemotron, UpWithoutGateKeepsItsOwnScaleAttentionShares) {
    TempDir fused_dir("nh-fused"), own_dir("nh-own");
    ThreadPool pool(2);
    for (const auto& [dir, fusion] : {std::pair{&fused_dir, true}, std::pair{&own_dir, false}}) {
        QuantizeOptions opt{.src_dir = source_of("nemotron_h").string(),
                            .dst_dir = dir->path.string(),
                            .architecture_exclusions = false,
                            .fusion_group_global_scales = fusion,
                            .progress = false};
        quantize_checkpoint(opt, pool);
    }
    Checkpoint fused(fused_dir.path.string()), own(own_dir.path.string());
    const std::string attn = "backbone.layers.3.mixer.";
    float largest = 0.0f;
    for (const char* m : {"q_proj", "k_proj", "v_proj"})
        largest = std::max(largest, read_scalar(own, attn + m + ".weight_scale_2"));
    for (const char* m : {"q_proj", "k_proj", "v_proj"})
        EXPECT_EQ(read_scalar(fused, attn + m + ".weight_scale_2"), largest) << m;
    ASSERT_EQ(fused.names(), own.names());
    int64_t checked = 0;
    for (const std::string& name : fused.names()) {
        if (name.starts_with(attn) && !name.starts_with(attn + "o_proj")) continue;
        EXPECT_TRUE(same_bytes(fused.get(name), own.get(name))) << name;
        checked += name.ends_with("up_proj.weight_scale_2");
    }
    EXPECT_EQ(checked, 1 + 4 + 1);  // layer 1's MLP, layer 4's 4 experts and shared expert
}

}  // namespace
}  // namespace nibble
