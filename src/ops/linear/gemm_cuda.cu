// Prefill matmuls: weight dequantization to BF16 and cuBLASLt's BF16 GEMM (gemm_cuda.h says why).
#include "ops/linear/gemm_cuda.h"

#include <cublasLt.h>
#include <cuda_bf16.h>

#include <map>
#include <stdexcept>
#include <string>
#include <tuple>

#include "cuda/cuda_check.h"
#include "cuda/device_buffer.h"

namespace nibble::cuda {
namespace {

void check_cublas(cublasStatus_t status, const char* what) {
    if (status != CUBLAS_STATUS_SUCCESS)
        throw std::runtime_error(std::string("cuBLASLt: ") + what + " failed: " + cublasLtGetStatusName(status) +
                                 " (" + cublasLtGetStatusString(status) + ")");
}

// E2M1 code (4 bits: sign, 2 exponent, 1 mantissa) to float32 bits, exactly: 0, 0.5, 1, 1.5, 2, 3, 4, 6.
__device__ __forceinline__ float e2m1_value(uint32_t code) {
    const uint32_t e = (code >> 1) & 3u, m = code & 1u;
    const uint32_t magnitude = e == 0 ? (m ? 0x3f000000u : 0u) : (((e + 126u) << 23) | (m << 22));
    return __uint_as_float(magnitude | ((code & 8u) << 28));
}

// E4M3 code to float32, exactly (normals and subnormals: the bits shifted into float32's fields give the
// value times 2^-120). NaN codes (0x7f, 0xff) are not produced by checkpoints.
__device__ __forceinline__ float e4m3_value(uint32_t b) {
    return __uint_as_float(((b & 0x80u) << 24) | ((b & 0x7fu) << 20)) * 0x1p120f;
}

__device__ __forceinline__ uint32_t bf16x2_bits(float lo, float hi) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&h);
}

// One thread per 16-value block: 8 packed bytes and one scale in, 16 BF16 (32 bytes) out.
//   packed [groups * 8], scales [groups], out [groups * 16]
__global__ void dequantize_nvfp4_kernel(const uint2* __restrict__ packed, const uint8_t* __restrict__ scales,
                                        int64_t groups, uint4* __restrict__ out) {
    const int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (g >= groups) return;
    const uint2 p = packed[g];
    const float s = e4m3_value(scales[g]);
    const uint32_t words[2] = {p.x, p.y};
    uint32_t o[8];
#pragma unroll
    for (int w = 0; w < 2; ++w)
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const uint32_t byte = (words[w] >> (8 * j)) & 0xffu;  // element 2i in the low nibble
            o[4 * w + j] = bf16x2_bits(e2m1_value(byte & 0xfu) * s, e2m1_value(byte >> 4) * s);
        }
    out[2 * g] = make_uint4(o[0], o[1], o[2], o[3]);
    out[2 * g + 1] = make_uint4(o[4], o[5], o[6], o[7]);
}

// One thread per 8 values: 8 E4M3 bytes in, 8 BF16 out.
__global__ void dequantize_fp8_kernel(const uint2* __restrict__ w, int64_t octets, uint4* __restrict__ out) {
    const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (i >= octets) return;
    const uint2 p = w[i];
    const uint32_t words[2] = {p.x, p.y};
    uint32_t o[4];
#pragma unroll
    for (int h = 0; h < 2; ++h)
#pragma unroll
        for (int j = 0; j < 2; ++j) {
            const uint32_t pair = words[h] >> (16 * j);
            o[2 * h + j] = bf16x2_bits(e4m3_value(pair & 0xffu), e4m3_value((pair >> 8) & 0xffu));
        }
    out[i] = make_uint4(o[0], o[1], o[2], o[3]);
}

// y[r, c] = round_bf16(y[r, c] + bias[c]); one thread per 2 columns.
__global__ void add_bias_kernel(__nv_bfloat162* __restrict__ y, int64_t m, int64_t half_n, const float2* __restrict__ bias) {
    const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (i >= m * half_n) return;
    const float2 v = __bfloat1622float2(y[i]);
    const float2 b = bias[i % half_n];
    y[i] = __floats2bfloat162_rn(v.x + b.x, v.y + b.y);
}

unsigned blocks_for(int64_t n, int threads) {
    const int64_t b = (n + threads - 1) / threads;
    if (b > 0x7fffffff) throw std::invalid_argument("gemm: problem too large for one launch");
    return static_cast<unsigned>(b);
}

void check_launch(const char* what) {
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) throw std::runtime_error(std::string(what) + ": launch failed: " + cudaGetErrorString(err));
}

}  // namespace

// One cuBLASLt plan per (m, n, k): descriptors and the heuristic's first algorithm, made once.
struct GemmPlan {
    cublasLtMatmulDesc_t op = nullptr;
    cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr;
    cublasLtMatmulAlgo_t algo{};
};

