// Device helpers shared by the expert GEMVs of ops/moe/moe_cuda.cu and ops/moe/moe_mma_gemv_cuda.cu. For .cu
// files only.
#pragma once

#include <cuda_runtime.h>

#include "ops/linear/linear_cuda.h"

namespace nibble::cuda {

// What an expert GEMV applies to its output rows: nothing (down), SiLU(gate) * up, or relu(up)^2.
enum class Epilogue { None, SwiGlu, Relu2 };

// An expert's weight descriptor through coherent loads (the down instance reads it before its pdl_wait).
__device__ __forceinline__ Nvfp4DeviceWeight load_weight_coherent(const Nvfp4DeviceWeight* p) {
    Nvfp4DeviceWeight w;
    w.packed =
        reinterpret_cast<const uint8_t*>(__ldca(reinterpret_cast<const unsigned long long*>(&p->packed)));
    w.scales =
        reinterpret_cast<const uint8_t*>(__ldca(reinterpret_cast<const unsigned long long*>(&p->scales)));
    w.global_scale = __ldca(&p->global_scale);
    w.n = __ldca(reinterpret_cast<const long long*>(&p->n));
    w.k = __ldca(reinterpret_cast<const long long*>(&p->k));
    return w;
}

}  // namespace nibble::cuda
