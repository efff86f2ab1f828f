// The shapes a model runs (what `nibble tune` tunes) and the roofline (`nibble plan --device-profile`), on
// an 8B-shaped Llama config built in the test (no weights needed: both read the config alone).
#include <gtest/gtest.h>

#include <map>
#include <set>

#include "tune/tune_cache.h"

#include "tune/model_shapes.h"
#include "tune/roofline.h"

namespace nibble::tune {
namespace {

// Llama 3.1 8B's config.json dimensions.
ModelConfig llama8b(DType dtype, bool tied) {
    ModelConfig c;
    c.arch = Arch::Llama;
    c.arch_name = "LlamaForCausalLM";
    c.n_embd = 4096, c.n_layers = 32, c.n_heads = 32, c.n_kv_heads = 8, c.head_dim = 128, c.n_ff = 14336;
    c.vocab_size = 128256, c.max_position_embeddings = 131072;
    c.dtype = dtype;
    c.tied_embeddings = tied;
    return c;
}

QuantConfig nvfp4() {
    QuantConfig q;
    q.method = QuantMethod::ModelOptNvfp4;
    q.group_size = 16;
    q.exclude_patterns = {"lm_head"};  // ModelOpt's usual export keeps lm_head in BF16
    return q;
}

TEST(ModelShapes, Llama8bNvfp4) {
    const ModelShapes ms = model_op_shapes(llama8b(DType::BF16, false), nvfp4(), {});
    std::map<OpKind, int> per_op;
    std::set<std::pair<int64_t, int64_t>> nvfp4_nk, bf16_nk;
    for (const OpShape& s : ms.shapes) {
        ++per_op[s.op];
        if (s.op == OpKind::GemvNvfp4) nvfp4_nk.insert({s.n, s.k});
        if (s.op == OpKind::GemvBf16) bf16_nk.insert({s.n, s.k});
    }
    // q/o 4096x4096, k/v 1024x4096, gate/up 14336x4096, down 4096x14336; lm_head excluded: BF16.
    EXPECT_EQ(nvfp4_nk, (std::set<std::pair<int64_t, int64_t>>{{4096, 4096}, {1024, 4096}, {14336, 4096}, {4096, 14336}}));
    EXPECT_EQ(bf16_nk, (std::set<std::pair<int64_t, int64_t>>{{128256, 4096}}));
    EXPECT_EQ(per_op[OpKind::GemvNvfp4], 4 * 5);  // m tiles 1, 2, 4, 8, 16
    EXPECT_EQ(per_op[OpKind::GemvBf16], 5);
    EXPECT_EQ(per_op[OpKind::AttentionDecode], 3 * 2);  // 512 / 4096 / 32768 x 1 / 16 sequences
    EXPECT_EQ(per_op[OpKind::AttentionPrefill], 1);
    for (const OpShape& s : ms.shapes)
        if (s.op == OpKind::AttentionDecode || s.op == OpKind::AttentionPrefill) {
            EXPECT_EQ(s.head_dim, 128);
            EXPECT_EQ(s.group, 4);
            EXPECT_EQ(s.kv_dtype, KvDtype::Bf16);
        }
    EXPECT_TRUE(ms.skipped.empty());
}

TEST(ModelShapes, FlagsShapeTheSet) {
    ShapeOptions o;
    o.max_num_seqs = 3;            // tiles 1, 2, 4 only
    o.max_model_len = 2048;        // context 512 only
    o.kv_dtype = KvDtype::Nvfp4;
    o.max_num_batched_tokens = 256;
    const ModelShapes ms = model_op_shapes(llama8b(DType::BF16, true), QuantConfig{}, o);
    std::set<int64_t> tiles, lens;
    int64_t prefill_q = 0;
    bool tied_lm_head = false;
    for (const OpShape& s : ms.shapes) {
        if (s.op == OpKind::GemvBf16) tiles.insert(s.m);
        if (s.op == OpKind::GemvBf16 && s.n == 128256) tied_lm_head = true;
        if (s.op == OpKind::AttentionDecode) {
            lens.insert(s.kv_len);
            EXPECT_EQ(s.kv_dtype, KvDtype::Nvfp4);
            EXPECT_EQ(s.n_seqs, 1);  // fewer than 16 sequences run at once
        }
        if (s.op == OpKind::AttentionPrefill) prefill_q = s.q_len;
    }
    EXPECT_EQ(tiles, (std::set<int64_t>{1, 2, 4}));
    EXPECT_EQ(lens, (std::set<int64_t>{512}));
    EXPECT_EQ(prefill_q, 256);
    EXPECT_TRUE(tied_lm_head);  // the tied embedding is the lm_head GEMV
}

TEST(ModelShapes, Fp8AndF32AreReportedNotTuned) {
    QuantConfig fp8;
    fp8.method = QuantMethod::ModelOptFp8;
    const ModelShapes ms = model_op_shapes(llama8b(DType::BF16, false), fp8, {});
    ASSERT_FALSE(ms.skipped.empty());
    EXPECT_NE(ms.skipped[0].find("no tunable CUDA kernel"), std::string::npos) << ms.skipped[0];
    const ModelShapes f32 = model_op_shapes(llama8b(DType::F32, false), QuantConfig{}, {});
    ASSERT_FALSE(f32.skipped.empty());
    for (const OpShape& s : f32.shapes) EXPECT_NE(s.op, OpKind::GemvBf16);
}

TEST(Roofline, Llama8bNvfp4OnGb10) {
    const DeviceProfile gb10 = builtin_profile("gb10");
    const ModelConfig c = llama8b(DType::BF16, false);
    RooflineOptions o;
    o.context_depth = 4096;
    o.kv_bytes_per_token = 2 * 32 * 8 * 128 * 2;  // BF16 K and V, 32 layers, 8 KV heads of 128
    o.prefill_tokens = 2048;
    const Roofline r = compute_roofline(c, nvfp4(), gb10, o);
    std::map<std::string, int64_t> by;
    int64_t total = 0;
    for (const ByteShare& s : r.decode_bytes) by[s.what] = s.bytes, total += s.bytes;
    EXPECT_EQ(total, r.decode_bytes_total);
    // Priced as the memory plan prices them: NVFP4 n k / 2 + n k / 16 + 8 bytes of scales per linear.
    auto nv = [](int64_t n, int64_t k) { return n * k / 2 + n * k / 16 + 8; };
    EXPECT_EQ(by["attention projections"], 32 * (2 * nv(4096, 4096) + 2 * nv(1024, 4096)));
    EXPECT_EQ(by["MLP"], 32 * (2 * nv(14336, 4096) + nv(4096, 14336)));
    EXPECT_EQ(by["lm_head"], 128256LL * 4096 * 2);  // BF16 (excluded from quantization)
    EXPECT_EQ(by["embedding (one row gathered)"], 4096 * 2);
    EXPECT_EQ(by["KV cache at 4096 tokens"], o.kv_bytes_per_token * 4096);
    EXPECT_EQ(by["norms and other"], (2 * 32 + 1) * 4096 * 2);
    EXPECT_DOUBLE_EQ(r.decode_tokens_per_s, 273e9 / static_cast<double>(total));
    // The BF16 lm_head is a large share of an NVFP4 model's bytes (the point): about a fifth here.
    EXPECT_GT(static_cast<double>(by["lm_head"]) / static_cast<double>(total), 0.15);
    // Prefill: 2 n k per quantized linear at the FP4 rate; attention at the BF16 rate; lm_head left out.
    const double linear_flops = 2.0 * 32 * (2 * 4096.0 * 4096 + 2 * 1024.0 * 4096 + 3 * 14336.0 * 4096);
    EXPECT_DOUBLE_EQ(r.prefill_fp4_flops, linear_flops);
    EXPECT_DOUBLE_EQ(r.prefill_bf16_flops, 4.0 * 32 * 32 * 128 * 1024);
    EXPECT_DOUBLE_EQ(r.prefill_tokens_per_s, 1.0 / (linear_flops / gb10.fp4_flops + r.prefill_bf16_flops / gb10.bf16_flops));
    EXPECT_FALSE(r.fp4_on_bf16);
}

TEST(Roofline, HopperRunsNvfp4AtTheBf16RateAndTiedHeadsReadTheEmbedding) {
    const Roofline r = compute_roofline(llama8b(DType::BF16, true), nvfp4(), builtin_profile("h100"), {});
    EXPECT_TRUE(r.fp4_on_bf16);
    const double h100_bf16 = builtin_profile("h100").bf16_flops;
    EXPECT_DOUBLE_EQ(r.prefill_tokens_per_s, 1.0 / ((r.prefill_fp4_flops + r.prefill_bf16_flops) / h100_bf16));
    int64_t lm_head = 0;
    for (const ByteShare& s : r.decode_bytes)
        if (s.what == "lm_head") lm_head = s.bytes;
    EXPECT_EQ(lm_head, 128256LL * 4096 * 2);
}

TEST(DeviceProfiles, BuiltinsAreComplete) {
    for (const DeviceProfile& d : builtin_profiles()) {
        SCOPED_TRACE(d.key);
        EXPECT_GT(d.sm_count, 0);
        EXPECT_GT(d.smem_per_block_optin, 48 * 1024);
        EXPECT_GE(d.smem_per_sm, d.smem_per_block_optin);
        EXPECT_GT(d.memory_bandwidth, 0);
        EXPECT_GT(d.memory_bytes, 0);
        EXPECT_GT(d.bf16_flops, 0);
        EXPECT_FALSE(d.source.empty());
        EXPECT_EQ(find_builtin_profile(d.key)->name, d.name);
    }
    const DeviceProfile gb10 = builtin_profile("gb10");
    EXPECT_EQ(gb10.cc(), 121);
    EXPECT_EQ(gb10.sm_count, 48);
    EXPECT_EQ(gb10.smem_per_block_optin, 101376);
    EXPECT_DOUBLE_EQ(gb10.memory_bandwidth, 273e9);
    EXPECT_TRUE(gb10.unified_memory);
    EXPECT_EQ(builtin_profile("DGX-Spark").key, "gb10");
    EXPECT_EQ(builtin_profile("rtx5090").cc(), 120);
    EXPECT_EQ(builtin_profile("b200").cc(), 100);
    EXPECT_EQ(builtin_profile("h200").cc(), 90);
    EXPECT_THROW(builtin_profile("a100"), std::exception);
}

TEST(DeviceProfiles, FromDeviceProperties) {
    cuda::DeviceInfo info;
    info.name = "NVIDIA H100 80GB HBM3";
    info.cc_major = 9, info.cc_minor = 0, info.sm_count = 132;
    info.smem_per_block_optin = 232448, info.smem_per_sm = 233472, info.smem_per_block = 49152;
    info.smem_reserved_per_block = 1024;
    info.regs_per_block = 65536, info.regs_per_sm = 65536;
    info.max_threads_per_block = 1024, info.max_threads_per_sm = 2048, info.max_blocks_per_sm = 32;
    info.total_memory = 85045395456;
    info.memory_bus_bits = 5120, info.memory_clock_khz = 2619000;
    info.driver_version = 13000, info.runtime_version = 13000;
    const DeviceProfile p = profile_from_device(info);
    EXPECT_EQ(p.key, "device");
    EXPECT_EQ(p.cc(), 90);
    EXPECT_EQ(p.smem_per_block_optin, 232448);
    EXPECT_NEAR(p.memory_bandwidth, 3.35e12, 0.01e12);  // 2 x 2.619 GHz x 640 bytes
    EXPECT_DOUBLE_EQ(p.bf16_flops, builtin_profile("h100").bf16_flops);
    EXPECT_EQ(cache_key_for(p).driver_version, 13000);
}

}  // namespace
}  // namespace nibble::tune