struct GemmContext::Impl {
    static constexpr size_t kWorkspaceBytes = size_t{32} << 20;
    cublasLtHandle_t handle = nullptr;
    DeviceBuffer workspace;
    DeviceBuffer scratch;  // [max_weight_elems] BF16
    int64_t scratch_elems = 0;
    std::map<std::tuple<int64_t, int64_t, int64_t, int>, GemmPlan> plans;

    // out: CUDA_R_16BF (the prefill GEMMs) or CUDA_R_32F (float32 outputs of BF16 operands: gemm_bf16_f32).
    const GemmPlan& plan(int64_t m, int64_t n, int64_t k, cudaDataType_t out = CUDA_R_16BF) {
        const auto key = std::make_tuple(m, n, k, static_cast<int>(out));
        if (auto it = plans.find(key); it != plans.end()) return it->second;
        GemmPlan p;
        check_cublas(cublasLtMatmulDescCreate(&p.op, CUBLAS_COMPUTE_32F, CUDA_R_32F), "matmul descriptor");
        // Row-major y[m, n] = x[m, k] W[n, k]^T is column-major y^T[n, m] = W^T... as cuBLAS sees it:
        // A = W (column-major k x n, transposed), B = x (column-major k x m), C = y (column-major n x m).
        const cublasOperation_t ta = CUBLAS_OP_T, tb = CUBLAS_OP_N;
        check_cublas(cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof ta), "transa");
        check_cublas(cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof tb), "transb");
        check_cublas(cublasLtMatrixLayoutCreate(&p.a, CUDA_R_16BF, k, n, k), "layout A");
        check_cublas(cublasLtMatrixLayoutCreate(&p.b, CUDA_R_16BF, k, m, k), "layout B");
        check_cublas(cublasLtMatrixLayoutCreate(&p.c, out, n, m, n), "layout C");
        cublasLtMatmulPreference_t pref = nullptr;
        check_cublas(cublasLtMatmulPreferenceCreate(&pref), "preference");
        const size_t ws = kWorkspaceBytes;
        check_cublas(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof ws),
                     "workspace preference");
        cublasLtMatmulHeuristicResult_t result{};
        int found = 0;
        const cublasStatus_t st =
            cublasLtMatmulAlgoGetHeuristic(handle, p.op, p.a, p.b, p.c, p.c, pref, 1, &result, &found);
        cublasLtMatmulPreferenceDestroy(pref);
        check_cublas(st, "algorithm heuristic");
        if (found == 0)
            throw std::runtime_error(std::string("cuBLASLt: no BF16 GEMM algorithm (") +
                                     (out == CUDA_R_32F ? "float32" : "BF16") + " out) for m=" + std::to_string(m) +
                                     " n=" + std::to_string(n) + " k=" + std::to_string(k));
        p.algo = result.algo;
        return plans.emplace(key, p).first->second;
    }

    ~Impl() {
        for (auto& [key, p] : plans) {
            cublasLtMatrixLayoutDestroy(p.a);
            cublasLtMatrixLayoutDestroy(p.b);
            cublasLtMatrixLayoutDestroy(p.c);
            cublasLtMatmulDescDestroy(p.op);
        }
        if (handle) cublasLtDestroy(handle);
    }
};

GemmContext::GemmContext(int64_t max_weight_elems) : impl_(std::make_unique<Impl>()) {
    check_cublas(cublasLtCreate(&impl_->handle), "create handle");
    impl_->workspace = DeviceBuffer(Impl::kWorkspaceBytes);
    impl_->scratch = DeviceBuffer(static_cast<size_t>(max_weight_elems) * 2);
    impl_->scratch_elems = max_weight_elems;
}

GemmContext::~GemmContext() = default;

