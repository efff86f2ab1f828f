// DeviceBuffer: an owning, move-only block of device memory (cudaMalloc / cudaFree), with typed access
// and blocking host<->device copies. Usable from .cpp and .cu files (no fmt: only cuda_check.h).
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <utility>

#include "cuda/cuda_check.h"

namespace nibble::cuda {

class DeviceBuffer {
public:
    DeviceBuffer() = default;
    explicit DeviceBuffer(size_t bytes) : bytes_(bytes) {
        if (bytes_ > 0) NIBBLE_CUDA_CHECK(cudaMalloc(&ptr_, bytes_));
    }
    ~DeviceBuffer() {
        if (ptr_) (void)cudaFree(ptr_);  // never throw from a destructor
    }
    DeviceBuffer(DeviceBuffer&& other) noexcept
        : ptr_(std::exchange(other.ptr_, nullptr)), bytes_(std::exchange(other.bytes_, 0)) {}
    DeviceBuffer& operator=(DeviceBuffer&& other) noexcept {
        if (this != &other) {
            if (ptr_) (void)cudaFree(ptr_);
            ptr_ = std::exchange(other.ptr_, nullptr);
            bytes_ = std::exchange(other.bytes_, 0);
        }
        return *this;
    }
    DeviceBuffer(const DeviceBuffer&) = delete;
    DeviceBuffer& operator=(const DeviceBuffer&) = delete;

    void* get() const { return ptr_; }
    template <class T>
    T* as() const { return static_cast<T*>(ptr_); }
    size_t bytes() const { return bytes_; }

    // Blocking copies of `n` bytes from the start of the buffer (n <= bytes(), checked).
    void upload(const void* host, size_t n) {
        check_size(n);
        NIBBLE_CUDA_CHECK(cudaMemcpy(ptr_, host, n, cudaMemcpyHostToDevice));
    }
    void download(void* host, size_t n) const {
        check_size(n);
        NIBBLE_CUDA_CHECK(cudaMemcpy(host, ptr_, n, cudaMemcpyDeviceToHost));
    }
    // Sets every byte to `value` (tests poison outputs with 0xff: a NaN in f32, bf16 and e4m3).
    void fill_bytes(int value) { NIBBLE_CUDA_CHECK(cudaMemset(ptr_, value, bytes_)); }

private:
    void check_size(size_t n) const {
        if (n > bytes_)
            throw std::runtime_error("DeviceBuffer: copy of " + std::to_string(n) + " bytes into a buffer of " +
                                     std::to_string(bytes_));
    }
    void* ptr_ = nullptr;
    size_t bytes_ = 0;
};

}  // namespace nibble::cuda
