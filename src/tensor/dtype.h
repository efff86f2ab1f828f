// Element types of stored and computed tensors, with the safetensors names they are written under.
// Packed 4-bit formats (NVFP4, MXFP4) are stored as U8 tensors [rows, cols/2] plus scale tensors; their
// codecs live in tensor/nvfp4.h and tensor/mxfp4.h.
#pragma once

#include <cstddef>
#include <optional>
#include <string_view>

namespace nibble {

enum class DType {
    F64,
    F32,
    F16,
    BF16,
    F8_E4M3,  // float8_e4m3fn: no infinities, 0x7f/0xff are NaN, max 448
    F8_E5M2,
    F8_E8M0,  // unsigned power-of-two scale (MXFP4 block scale); 0xff is NaN
    I64,
    I32,
    I16,
    I8,
    U64,
    U32,
    U16,
    U8,
    BOOL,
};

// Bytes per element.
size_t dtype_size(DType dtype);
// The safetensors spelling ("F32", "BF16", "F8_E4M3", ...).
std::string_view dtype_name(DType dtype);
// Parses a safetensors dtype string; nullopt for an unknown one (the caller names the file and tensor).
std::optional<DType> dtype_from_name(std::string_view name);
bool dtype_is_float(DType dtype);

}  // namespace nibble
