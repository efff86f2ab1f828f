// A non-owning view of a tensor: pointer, dtype, shape, row-major strides (in elements), device.
// Weights are views into the checkpoint's mmap (CPU) or into device buffers (CUDA).
#pragma once

#include <array>
#include <cstdint>
#include <initializer_list>
#include <string>

#include "tensor/dtype.h"

namespace nibble {

enum class Device { Cpu, Cuda };

// Up to kMaxDims dimensions, outermost first.
struct Shape {
    static constexpr int kMaxDims = 6;
    std::array<int64_t, kMaxDims> dims{};
    int ndim = 0;

    Shape() = default;
    Shape(std::initializer_list<int64_t> list);
    template <class Range>
    static Shape from(const Range& range) {
        Shape s;
        for (auto d : range) s.push_back(static_cast<int64_t>(d));
        return s;
    }
    void push_back(int64_t d);
    int64_t operator[](int i) const { return dims[static_cast<size_t>(i)]; }
    int64_t numel() const;
    bool operator==(const Shape& other) const;
    // "[4096, 2048]"
    std::string str() const;
};

struct Tensor {
    void* data = nullptr;
    DType dtype = DType::F32;
    Shape shape;
    Device device = Device::Cpu;

    int64_t numel() const { return shape.numel(); }
    size_t nbytes() const { return static_cast<size_t>(numel()) * dtype_size(dtype); }
    template <class T>
    T* as() const { return static_cast<T*>(data); }
};

}  // namespace nibble
