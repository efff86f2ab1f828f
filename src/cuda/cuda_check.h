// Error checks for CUDA runtime calls, usable from .cu files (no fmt here: nvcc cannot compile it in
// C++20). A failing call throws std::runtime_error naming the expression, file and line.
#pragma once

#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

namespace nibble::cuda {

[[noreturn]] inline void throw_cuda_error(cudaError_t err, const char* expr, const char* file, int line) {
    throw std::runtime_error(std::string("CUDA error ") + cudaGetErrorName(err) + " (" +
                             cudaGetErrorString(err) + ") in " + expr + " at " + file + ":" +
                             std::to_string(line));
}

}  // namespace nibble::cuda

#define NIBBLE_CUDA_CHECK(expr)                                                          \
    do {                                                                                 \
        cudaError_t nibble_err_ = (expr);                                                \
        if (nibble_err_ != cudaSuccess)                                                  \
            ::nibble::cuda::throw_cuda_error(nibble_err_, #expr, __FILE__, __LINE__);    \
    } while (0)
