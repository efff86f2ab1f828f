#include "tensor/convert.h"

#include <cstring>

#include "base/error.h"
#include "tensor/float_formats.h"

namespace nibble {

void decode_to_float(const void* src, DType dtype, int64_t n, float* out) {
    switch (dtype) {
        case DType::F32:
            std::memcpy(out, src, static_cast<size_t>(n) * sizeof(float));
            return;
        case DType::F64: {
            const auto* p = static_cast<const double*>(src);
            for (int64_t i = 0; i < n; ++i) out[i] = static_cast<float>(p[i]);
            return;
        }
        case DType::BF16: {
            const auto* p = static_cast<const uint16_t*>(src);
            for (int64_t i = 0; i < n; ++i) out[i] = bf16_to_float(p[i]);
            return;
        }
        case DType::F16: {
            const auto* p = static_cast<const uint16_t*>(src);
            for (int64_t i = 0; i < n; ++i) out[i] = fp16_to_float(p[i]);
            return;
        }
        case DType::F8_E4M3: {
            const auto* p = static_cast<const uint8_t*>(src);
            for (int64_t i = 0; i < n; ++i) out[i] = e4m3_to_float(p[i]);
            return;
        }
        case DType::F8_E5M2: {
            const auto* p = static_cast<const uint8_t*>(src);
            for (int64_t i = 0; i < n; ++i) out[i] = e5m2_to_float(p[i]);
            return;
        }
        default:
            fail("cannot decode {} elements as floating point", dtype_name(dtype));
    }
}

std::vector<float> tensor_to_floats(const Tensor& t) {
    std::vector<float> v(static_cast<size_t>(t.numel()));
    decode_to_float(t.data, t.dtype, t.numel(), v.data());
    return v;
}

void encode_from_float(const float* src, int64_t n, DType dtype, void* out) {
    switch (dtype) {
        case DType::F32:
            std::memcpy(out, src, static_cast<size_t>(n) * sizeof(float));
            return;
        case DType::BF16: {
            auto* p = static_cast<uint16_t*>(out);
            for (int64_t i = 0; i < n; ++i) p[i] = bf16_from_float(src[i]);
            return;
        }
        case DType::F16: {
            auto* p = static_cast<uint16_t*>(out);
            for (int64_t i = 0; i < n; ++i) p[i] = fp16_from_float(src[i]);
            return;
        }
        default:
            fail("cannot encode float32 values as {}", dtype_name(dtype));
    }
}

}  // namespace nibble
