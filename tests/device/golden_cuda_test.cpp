// The CUDA runner (gpu/cuda_model_runner.h) on the golden fixtures (tests/golden/README.md: tiny Hugging Face
// checkpoints, hidden 64, head_dim 16 or 32, with transformers' float32 logits of a fixed token sequence in
// expected.safetensors), with F32 activations, in two ways:
//   prefill: one step whose batch holds n sequences, sequence i the first i + 1 tokens (its own blocks and
//            state slot), so logits row i is position i after a prefill of the whole prefix in one step
//            (the longest sequence is the whole prompt);
//   decode:  one sequence fed one token a step through the paged KV cache (blocks of 16, crossed twice),
//            decode steps replayed from CUDA graphs.
// The CPU reference (CpuModelRunner over the same checkpoint, the same KV cache dtype, the same batches) runs
// beside it. Checks, per fixture and way:
//   (a) BF16 KV cache: the CUDA logits within tol_hf of transformers'. The CPU reference matches
//       transformers within tol = max(8 fp64_gap, 1e-5 max(1, max|logit|)) with an exact cache
//       (golden_test.cpp derives it); a BF16 cache moves the logits by up to gain u max(1, max|logit|) with
//       u = 2^-8, measured gain <= 1.75 on these fixtures, 5 allowed (golden_test.cpp's GoldenKvDtype);
//       tol_hf = tol + 5 u max(1, max|logit|). The CUDA backend reads dense weights as BF16 (an F16/F32
//       checkpoint is rounded on upload: mistral, llama_attn_bias), a second perturbation of the same
//       relative size: another 5 u max(1, max|logit|) for those. MoE fixtures are held to finite logits only
//       here: top-k routing is discontinuous, and the BF16 cache's perturbation switches experts for some
//       tokens against the exact-cache reference (golden_test.cpp measured jumps of 0.14..0.19).
//   (b) against the CPU reference with the same cache dtype: |cuda - cpu| <= rel max(1, rms(cpu row)) per
//       row, rel as decoder_forward_test.cpp derives it for F32 activations (float32 summation order, plus
//       the rare K/V element rounded to the other side of a format boundary): BF16 2e-3, FP8 3e-2, NVFP4 1e-1;
//       and the CUDA argmax equal to the CPU's at every position unless the CPU's own margin between the two
//       tokens is below that tolerance (a near-tie: counted and printed). Checkpoints with F16/F32 dense
//       weights run on the CPU from a copy with those weights rounded to BF16, as the CUDA backend holds them.
//       FP8/NVFP4 caches on MoE fixtures: finite logits only (a code step of the cache may switch an expert
//       on one side; the difference is printed).
// Fixtures the CUDA backend does not run (gpu::check_decoder_supported / check_hybrid_supported refuse
// them) are skipped with the reason, and GoldenCuda.FixturesOnCuda prints every fixture's status and
// expects the set that runs to be kOnCuda, so a fixture dropping off (or newly running) is seen.
// The fixtures are found at $NIBBLE_GOLDEN_FIXTURES, else tests/golden/fixtures under the working directory
// or its parent (run the binary from the repository root or a build folder in it).
#include <gtest/gtest.h>

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <filesystem>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "base/thread_pool.h"
#include "checkpoint/safetensors.h"
#include "../golden/golden_reference.h"
#include "device_test_util.h"
#include "engine/model_runner.h"
#include "gpu/cuda_model_runner.h"
#include "gpu/device_decoder.h"
#include "gpu/device_hybrid.h"
#include "gpu/weight_upload.h"
#include "model/model.h"
#include "tensor/convert.h"
#include "tensor/float_formats.h"