namespace {

void check_shape(const char* what, const void* x, int64_t m, int64_t n, int64_t k, const void* y) {
    if (m <= 0 || n <= 0 || k <= 0)
        throw std::invalid_argument(std::string(what) + ": empty or negative shape m=" + std::to_string(m) +
                                    " n=" + std::to_string(n) + " k=" + std::to_string(k));
    if (k % 16 != 0 || n % 2 != 0)
        throw std::invalid_argument(std::string(what) + ": k = " + std::to_string(k) + " must be a multiple of 16 and n = " +
                                    std::to_string(n) + " even");
    if ((reinterpret_cast<uintptr_t>(x) | reinterpret_cast<uintptr_t>(y)) % 16 != 0)
        throw std::invalid_argument(std::string(what) + ": x and y must be 16-byte aligned");
}

// out: y's type (BF16, or float32 for gemm_bf16_f32, which takes no bias).
void run_gemm(GemmContext::Impl& ctx, const void* x, int64_t m, const void* w, int64_t n, int64_t k, float alpha,
              const float* bias, void* y, cudaStream_t stream, cudaDataType_t out = CUDA_R_16BF) {
    const GemmPlan& p = ctx.plan(m, n, k, out);
    const float beta = 0.0f;
    check_cublas(cublasLtMatmul(ctx.handle, p.op, &alpha, w, p.a, x, p.b, &beta, y, p.c, y, p.c, &p.algo,
                                ctx.workspace.get(), ctx.workspace.bytes(), stream),
                 "matmul");
    if (bias != nullptr) add_bias_bf16(y, m, n, bias, stream);
}

uint16_t* scratch_for(GemmContext::Impl& ctx, const char* what, int64_t n, int64_t k) {
    if (n * k > ctx.scratch_elems)
        throw std::invalid_argument(std::string(what) + ": weight of " + std::to_string(n) + " x " + std::to_string(k) +
                                    " exceeds the GemmContext's scratch of " + std::to_string(ctx.scratch_elems) +
                                    " values");
    return ctx.scratch.as<uint16_t>();
}

}  // namespace

void dequantize_nvfp4_to_bf16(const Nvfp4DeviceWeight& w, uint16_t* out, cudaStream_t stream) {
    if (w.k % 16 != 0 || w.n <= 0) throw std::invalid_argument("dequantize_nvfp4_to_bf16: k must be a multiple of 16");
    const int64_t groups = w.n * w.k / 16;
    constexpr int kThreads = 256;
    dequantize_nvfp4_kernel<<<blocks_for(groups, kThreads), kThreads, 0, stream>>>(
        reinterpret_cast<const uint2*>(w.packed), w.scales, groups, reinterpret_cast<uint4*>(out));
    check_launch("dequantize_nvfp4_to_bf16");
}

void dequantize_fp8_to_bf16(const uint8_t* w, int64_t n, int64_t k, uint16_t* out, cudaStream_t stream) {
    if (k % 8 != 0 || n <= 0) throw std::invalid_argument("dequantize_fp8_to_bf16: k must be a multiple of 8");
    const int64_t octets = n * k / 8;
    constexpr int kThreads = 256;
    dequantize_fp8_kernel<<<blocks_for(octets, kThreads), kThreads, 0, stream>>>(
        reinterpret_cast<const uint2*>(w), octets, reinterpret_cast<uint4*>(out));
    check_launch("dequantize_fp8_to_bf16");
}

void add_bias_bf16(void* y, int64_t m, int64_t n, const float* bias, cudaStream_t stream) {
    if (n % 2 != 0) throw std::invalid_argument("add_bias_bf16: n must be even");
    constexpr int kThreads = 256;
    add_bias_kernel<<<blocks_for(m * n / 2, kThreads), kThreads, 0, stream>>>(
        static_cast<__nv_bfloat162*>(y), m, n / 2, reinterpret_cast<const float2*>(bias));
    check_launch("add_bias_bf16");
}

void gemm_bf16(GemmContext& ctx, const void* x, int64_t m, const uint16_t* w, int64_t n, int64_t k, float alpha,
               const float* bias, void* y, cudaStream_t stream) {
    check_shape("gemm_bf16", x, m, n, k, y);
    run_gemm(ctx.impl(), x, m, w, n, k, alpha, bias, y, stream);
}

void gemm_bf16_f32(GemmContext& ctx, const void* x, int64_t m, const uint16_t* w, int64_t n, int64_t k, float* y,
                   cudaStream_t stream) {
    check_shape("gemm_bf16_f32", x, m, n, k, y);
    run_gemm(ctx.impl(), x, m, w, n, k, 1.0f, nullptr, y, stream, CUDA_R_32F);
}

void gemm_nvfp4(GemmContext& ctx, const void* x, int64_t m, const Nvfp4DeviceWeight& w, const float* bias, void* y,
                cudaStream_t stream) {
    check_shape("gemm_nvfp4", x, m, w.n, w.k, y);
    uint16_t* dense = scratch_for(ctx.impl(), "gemm_nvfp4", w.n, w.k);
    dequantize_nvfp4_to_bf16(w, dense, stream);
    run_gemm(ctx.impl(), x, m, dense, w.n, w.k, w.global_scale, bias, y, stream);
}

void gemm_fp8(GemmContext& ctx, const void* x, int64_t m, const uint8_t* w, int64_t n, int64_t k, float scale,
              const float* bias, void* y, cudaStream_t stream) {
    check_shape("gemm_fp8", x, m, n, k, y);
    uint16_t* dense = scratch_for(ctx.impl(), "gemm_fp8", n, k);
    dequantize_fp8_to_bf16(w, n, k, dense, stream);
    run_gemm(ctx.impl(), x, m, dense, n, k, scale, bias, y, stream);
}

}  // namespace nibble::cuda
