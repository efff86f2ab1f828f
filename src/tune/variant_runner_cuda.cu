// tune/variant_runner_cuda.h. No fmt/spdlog here: nvcc compiles this file.
#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>
#include <vector>

#include "cuda/cuda_check.h"
#include "cuda/device_buffer.h"
#include "cuda/fill_random.h"
#include "ops/attention/attention_cuda.h"
#include "ops/linear/gemv_fp4mma_cuda.h"
#include "ops/linear/linear_cuda.h"
#include "tune/attention_variant_cuda.h"
#include "tune/launch_guard_cuda.h"
#include "tune/variant_runner_cuda.h"

namespace nibble::tune {

namespace {

using cuda::DeviceBuffer;

// Random words with every 16-bit half below 0x3f80 and every byte below 0x40: finite, normal-range values
// in BF16 (< 2), F32 (< 2), E4M3 scales (< 2) and any E2M1 codes; no NaN or infinity in any format.
constexpr uint32_t kSafeMask = 0x3f3f3f3fu;

DeviceBuffer random_buffer(size_t bytes, uint64_t seed, cudaStream_t stream) {
    const size_t words = (bytes + 3) / 4;
    DeviceBuffer b(words * 4);
    if (words > 0) cuda::fill_random_u32(b.as<uint32_t>(), words, seed, kSafeMask, 0u, stream);
    return b;
}

size_t activation_size(DType d) { return d == DType::F32 ? 4 : 2; }

bool starts_with(std::string_view s, std::string_view p) { return s.substr(0, p.size()) == p; }

// Bytes of one KV block of one layer (ops/attention/kv_cache.h layout): block_size x n_kv_heads rows of
// head_dim elements (BF16 2 bytes, FP8 1, NVFP4 half a byte plus one E4M3 scale per 16), padded to 16.
int64_t kv_block_bytes(KvDtype dtype, int64_t block_size, int64_t n_kv_heads, int64_t head_dim) {
    int64_t row = 0;
    switch (dtype) {
        case KvDtype::Bf16: row = head_dim * 2; break;
        case KvDtype::Fp8: row = head_dim; break;
        case KvDtype::Nvfp4: row = head_dim / 2 + head_dim / 16; break;
        case KvDtype::F32: row = head_dim * 4; break;
    }
    return (block_size * n_kv_heads * row + 15) / 16 * 16;
}

class CudaVariantRunner final : public VariantRunner {
public:
    explicit CudaVariantRunner(cudaStream_t stream) : stream_(stream) {
        int device = 0;
        NIBBLE_CUDA_CHECK(cudaGetDevice(&device));
        NIBBLE_CUDA_CHECK(cudaDeviceGetAttribute(&l2_bytes_, cudaDevAttrL2CacheSize, device));
        NIBBLE_CUDA_CHECK(cudaDeviceGetAttribute(&sm_count_, cudaDevAttrMultiProcessorCount, device));
    }

