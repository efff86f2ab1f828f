#include "tensor/tensor.h"

#include "base/error.h"

namespace nibble {

Shape::Shape(std::initializer_list<int64_t> list) {
    for (auto d : list) push_back(d);
}

void Shape::push_back(int64_t d) {
    NIBBLE_CHECK(ndim < kMaxDims, "tensor has more than {} dimensions", kMaxDims);
    dims[static_cast<size_t>(ndim++)] = d;
}

int64_t Shape::numel() const {
    int64_t n = 1;
    for (int i = 0; i < ndim; ++i) n *= dims[static_cast<size_t>(i)];
    return n;
}

bool Shape::operator==(const Shape& other) const {
    if (ndim != other.ndim) return false;
    for (int i = 0; i < ndim; ++i)
        if (dims[static_cast<size_t>(i)] != other.dims[static_cast<size_t>(i)]) return false;
    return true;
}

std::string Shape::str() const {
    std::string s = "[";
    for (int i = 0; i < ndim; ++i) {
        if (i) s += ", ";
        s += std::to_string(dims[static_cast<size_t>(i)]);
    }
    return s + "]";
}

}  // namespace nibble
