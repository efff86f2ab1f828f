#include "ops/attention/kv_cache.h"

#include <cmath>
#include <cstring>

#include "base/error.h"
#include "tensor/float_formats.h"
#include "tensor/nvfp4.h"

namespace nibble {

std::string_view kv_dtype_name(KvDtype dtype) {
    switch (dtype) {
        case KvDtype::F32: return "f32";
        case KvDtype::Bf16: return "bf16";
        case KvDtype::Fp8: return "fp8";
        case KvDtype::Nvfp4: return "nvfp4";
    }
    return "?";
}

std::optional<KvDtype> kv_dtype_from_name(std::string_view name) {
    if (name == "f32" || name == "float32") return KvDtype::F32;
    if (name == "bf16" || name == "bfloat16") return KvDtype::Bf16;
    if (name == "fp8" || name == "fp8_e4m3") return KvDtype::Fp8;
    if (name == "nvfp4") return KvDtype::Nvfp4;
    return std::nullopt;
}

int64_t KvCacheShape::row_data_bytes() const {
    switch (dtype) {
        case KvDtype::F32: return head_dim * 4;
        case KvDtype::Bf16: return head_dim * 2;
        case KvDtype::Fp8: return head_dim;
        case KvDtype::Nvfp4: return head_dim / 2;
    }
    return 0;
}

int64_t KvCacheShape::row_scale_bytes() const { return dtype == KvDtype::Nvfp4 ? head_dim / kNvfp4BlockSize : 0; }

int64_t KvCacheShape::block_bytes() const {
    const int64_t raw = block_size * n_kv_heads * (row_data_bytes() + row_scale_bytes());
    return (raw + 15) / 16 * 16;
}

float KvCacheShape::k_kv_scale(int64_t layer) const {
    return k_scales.empty() ? 1.0f : k_scales.at(static_cast<size_t>(layer));
}
float KvCacheShape::v_kv_scale(int64_t layer) const {
    return v_scales.empty() ? 1.0f : v_scales.at(static_cast<size_t>(layer));
}

float kv_layer_scale(KvDtype dtype, float kv_scale) {
    switch (dtype) {
        case KvDtype::F32:
        case KvDtype::Bf16: return 1.0f;
        case KvDtype::Fp8: return kv_scale;
        case KvDtype::Nvfp4: return kv_scale / kE2m1Max;
    }
    return 1.0f;
}

void kv_encode_head(const KvCacheShape& s, float layer_scale, const float* x, uint8_t* block, int64_t slot,
                    int64_t head) {
    const int64_t row = slot * s.n_kv_heads + head;
    const int64_t hd = s.head_dim;
    uint8_t* data = block + row * s.row_data_bytes();
    switch (s.dtype) {
        case KvDtype::F32: std::memcpy(data, x, static_cast<size_t>(hd) * 4); return;
        case KvDtype::Bf16:
            for (int64_t d = 0; d < hd; ++d) {
                const uint16_t b = bf16_from_float(x[d]);
                std::memcpy(data + d * 2, &b, 2);
            }
            return;
        case KvDtype::Fp8:
            for (int64_t d = 0; d < hd; ++d) {
                NIBBLE_CHECK(std::isfinite(x[d]), "KV cache write: element {} of a head is {} (fp8 cache)", d, x[d]);
                data[d] = e4m3_from_float(x[d] / layer_scale, Saturation::Finite);
            }
            return;
        case KvDtype::Nvfp4: {
            uint8_t* scales = block + s.block_size * s.n_kv_heads * s.row_data_bytes() + row * s.row_scale_bytes();
            nvfp4_quantize_row(x, hd, layer_scale, data, scales);
            return;
        }
    }
}

void kv_decode_head(const KvCacheShape& s, float layer_scale, const uint8_t* block, int64_t slot, int64_t head,
                    float* out) {
    const int64_t row = slot * s.n_kv_heads + head;
    const int64_t hd = s.head_dim;
    const uint8_t* data = block + row * s.row_data_bytes();
    switch (s.dtype) {
        case KvDtype::F32: std::memcpy(out, data, static_cast<size_t>(hd) * 4); return;
        case KvDtype::Bf16:
            for (int64_t d = 0; d < hd; ++d) {
                uint16_t b = 0;
                std::memcpy(&b, data + d * 2, 2);
                out[d] = bf16_to_float(b);
            }
            return;
        case KvDtype::Fp8:
            for (int64_t d = 0; d < hd; ++d) out[d] = e4m3_to_float(data[d]) * layer_scale;
            return;
        case KvDtype::Nvfp4: {
            const uint8_t* scales =
                block + s.block_size * s.n_kv_heads * s.row_data_bytes() + row * s.row_scale_bytes();
            nvfp4_dequantize_row(data, scales, hd, layer_scale, out);
            return;
        }
    }
}

KvCache::KvCache(const KvCacheShape& shape) : shape_(shape) {
    NIBBLE_CHECK(shape.n_layers > 0 && shape.n_blocks > 0 && shape.block_size > 0 && shape.n_kv_heads > 0 &&
                     shape.head_dim > 0,
                 "KV cache shape must be positive (layers {}, blocks {}, block size {}, kv heads {}, head dim {})",
                 shape.n_layers, shape.n_blocks, shape.block_size, shape.n_kv_heads, shape.head_dim);
    NIBBLE_CHECK(shape.dtype != KvDtype::Nvfp4 || shape.head_dim % kNvfp4BlockSize == 0,
                 "an nvfp4 KV cache needs head_dim to be a multiple of {}, got {}", kNvfp4BlockSize, shape.head_dim);
    for (const auto* scales : {&shape.k_scales, &shape.v_scales}) {
        NIBBLE_CHECK(scales->empty() || static_cast<int64_t>(scales->size()) == shape.n_layers,
                     "KV cache: {} per-layer scales for {} layers", scales->size(), shape.n_layers);
        for (size_t l = 0; l < scales->size(); ++l)
            NIBBLE_CHECK(std::isfinite((*scales)[l]) && (*scales)[l] > 0.0f,
                         "KV cache: the {} scale of layer {} is {}; it must be finite and positive",
                         scales == &shape.k_scales ? "k" : "v", l, (*scales)[l]);
    }
    for (int64_t l = 0; l < shape.n_layers; ++l) {
        k_layer_scale_.push_back(kv_layer_scale(shape.dtype, shape.k_kv_scale(l)));
        v_layer_scale_.push_back(kv_layer_scale(shape.dtype, shape.v_kv_scale(l)));
    }
    const size_t n = static_cast<size_t>(shape.n_layers * shape.n_blocks * shape.block_bytes());
    k_.assign(n, 0);
    v_.assign(n, 0);
}

size_t KvCache::offset(int64_t layer, int64_t block) const {
    NIBBLE_CHECK(layer >= 0 && layer < shape_.n_layers && block >= 0 && block < shape_.n_blocks,
                 "KV cache access out of range: layer {} of {}, block {} of {}", layer, shape_.n_layers, block,
                 shape_.n_blocks);
    return static_cast<size_t>((layer * shape_.n_blocks + block) * shape_.block_bytes());
}

uint8_t* KvCache::k_block(int64_t layer, int64_t block) { return k_.data() + offset(layer, block); }
uint8_t* KvCache::v_block(int64_t layer, int64_t block) { return v_.data() + offset(layer, block); }
const uint8_t* KvCache::k_block(int64_t layer, int64_t block) const { return k_.data() + offset(layer, block); }
const uint8_t* KvCache::v_block(int64_t layer, int64_t block) const { return v_.data() + offset(layer, block); }

}  // namespace nibble