    void prepare(const OpShape& s) override {
        release();
        shape_ = s;
        uint64_t seed = 0x6e6962626c65ull;
        if (s.op == OpKind::GemvNvfp4 || s.op == OpKind::GemvBf16) {
            if (s.m < 1 || s.m > 16 || s.n <= 0 || s.k <= 0)
                throw std::invalid_argument("tune: GEMV shape needs m in 1..16 and positive n, k");
            x_ = random_buffer(static_cast<size_t>(s.m * s.k) * activation_size(s.activation), ++seed, stream_);
            y_ = DeviceBuffer(static_cast<size_t>(s.m * s.n) * activation_size(s.activation));
            const size_t weight_bytes = s.op == OpKind::GemvNvfp4 ? static_cast<size_t>(s.n * s.k / 2)
                                                                  : static_cast<size_t>(s.n * s.k * 2);
            const size_t scale_bytes = s.op == OpKind::GemvNvfp4 ? static_cast<size_t>(s.n * s.k / 16) : 0;
            // Copies in one allocation each for weights and scales, every copy 256-byte aligned.
            weight_stride_ = (weight_bytes + 255) / 256 * 256;
            scale_stride_ = (scale_bytes + 255) / 256 * 256;
            const size_t per_copy = weight_stride_ + scale_stride_;
            copies_ = std::clamp<size_t>((2 * static_cast<size_t>(l2_bytes_) + per_copy - 1) / per_copy, 1, 4096);
            weights_ = random_buffer(copies_ * weight_stride_, ++seed, stream_);
            if (scale_bytes > 0) scales_ = random_buffer(copies_ * scale_stride_, ++seed, stream_);
            // The W4A4 FP4 tensor-core variant quantizes x into a workspace first.
            if (s.op == OpKind::GemvNvfp4) workspace_ = DeviceBuffer(cuda::fp4mma_workspace_bytes(s.m, s.k));
        } else if (s.op == OpKind::AttentionDecode || s.op == OpKind::AttentionPrefill) {
            if (s.n_seqs < 1 || s.q_len < 1 || s.kv_len < s.q_len || s.n_kv_heads < 1 || s.group < 1)
                throw std::invalid_argument("tune: attention shape needs n_seqs, q_len, n_kv_heads, group >= 1, kv_len >= q_len");
            const int64_t block_size = 16;
            const int64_t blocks_per_seq = (s.kv_len + block_size - 1) / block_size;
            const int64_t n_heads = s.n_kv_heads * s.group;
            const int64_t n_tokens = s.n_seqs * s.q_len;
            layer_ = cuda::PagedKvLayer{};
            layer_.n_blocks = s.n_seqs * blocks_per_seq;
            layer_.block_bytes = kv_block_bytes(s.kv_dtype, block_size, s.n_kv_heads, s.head_dim);
            layer_.block_size = block_size;
            layer_.n_kv_heads = s.n_kv_heads;
            layer_.head_dim = s.head_dim;
            layer_.dtype = s.kv_dtype;
            k_ = random_buffer(static_cast<size_t>(layer_.n_blocks * layer_.block_bytes), ++seed, stream_);
            v_ = random_buffer(static_cast<size_t>(layer_.n_blocks * layer_.block_bytes), ++seed, stream_);
            layer_.k = k_.as<uint8_t>();
            layer_.v = v_.as<uint8_t>();
            const size_t row_bytes = static_cast<size_t>(n_heads * s.head_dim) * activation_size(s.activation);
            x_ = random_buffer(static_cast<size_t>(n_tokens) * row_bytes, ++seed, stream_);
            y_ = DeviceBuffer(static_cast<size_t>(n_tokens) * row_bytes);
            std::vector<int32_t> q_start(s.n_seqs + 1), start_pos(s.n_seqs), tables(s.n_seqs * blocks_per_seq);
            for (int64_t i = 0; i <= s.n_seqs; ++i) q_start[i] = static_cast<int32_t>(i * s.q_len);
            for (int64_t i = 0; i < s.n_seqs; ++i) start_pos[i] = static_cast<int32_t>(s.kv_len - s.q_len);
            for (int64_t i = 0; i < s.n_seqs * blocks_per_seq; ++i) tables[i] = static_cast<int32_t>(i);
            meta_ = DeviceBuffer((q_start.size() + start_pos.size() + tables.size()) * sizeof(int32_t));
            int32_t* m = meta_.as<int32_t>();
            NIBBLE_CUDA_CHECK(cudaMemcpy(m, q_start.data(), q_start.size() * 4, cudaMemcpyHostToDevice));
            NIBBLE_CUDA_CHECK(cudaMemcpy(m + q_start.size(), start_pos.data(), start_pos.size() * 4, cudaMemcpyHostToDevice));
            NIBBLE_CUDA_CHECK(cudaMemcpy(m + q_start.size() + start_pos.size(), tables.data(), tables.size() * 4,
                                         cudaMemcpyHostToDevice));
            batch_ = cuda::AttentionBatch{};
            batch_.n_seqs = s.n_seqs;
            batch_.n_tokens = n_tokens;
            batch_.q_start = m;
            batch_.start_pos = m + q_start.size();
            batch_.block_tables = m + q_start.size() + start_pos.size();
            batch_.max_blocks = blocks_per_seq;
            batch_.max_q_len = s.q_len;
            batch_.max_kv_len = s.kv_len;
            args_ = cuda::AttentionArgs{};
            args_.n_heads = n_heads;
            args_.scale = 1.0f / std::sqrt(static_cast<float>(s.head_dim));
            workspace_splits_ = 32;
            workspace_ = DeviceBuffer(
                cuda::paged_attention_workspace_bytes(workspace_splits_, n_tokens, n_heads, s.head_dim));
        } else {
            throw std::invalid_argument("tune: no CUDA runner for this op yet");
        }
        NIBBLE_CUDA_CHECK(cudaStreamSynchronize(stream_));
    }