namespace nibble {
namespace {

namespace fs = std::filesystem;

using golden::kCases;
// The fixtures the CUDA backend runs: all of them. nemotron_h and nemotron_h_nvfp4_modelopt (shared expert of
// width 48: k = 16 mod 32) run the plain kernels chosen for widths that are not multiples of 32 (gemv_nvfp4's
// 16-element block kernel, the MoE's plain GEMV, which also runs nemotron_h's BF16 routed experts). qwen3_moe's
// BF16 experts and qwen2_moe's (4 experts, with the sigmoid-gated shared expert) run the MoE's plain GEMV here
// (F32 activations: the exactness mode never takes the grouped GEMM).
const std::vector<std::string> kOnCuda = {
    "llama_gqa",      "llama3_rope_tied",     "llama_attn_bias", "mistral",
    "qwen2_bias",     "qwen3_qknorm",         "qwen3_nvfp4_modelopt", "llama_nvfp4_ct",
    "llama_fp8_modelopt", "qwen3_moe_nvfp4_modelopt", "nemotron_h", "nemotron_h_nvfp4_modelopt",
    "qwen3_moe",      "qwen2_moe",
};

constexpr int64_t kBlockSize = 16;
constexpr int64_t kBlocksPerSeq = 3;  // 48 positions: every fixture's sequence (<= 40 tokens)
constexpr int64_t kMaxSeqs = 48;      // the prefill batch: one sequence per position

fs::path fixtures_dir() {
    if (const char* env = std::getenv("NIBBLE_GOLDEN_FIXTURES")) return env;
    for (const fs::path& p : {fs::path("tests/golden/fixtures"), fs::path("../tests/golden/fixtures")})
        if (fs::is_directory(p)) return fs::absolute(p);
    return {};
}

using golden::load_reference;
using golden::Reference;

// Whether a checkpoint holds dense matrices in F16/F32 (2-D tensors: linear weights and embeddings; norms,
// biases and quantization scales are 1-D or scalars and stay as they are on the device too).
bool has_wide_matrices(const fs::path& model_dir) {
    SafetensorsFile f((model_dir / "model.safetensors").string());
    for (const TensorInfo& t : f.tensors())
        if ((t.dtype == DType::F32 || t.dtype == DType::F16) && t.shape.ndim == 2) return true;
    return false;
}

// A copy of the model folder with every F16/F32 matrix rounded to BF16: what the CUDA backend uploads.
fs::path bf16_matrices_copy(const fs::path& model_dir, const fs::path& dst) {
    fs::create_directories(dst);
    for (const auto& e : fs::directory_iterator(model_dir))
        if (e.is_regular_file() && e.path().filename() != "model.safetensors")
            fs::copy_file(e.path(), dst / e.path().filename(), fs::copy_options::overwrite_existing);
    SafetensorsFile src((model_dir / "model.safetensors").string());
    SafetensorsWriter w((dst / "model.safetensors").string());
    auto narrowed = [](const TensorInfo& t) {
        return (t.dtype == DType::F32 || t.dtype == DType::F16) && t.shape.ndim == 2;
    };
    for (const TensorInfo& t : src.tensors()) w.declare(t.name, narrowed(t) ? DType::BF16 : t.dtype, t.shape);
    for (const TensorInfo& t : src.tensors()) {
        if (!narrowed(t)) {
            w.write(t.name, t.data, t.nbytes);
            continue;
        }
        const int64_t n = t.shape.numel();
        std::vector<float> wide(static_cast<size_t>(n));
        decode_to_float(t.data, t.dtype, n, wide.data());
        std::vector<uint16_t> bits(static_cast<size_t>(n));
        for (int64_t i = 0; i < n; ++i) bits[static_cast<size_t>(i)] = bf16_from_float(wide[static_cast<size_t>(i)]);
        w.write(t.name, bits.data(), bits.size() * sizeof(uint16_t));
    }
    w.finish();
    return dst;
}

// The CUDA backend's weights of a model, or why it does not run it.
struct CudaWeights {
    std::shared_ptr<const gpu::DeviceDecoder> decoder;
    std::shared_ptr<const gpu::DeviceHybrid> hybrid;
    std::string unsupported;  // non-empty: the reason
};

CudaWeights cuda_weights(const Model& model, bool upload) {
    CudaWeights w;
    const ModelConfig& c = model.config();
    HybridView hv;
    DecoderView dv;
    try {
        if (model.hybrid_view(hv)) {
            gpu::check_hybrid_supported(c, hv);
            if (upload) w.hybrid = std::make_shared<gpu::DeviceHybrid>(gpu::upload_hybrid(c, hv));
        } else if (model.decoder_view(dv)) {
            gpu::check_decoder_supported(c, dv);
            if (upload) w.decoder = std::make_shared<gpu::DeviceDecoder>(gpu::upload_decoder(c, dv));
        } else {
            gpu::check_decoder_supported(c);  // names the architecture the CUDA backend lacks, if it does
            w.unsupported = c.arch_name + ": the model gives neither a decoder nor a hybrid view of its weights";
        }
    } catch (const std::exception& e) {
        if (w.decoder || w.hybrid) throw;  // only the checks decide support; an upload failure is a failure
        w.unsupported = e.what();
    }
    return w;
}

enum class Way { Prefill, Decode };

// The fixture's tokens through `runner` (the ways of the header); returns logits [n, vocab].
std::vector<float> run_tokens(ModelRunner& runner, const std::vector<int32_t>& tokens, Way way, int64_t vocab,
                              bool hybrid) {
    const int64_t n = static_cast<int64_t>(tokens.size());
    std::vector<float> all(static_cast<size_t>(n * vocab));
    auto table_of = [](int64_t s) {
        std::vector<int32_t> t;
        for (int64_t b = 0; b < kBlocksPerSeq; ++b) t.push_back(static_cast<int32_t>(s * kBlocksPerSeq + b));
        return t;
    };
    if (way == Way::Prefill) {
        std::vector<std::vector<int32_t>> tables;
        for (int64_t i = 0; i < n; ++i) tables.push_back(table_of(i));
        std::vector<RunnerSequence> batch;
        for (int64_t i = 0; i < n; ++i)
            batch.push_back({.tokens = std::span(tokens).first(static_cast<size_t>(i + 1)),
                             .block_table = tables[static_cast<size_t>(i)],
                             .start_pos = 0,
                             .needs_logits = true,
                             .state_slot = hybrid ? static_cast<int32_t>(i) : -1});
        runner.execute(batch, all);
        EXPECT_EQ(all.size(), static_cast<size_t>(n * vocab));
        all.resize(static_cast<size_t>(n * vocab));
        return all;
    }
    const std::vector<int32_t> table = table_of(0);
    std::vector<float> row;
    for (int64_t i = 0; i < n; ++i) {
        const RunnerSequence seq{.tokens = std::span(tokens).subspan(static_cast<size_t>(i), 1),
                                 .block_table = table,
                                 .start_pos = i,
                                 .needs_logits = true,
                                 .state_slot = hybrid ? 0 : -1};
        runner.execute(std::span(&seq, 1), row);
        EXPECT_EQ(row.size(), static_cast<size_t>(vocab));
        if (row.size() != static_cast<size_t>(vocab)) return all;
        std::copy(row.begin(), row.end(), all.begin() + i * vocab);
    }
    return all;
}

struct KvCase {
    KvDtype dtype;
    double rel;  // against the CPU with the same cache: decoder_forward_test.cpp's F32-activation values
};
const std::vector<KvCase> kKvCases = {{KvDtype::Bf16, 2e-3}, {KvDtype::Fp8, 3e-2}, {KvDtype::Nvfp4, 1e-1}};

std::string way_name(Way w) { return w == Way::Prefill ? "prefill" : "decode"; }

class GoldenCuda : public ::testing::TestWithParam<std::tuple<std::string, KvCase>> {
protected:
    void SetUp() override {
        if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
        root_ = fs::temp_directory_path() / ("nibble-golden-cuda-" + std::to_string(::getpid()));
    }
    void TearDown() override { fs::remove_all(root_); }
    fs::path root_;
};

TEST_P(GoldenCuda, MatchesCpuAndTransformers) {
    const auto& [name, kv] = GetParam();
    const fs::path fixtures = fixtures_dir();
    ASSERT_FALSE(fixtures.empty()) << "golden fixtures not found: run from the repository root or set "
                                      "NIBBLE_GOLDEN_FIXTURES";
    const fs::path dir = fixtures / name;
    const Reference ref = load_reference(dir);
    ASSERT_GT(ref.n, 0);
    ASSERT_LE(ref.n, kBlocksPerSeq * kBlockSize);
    ASSERT_LE(ref.n, kMaxSeqs);

    // Both runners read the weights the CUDA backend holds (F16/F32 matrices rounded to BF16).
    const bool rounded = has_wide_matrices(dir / "model");
    const fs::path model_dir = rounded ? bf16_matrices_copy(dir / "model", root_ / name) : dir / "model";
    ThreadPool pool(0);
    std::unique_ptr<Model> model = load_model(model_dir.string(), pool);
    const ModelConfig& c = model->config();
    const CudaWeights weights = cuda_weights(*model, true);
    if (!weights.unsupported.empty()) {
        std::printf("[ cpu only ] %s: %s\n", name.c_str(), weights.unsupported.c_str());
        GTEST_SKIP() << name << " does not run on the CUDA backend: " << weights.unsupported;
    }
    const bool hybrid = weights.hybrid != nullptr;
    const bool routed = c.moe.n_experts > 0;
    const int64_t vocab = c.vocab_size;
    ASSERT_EQ(vocab, ref.vocab);
    const int64_t n_blocks = kMaxSeqs * kBlocksPerSeq;
    const gpu::CudaRunnerOptions options{.kv_dtype = kv.dtype,
                                         .num_blocks = n_blocks,
                                         .block_size = kBlockSize,
                                         .max_model_len = kBlocksPerSeq * kBlockSize,
                                         .max_num_batched_tokens = kMaxSeqs * kBlocksPerSeq * kBlockSize,
                                         .max_num_seqs = kMaxSeqs,
                                         .act_dtype = DType::F32,
                                         .max_cudagraph_capture_size = 8,
                                         .num_state_slots = hybrid ? kMaxSeqs : 0};
    const double u_bf16 = 0x1p-8;
    const double tol_hf = ref.tol + (rounded ? 10.0 : 5.0) * u_bf16 * std::max(1.0, ref.max_abs);

    for (Way way : {Way::Prefill, Way::Decode}) {
        const std::string what = name + " / " + std::string(kv_dtype_name(kv.dtype)) + " kv / " + way_name(way);
        SCOPED_TRACE(what);
        CpuModelRunner cpu_runner(*model, n_blocks, kBlockSize, kv.dtype, hybrid ? kMaxSeqs : 0);
        std::unique_ptr<gpu::CudaModelRunner> gpu_runner =
            hybrid ? std::make_unique<gpu::CudaModelRunner>(weights.hybrid, options)
                   : std::make_unique<gpu::CudaModelRunner>(weights.decoder, options);
        const std::vector<float> cpu = run_tokens(cpu_runner, ref.tokens, way, vocab, hybrid);
        const std::vector<float> got = run_tokens(*gpu_runner, ref.tokens, way, vocab, hybrid);
        ASSERT_EQ(cpu.size(), ref.logits.size());
        ASSERT_EQ(got.size(), ref.logits.size());

        double worst_cpu = -1, worst_hf = 0, worst_cpu_tol = 0;
        int64_t worst_cpu_pos = 0, worst_hf_pos = 0;
        int near_ties = 0, bad_rows = 0;
        for (int64_t i = 0; i < ref.n; ++i) {
            const float* g = got.data() + i * vocab;
            const float* r = cpu.data() + i * vocab;
            const float* h = ref.logits.data() + i * vocab;
            double ms = 0, row_cpu = 0;
            for (int64_t j = 0; j < vocab; ++j) {
                ASSERT_TRUE(std::isfinite(g[j])) << "position " << i << " logit " << j << " is " << g[j];
                ms += static_cast<double>(r[j]) * r[j];
                row_cpu = std::max(row_cpu, std::fabs(static_cast<double>(g[j]) - r[j]));
                const double dh = std::fabs(static_cast<double>(g[j]) - h[j]);
                if (dh > worst_hf) worst_hf = dh, worst_hf_pos = i;
            }
            const double tol_cpu = kv.rel * std::max(1.0, std::sqrt(ms / static_cast<double>(vocab)));
            if (row_cpu > worst_cpu) worst_cpu = row_cpu, worst_cpu_pos = i, worst_cpu_tol = tol_cpu;
            if (routed && kv.dtype != KvDtype::Bf16) continue;  // finite only (header)
            if (row_cpu > tol_cpu) ++bad_rows;
            EXPECT_LE(row_cpu, tol_cpu) << "position " << i << ": CUDA vs CPU (same " << kv_dtype_name(kv.dtype)
                                        << " cache)";
            const int64_t ct = std::max_element(r, r + vocab) - r;
            const int64_t gt = std::max_element(g, g + vocab) - g;
            if (ct != gt) {
                EXPECT_LT(r[ct] - r[gt], tol_cpu) << "position " << i << ": greedy " << gt << " vs CPU " << ct
                                                  << " beyond a near-tie";
                ++near_ties;
            }
        }
        if (kv.dtype == KvDtype::Bf16 && !routed) {
            EXPECT_LE(worst_hf, tol_hf) << "CUDA vs transformers, worst at position " << worst_hf_pos;
        }
        std::printf("[  detail  ] %s: max|cuda - cpu| %.3g (position %lld, tol %.3g), max|cuda - transformers| "
                    "%.3g (tol %.3g%s), %d near-ties of the CPU's top 2, %d rows over%s\n",
                    what.c_str(), worst_cpu, static_cast<long long>(worst_cpu_pos), worst_cpu_tol, worst_hf, tol_hf,
                    kv.dtype == KvDtype::Bf16 && !routed ? "" : ", not asserted", near_ties, bad_rows,
                    routed && kv.dtype != KvDtype::Bf16 ? " (MoE with a quantized cache: finite only)" : "");
    }
}

INSTANTIATE_TEST_SUITE_P(Fixtures, GoldenCuda, ::testing::Combine(::testing::ValuesIn(kCases), ::testing::ValuesIn(kKvCases)),
                         [](const auto& info) {
                             return std::get<0>(info.param) + "_" +
                                    std::string(kv_dtype_name(std::get<1>(info.param).dtype));
                         });

// Every fixture's status on the CUDA backend, printed with the reason when it does not run there; the set that
// runs must be kOnCuda. Only the support checks run (no upload), so this needs no device.
TEST(GoldenCudaFixtures, FixturesOnCuda) {
    const fs::path fixtures = fixtures_dir();
    ASSERT_FALSE(fixtures.empty()) << "golden fixtures not found: run from the repository root or set "
                                      "NIBBLE_GOLDEN_FIXTURES";
    std::vector<std::string> on_cuda;
    for (const std::string& name : kCases) {
        ThreadPool pool(1);
        std::unique_ptr<Model> model = load_model((fixtures / name / "model").string(), pool);
        const CudaWeights w = cuda_weights(*model, false);
        if (w.unsupported.empty()) {
            on_cuda.push_back(name);
            std::printf("[ on cuda  ] %s\n", name.c_str());
        } else {
            std::printf("[ cpu only ] %s: %s\n", name.c_str(), w.unsupported.c_str());
        }
    }
    std::vector<std::string> want = kOnCuda;
    std::sort(want.begin(), want.end());
    std::sort(on_cuda.begin(), on_cuda.end());
    EXPECT_EQ(on_cuda, want) << "the fixtures the CUDA backend runs changed: update kOnCuda (and its comment)";
}

}  // namespace
}  // namespace nibble
