// The sharding arithmetic: which heads, intermediate columns and vocabulary rows each rank holds for a
// Llama-3.1-70B-shaped config at every tensor-parallel size, the refusals of sizes that do not divide, and
// shard_linear on every stored format (dense F32/BF16, FP8, NVFP4): each shard's dequantized rows are exactly
// the matching slice of the whole weight's, and the row-parallel partial products sum to the whole product.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "base/error.h"
#include "base/thread_pool.h"
#include "model/llama.h"
#include "parallel/tensor_parallel.h"
#include "tensor/float_formats.h"
#include "tensor/nvfp4.h"
#include "parallel_test_util.h"

namespace nibble {
namespace {

using test::decoder_config;
using test::error_of;

// Llama-3.1-70B's shape fields.
ModelConfig llama70b() {
    return decoder_config({.arch = Arch::Llama,
                           .arch_name = "LlamaForCausalLM",
                           .n_embd = 8192,
                           .n_layers = 80,
                           .n_heads = 64,
                           .n_kv_heads = 8,
                           .head_dim = 128,
                           .n_ff = 28672,
                           .vocab_size = 128256,
                           .max_position_embeddings = 131072,
                           .dtype = DType::BF16});
}

TEST(TensorParallelLayout, SplitsHeadsByKvGroupAndEverythingEvenly) {
    const ModelConfig c = llama70b();
    for (int64_t n : {1, 2, 4, 8}) {
        int64_t q_total = 0, kv_total = 0, ff_total = 0, vocab_total = 0;
        for (int64_t r = 0; r < n; ++r) {
            const TensorParallelLayout l = tensor_parallel_layout(c, n, r);
            EXPECT_EQ(l.q_heads, (IndexRange{r * 64 / n, (r + 1) * 64 / n}));
            EXPECT_EQ(l.kv_heads, (IndexRange{r * 8 / n, (r + 1) * 8 / n}));
            EXPECT_EQ(l.kv_replicas, 1);
            // Every query head of the rank reads one of the rank's KV heads (group of 8 query heads per KV head).
            for (int64_t h = l.q_heads.begin; h < l.q_heads.end; ++h) {
                EXPECT_GE(h / 8, l.kv_heads.begin);
                EXPECT_LT(h / 8, l.kv_heads.end);
            }
            q_total += l.q_heads.size();
            kv_total += l.kv_heads.size();
            ff_total += l.ff.size();
            vocab_total += l.vocab.size();
            EXPECT_EQ(l.vocab_per_rank, (128256 + n - 1) / n);
        }
        EXPECT_EQ(q_total, 64);
        EXPECT_EQ(kv_total, 8);
        EXPECT_EQ(ff_total, 28672);
        EXPECT_EQ(vocab_total, 128256);
    }
}

TEST(TensorParallelLayout, ReplicatesKvHeadsBeyondTheirCount) {
    ModelConfig c = llama70b();
    c.n_ff = 28672;
    for (int64_t r = 0; r < 16; ++r) {
        const TensorParallelLayout l = tensor_parallel_layout(c, 16, r);
        EXPECT_EQ(l.kv_replicas, 2);
        EXPECT_EQ(l.kv_heads, (IndexRange{r / 2, r / 2 + 1}));
        EXPECT_EQ(l.q_heads, (IndexRange{4 * r, 4 * r + 4}));
        EXPECT_EQ(l.q_heads.begin / 8, l.kv_heads.begin);  // its 4 query heads lie in the replicated head's group
    }
}

TEST(TensorParallelLayout, UnevenVocabularyPadsTheGatherSlot) {
    ModelConfig c = llama70b();
    c.vocab_size = 10;
    c.n_heads = 4;
    c.n_kv_heads = 4;
    c.n_ff = 16;
    const TensorParallelLayout last = tensor_parallel_layout(c, 4, 3);
    EXPECT_EQ(last.vocab_per_rank, 3);
    EXPECT_EQ(last.vocab, (IndexRange{9, 10}));
    c.vocab_size = 5;  // ceil(5/4) = 2 per rank leaves rank 3 nothing
    EXPECT_NE(error_of([&] { tensor_parallel_layout(c, 4, 0); }).find("vocab_size 5"), std::string::npos);
}

TEST(TensorParallelLayout, ImpossibleSizesNameWhatDoesNotDivide) {
    const ModelConfig c = llama70b();
    const std::string three = error_of([&] { check_tensor_parallel(c, 3); });
    EXPECT_NE(three.find("--tensor-parallel-size 3"), std::string::npos) << three;
    EXPECT_NE(three.find("num_attention_heads 64"), std::string::npos) << three;
    EXPECT_NE(three.find("num_key_value_heads 8"), std::string::npos) << three;
    EXPECT_NE(three.find("intermediate_size 28672"), std::string::npos) << three;
    const std::string big = error_of([&] { check_tensor_parallel(c, 128); });
    EXPECT_NE(big.find("num_attention_heads 64"), std::string::npos) << big;
    EXPECT_NE(error_of([&] { check_tensor_parallel(c, 0); }).find("at least 1"), std::string::npos);
    EXPECT_NE(error_of([&] { tensor_parallel_layout(c, 2, 2); }).find("rank 2"), std::string::npos);
    ModelConfig moe = c;  // Qwen2-MoE (a shared expert) has no split; Qwen3-MoE's is expert_parallel_test.cpp's
    moe.arch = Arch::Qwen2Moe;
    moe.arch_name = "Qwen2MoeForCausalLM";
    EXPECT_NE(error_of([&] { check_tensor_parallel(moe, 2); }).find("Qwen2MoeForCausalLM has no tensor-parallel split"),
              std::string::npos);
    EXPECT_NO_THROW(check_tensor_parallel(moe, 1));  // TP 1 is the unsharded model, any architecture
}

TEST(TensorParallelLayout, Nvfp4RowParallelSharesMustBeWholeBlocks) {
    ModelConfig c = llama70b();
    c.n_heads = 8;
    c.n_kv_heads = 8;
    c.head_dim = 8;  // o_proj has 64 inputs: 32 per rank at TP 2, 16 at TP 4, 8 at TP 8
    c.n_ff = 512;
    QuantConfig q;
    q.method = QuantMethod::ModelOptNvfp4;
    EXPECT_NO_THROW(check_tensor_parallel_quant(c, q, 4));
    const std::string e = error_of([&] { check_tensor_parallel_quant(c, q, 8); });
    EXPECT_NE(e.find("model.layers.0.self_attn.o_proj is NVFP4 [8192, 64]"), std::string::npos) << e;
    EXPECT_NE(e.find("16-value block"), std::string::npos) << e;
    q.method = QuantMethod::ModelOptFp8;  // FP8 and dense slice anywhere
    EXPECT_NO_THROW(check_tensor_parallel_quant(c, q, 8));
}

bool is_row_parallel(const std::string& module) {
    auto ends_with = [&](const std::string& tail) {
        return module.size() >= tail.size() && module.compare(module.size() - tail.size(), tail.size(), tail) == 0;
    };
    return ends_with("o_proj") || ends_with("down_proj");
}

TEST(TensorParallelLayout, RankWeightsAddUpToTheModel) {
    ModelConfig c = llama70b();
    c.n_layers = 2;
    c.o_bias = true;
    c.mlp_bias = true;
    const std::vector<WeightSpec> whole = llama_expected_weights(c);
    for (int64_t n : {2, 4, 8}) {
        std::vector<int64_t> sum(whole.size(), 0), bias(whole.size(), 0);
        for (int64_t r = 0; r < n; ++r) {
            const std::vector<WeightSpec> part = llama_rank_expected_weights(c, n, r);
            ASSERT_EQ(part.size(), whole.size());
            for (size_t i = 0; i < part.size(); ++i) {
                const WeightSpec& w = part[i];
                sum[i] += w.kind == WeightSpec::Kind::Dense ? w.shape.numel() : w.linear.n_out * w.linear.n_in;
                bias[i] += w.kind == WeightSpec::Kind::Linear && w.linear.bias ? 1 : 0;
                if (r > 0 && w.kind == WeightSpec::Kind::Linear && is_row_parallel(w.linear.module) && w.linear.bias)
                    ADD_FAILURE() << w.linear.module << ": a row-parallel bias off rank 0";
            }
        }
        for (size_t i = 0; i < whole.size(); ++i) {
            const WeightSpec& w = whole[i];
            if (w.kind == WeightSpec::Kind::Dense && w.shape.ndim == 1) {
                EXPECT_EQ(sum[i], n * w.shape.numel()) << w.name << ": norms are replicated";
            } else if (w.kind == WeightSpec::Kind::Dense) {
                EXPECT_EQ(sum[i], w.shape.numel()) << w.name;
            } else {
                EXPECT_EQ(sum[i], w.linear.n_out * w.linear.n_in) << w.linear.module;
                EXPECT_EQ(bias[i], !w.linear.bias ? 0 : is_row_parallel(w.linear.module) ? 1 : n) << w.linear.module;
            }
        }
    }
}

// A weight of each stored format with its own storage, from random values.
struct OwnedWeight {
    std::vector<uint8_t> data, scales;
    LinearWeight w;
};

OwnedWeight make_weight(WeightFormat format, DType dtype, int64_t n_out, int64_t n_in, std::mt19937& rng) {
    std::normal_distribution<float> dist(0.0f, 1.0f);
    std::vector<float> values(static_cast<size_t>(n_out * n_in));
    for (float& v : values) v = dist(rng);
    OwnedWeight o;
    o.w.name = "test.proj";
    o.w.format = format;
    o.w.dtype = dtype;
    o.w.n_out = n_out;
    o.w.n_in = n_in;
    switch (format) {
        case WeightFormat::Dense:
            o.data.resize(values.size() * dtype_size(dtype));
            if (dtype == DType::F32) {
                std::memcpy(o.data.data(), values.data(), o.data.size());
            } else {
                for (size_t i = 0; i < values.size(); ++i) {
                    const uint16_t b = bf16_from_float(values[i]);
                    std::memcpy(o.data.data() + 2 * i, &b, 2);
                }
            }
            break;
        case WeightFormat::Fp8:
            o.data.resize(values.size());
            for (size_t i = 0; i < values.size(); ++i) o.data[i] = e4m3_from_float(values[i] * 50.0f);
            o.w.scale = 0.02f;
            break;
        case WeightFormat::Nvfp4: {
            o.data.resize(values.size() / 2);
            o.scales.resize(values.size() / kNvfp4BlockSize);
            o.w.scale = nvfp4_global_scale(8.0f);
            for (int64_t r = 0; r < n_out; ++r)
                nvfp4_quantize_row(values.data() + r * n_in, n_in, o.w.scale, o.data.data() + r * n_in / 2,
                                   o.scales.data() + r * n_in / kNvfp4BlockSize);
            o.w.block_scales = o.scales.data();
            break;
        }
    }
    o.w.data = o.data.data();
    o.w.bias.resize(static_cast<size_t>(n_out));
    for (float& b : o.w.bias) b = dist(rng);
    return o;
}

std::vector<float> row_of(const LinearWeight& w, int64_t r) {
    std::vector<float> out(static_cast<size_t>(w.n_in));
    w.dequantize_row(r, out.data());
    return out;
}

struct FormatCase {
    WeightFormat format;
    DType dtype;
};

TEST(ShardLinear, EveryFormatSlicesExactly) {
    std::mt19937 rng(1234);
    ThreadPool pool(1);
    const int64_t n_out = 12, n_in = 64;
    for (const FormatCase fc : {FormatCase{WeightFormat::Dense, DType::F32}, FormatCase{WeightFormat::Dense, DType::BF16},
                                FormatCase{WeightFormat::Fp8, DType::F8_E4M3}, FormatCase{WeightFormat::Nvfp4, DType::U8}}) {
        SCOPED_TRACE(std::string(weight_format_name(fc.format)) + " " + std::string(dtype_name(fc.dtype)));
        const OwnedWeight whole = make_weight(fc.format, fc.dtype, n_out, n_in, rng);
        ShardStore store;
        // Column-parallel rows [4, 8): views, bias sliced.
        const LinearWeight col = shard_linear(whole.w, {ShardKind::ColumnParallel, {4, 8}}, 1, store);
        EXPECT_EQ(store.bytes(), 0);
        ASSERT_EQ(col.n_out, 4);
        for (int64_t r = 0; r < 4; ++r) {
            EXPECT_EQ(row_of(col, r), row_of(whole.w, 4 + r));
            EXPECT_EQ(col.bias[static_cast<size_t>(r)], whole.w.bias[static_cast<size_t>(4 + r)]);
        }
        // Row-parallel: two shards of 32 columns (whole NVFP4 blocks), copied; bias on rank 0 only.
        std::vector<float> x(static_cast<size_t>(3 * n_in));
        std::normal_distribution<float> dist(0.0f, 1.0f);
        for (float& v : x) v = dist(rng);
        std::vector<float> y(static_cast<size_t>(3 * n_out)), sum(y.size(), 0.0f), part(y.size());
        linear_cpu(pool, x.data(), 3, whole.w, y.data());
        double abs_sum_max = 0;  // max over outputs of sum |x_i w_i| + |b|: the summation-order bound's scale
        for (int64_t t = 0; t < 3; ++t)
            for (int64_t r = 0; r < n_out; ++r) {
                const std::vector<float> wr = row_of(whole.w, r);
                double s = std::fabs(whole.w.bias[static_cast<size_t>(r)]);
                for (int64_t i = 0; i < n_in; ++i) s += std::fabs(x[static_cast<size_t>(t * n_in + i)] * wr[static_cast<size_t>(i)]);
                abs_sum_max = std::max(abs_sum_max, s);
            }
        for (int64_t rank = 0; rank < 2; ++rank) {
            const IndexRange cols{rank * 32, rank * 32 + 32};
            const LinearWeight row = shard_linear(whole.w, {ShardKind::RowParallel, cols}, rank, store);
            ASSERT_EQ(row.n_in, 32);
            EXPECT_EQ(row.bias.empty(), rank != 0);
            for (int64_t r = 0; r < n_out; ++r) {
                const std::vector<float> full = row_of(whole.w, r);
                EXPECT_EQ(row_of(row, r), std::vector<float>(full.begin() + cols.begin, full.begin() + cols.end));
            }
            // The rank's input columns of x, [3, 32].
            std::vector<float> xs(static_cast<size_t>(3 * 32));
            for (int64_t t = 0; t < 3; ++t)
                std::copy_n(x.data() + t * n_in + cols.begin, 32, xs.data() + t * 32);
            linear_cpu(pool, xs.data(), 3, row, part.data());
            for (size_t i = 0; i < sum.size(); ++i) sum[i] += part[i];
        }
        EXPECT_GT(store.bytes(), 0);
        // Reordered float32 sums of n_in + 1 terms differ by at most 2 * gamma(n_in + 1) * sum |terms|,
        // gamma(k) = k u / (1 - k u), u = 2^-24.
        const double u = std::ldexp(1.0, -24), k = static_cast<double>(n_in + 1);
        const double tol = 2.0 * (k * u / (1.0 - k * u)) * abs_sum_max;
        for (size_t i = 0; i < y.size(); ++i) EXPECT_NEAR(sum[i], y[i], tol) << i;
    }
}

TEST(ShardLinear, RefusesNvfp4SplitsInsideABlockAndBadRanges) {
    std::mt19937 rng(7);
    const OwnedWeight w = make_weight(WeightFormat::Nvfp4, DType::U8, 4, 64, rng);
    ShardStore store;
    const std::string e = error_of([&] { shard_linear(w.w, {ShardKind::RowParallel, {8, 40}}, 0, store); });
    EXPECT_NE(e.find("test.proj"), std::string::npos) << e;
    EXPECT_NE(e.find("[4, 64]"), std::string::npos) << e;
    EXPECT_NE(e.find("[8, 40)"), std::string::npos) << e;
    EXPECT_NE(e.find("16"), std::string::npos) << e;
    EXPECT_NE(error_of([&] { shard_linear(w.w, {ShardKind::ColumnParallel, {2, 6}}, 0, store); }).find("outside"),
              std::string::npos);
    EXPECT_NE(error_of([&] { shard_linear(w.w, {ShardKind::RowParallel, {32, 32}}, 0, store); }).find("empty"),
              std::string::npos);
    // Dense and FP8 slice at any column.
    const OwnedWeight f = make_weight(WeightFormat::Fp8, DType::F8_E4M3, 4, 64, rng);
    const LinearWeight s = shard_linear(f.w, {ShardKind::RowParallel, {8, 40}}, 1, store);
    EXPECT_EQ(s.n_in, 32);
    EXPECT_EQ(s.scale, f.w.scale);  // per-tensor scale replicated
}

}  // namespace
}  // namespace nibble