    LaunchOutcome launch(const KernelVariant& v, const OpShape& s, int splits) override {
        return guarded_launch([&] { launch_unguarded(v, s, splits); }, stream_);
    }

private:
    void launch_unguarded(const KernelVariant& v, const OpShape& s, int splits) {
        if (s.op == OpKind::GemvNvfp4) {
            const size_t c = next_copy_++ % copies_;
            cuda::Nvfp4DeviceWeight w;
            w.packed = weights_.as<uint8_t>() + c * weight_stride_;
            w.scales = scales_.as<uint8_t>() + c * scale_stride_;
            w.global_scale = 1.0f;
            w.n = s.n, w.k = s.k;
            if (starts_with(v.name, "fp4mma."))
                cuda::gemv_nvfp4_fp4mma(x_.get(), s.activation, s.m, w, nullptr, y_.get(), workspace_.get(),
                                        workspace_.bytes(), stream_);
            else if (starts_with(v.name, "mma."))
                cuda::gemv_nvfp4_mma(x_.get(), s.activation, s.m, w, nullptr, y_.get(), stream_);
            else
                cuda::gemv_nvfp4_cuda_core(x_.get(), s.activation, s.m, w, nullptr, y_.get(), stream_);
        } else if (s.op == OpKind::GemvBf16) {
            const size_t c = next_copy_++ % copies_;
            cuda::gemv_bf16(x_.get(), s.activation, s.m,
                            reinterpret_cast<const uint16_t*>(weights_.as<uint8_t>() + c * weight_stride_), s.n, s.k,
                            nullptr, y_.get(), stream_);
        } else {
            int n = splits;
            if (n <= 0) n = cuda::paged_attention_splits(batch_, layer_.n_kv_heads, args_.n_heads, sm_count_);
            n = std::min(n, workspace_splits_);
            // Several tensor-core kernels serve a shape (decode with FP8/NVFP4 caches, prefill): the named
            // one.
            select_attention_kernels(v.name, args_);
            cuda::paged_attention(x_.get(), s.activation, layer_, batch_, args_, n, workspace_.get(), workspace_.bytes(),
                                  y_.get(), stream_);
        }
    }

    void release() {
        weights_ = DeviceBuffer();
        scales_ = DeviceBuffer();
        copies_ = 1;
        x_ = DeviceBuffer();
        y_ = DeviceBuffer();
        k_ = DeviceBuffer();
        v_ = DeviceBuffer();
        meta_ = DeviceBuffer();
        workspace_ = DeviceBuffer();
        next_copy_ = 0;
    }

    cudaStream_t stream_;
    int l2_bytes_ = 0, sm_count_ = 0;
    OpShape shape_;
    DeviceBuffer x_, y_;                                  // GEMV x [m, k], y [m, n]; attention q, out
    DeviceBuffer weights_, scales_;  // GEMV: copies_ x ([n, k / 2] NVFP4 or [n, k] BF16 | [n, k / 16] scales)
    size_t weight_stride_ = 0, scale_stride_ = 0, copies_ = 1, next_copy_ = 0;
    DeviceBuffer k_, v_, meta_, workspace_;  // attention cache, q_start/start_pos/tables, partials; fp4mma: quantized x
    cuda::PagedKvLayer layer_;
    cuda::AttentionBatch batch_;
    cuda::AttentionArgs args_;
    int workspace_splits_ = 1;
};

}  // namespace

std::unique_ptr<VariantRunner> make_cuda_variant_runner(cudaStream_t stream) {
    return std::make_unique<CudaVariantRunner>(stream);
}

}  // namespace nibble::tune
