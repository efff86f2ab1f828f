// The paged KV cache: per layer, K and V live in fixed-size blocks of `block_size` tokens; a sequence
// owns a block table mapping its logical block i (tokens i*block_size ...) to a physical block. Which blocks
// a sequence gets is the engine's business (engine/BlockPool); this class only stores them, in one of four
// element formats. Values are quantized when written (kv_encode_head) and dequantized inside attention, one
// (token, head) vector at a time (kv_decode_head); nothing dequantizes a whole block or cache.
//
// ---- Layout: the contract the CUDA kernels follow ----
// Memory of one layer's K (V alike, in a separate array): n_blocks blocks of block_bytes() bytes each,
// block b at byte b * block_bytes(); K of layer l starts at l * n_blocks * block_bytes(). Every block starts
// at a multiple of 16 bytes (block_bytes() is padded up to 16; the padding is never read). Within a block,
// "row" means one (slot, head) pair, row index r = slot * n_kv_heads + head (slot = position % block_size):
//   F32    [block_size, n_kv_heads, head_dim] float32
//   BF16   [block_size, n_kv_heads, head_dim] bfloat16 (round to nearest even)
//   FP8    [block_size, n_kv_heads, head_dim] E4M3 (float8_e4m3fn) bytes; value = e4m3 * layer_scale
//   NVFP4  data   [block_size, n_kv_heads, head_dim / 2] bytes, E2M1 pairs, element 2i in the low nibble;
//          then scales [block_size, n_kv_heads, head_dim / 16] E4M3 bytes, at byte offset
//          block_size * n_kv_heads * head_dim / 2 of the block;
//          value = e2m1 * e4m3(scale of its 16-group along head_dim) * layer_scale.
//          head_dim must be a multiple of 16. With head_dim a multiple of 32 (every model we serve) a row's
//          data is a whole number of 16-byte vectors (head_dim 128: 64 bytes = 4 x uint4) and the scale
//          area starts 16-byte aligned; a row's scales are head_dim / 16 consecutive bytes (head_dim 128:
//          8 bytes, one 8-byte load, or one 16-byte load for two rows of the same slot).
// The per-layer FP32 scales live on the host (KvCacheShape::k_scales / v_scales, [n_layers]) and are kernel
// arguments; layer_scale(...) below gives the multiplier each format uses.
//
// ---- Scales ----
// kv_scale (k_scales[l], v_scales[l]) is the FP8 convention of vLLM and ModelOpt: the checkpoint's
// `self_attn.k_proj.k_scale` / `v_proj.v_scale` (ModelOpt) or `self_attn.k_scale` / `v_scale`
// (compressed-tensors), calibrated as amax / 448, and 1.0 when the checkpoint has none (vLLM's default).
//   FP8:   stored = e4m3_satfinite(x / kv_scale); |x| beyond 448 * kv_scale saturates to +-448 * kv_scale.
//   NVFP4: layer_scale = kv_scale / 6, i.e. the amax kv_scale describes (448 * kv_scale) is placed at the
//          top of NVFP4's range (E2M1 6 x E4M3 448), exactly as ModelOpt's weight recipe places a tensor's
//          amax (global = amax / (6 * 448)). One scale source for both quantized formats, no extra
//          calibration: with the default kv_scale 1.0 the per-16 scales keep E4M3's full 3-bit precision
//          for group maxima from 6 * 2^-6 * layer_scale = 2^-6 (0.0156) up to 448, and degrade gracefully
//          (E4M3 subnormals) down to 2^-9. Groups are quantized by nvfp4_quantize_row (tensor/nvfp4.h): a
//          group scale beyond 448 saturates to 448 and elements to +-6, so |x| beyond 448 * kv_scale
//          saturates to +-448 * kv_scale, the same point as FP8.
// An element that is not finite is an error when written to FP8 or NVFP4 (the quantizers refuse it).
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string_view>
#include <vector>

namespace nibble {

enum class KvDtype {
    F32,    // the CPU reference's exact cache
    Bf16,
    Fp8,    // E4M3 with a per-layer scale
    Nvfp4,  // E2M1 with E4M3 scales per 16 values along head_dim and a per-layer FP32 scale
};

// "f32", "bf16", "fp8", "nvfp4".
std::string_view kv_dtype_name(KvDtype dtype);
// Accepts the names above and vLLM's spellings "float32", "bfloat16", "fp8_e4m3"; nullopt otherwise.
std::optional<KvDtype> kv_dtype_from_name(std::string_view name);

struct KvCacheShape {
    int64_t n_layers = 0;
    int64_t n_blocks = 0;
    int64_t block_size = 16;
    int64_t n_kv_heads = 0;
    int64_t head_dim = 0;
    KvDtype dtype = KvDtype::F32;
    // [n_layers] FP8-convention scales (see above); empty means 1.0 for every layer. Unused by F32/BF16.
    std::vector<float> k_scales = {}, v_scales = {};

    // Bytes of one row (one token's one head) as stored: data and, for NVFP4, its scales.
    int64_t row_data_bytes() const;
    int64_t row_scale_bytes() const;
    // Bytes of one block of K (or V) of one layer, padded up to a multiple of 16.
    int64_t block_bytes() const;
    // Bytes one token adds to the cache: K and V of every layer (unpadded; the plan's number).
    int64_t bytes_per_token() const { return 2 * n_layers * n_kv_heads * (row_data_bytes() + row_scale_bytes()); }
    // Bytes of K and V for all layers and blocks.
    int64_t total_bytes() const { return 2 * n_layers * n_blocks * block_bytes(); }
    // The FP8-convention scale of a layer (1.0 when none was given).
    float k_kv_scale(int64_t layer) const;
    float v_kv_scale(int64_t layer) const;
};

// The multiplier the stored format of `dtype` applies (see the layout above): kv_scale for FP8, kv_scale / 6
// for NVFP4, 1 for F32 and BF16.
float kv_layer_scale(KvDtype dtype, float kv_scale);

// Writes x[head_dim] as row (slot, head) of a block (`block` points at its first byte).
void kv_encode_head(const KvCacheShape& shape, float layer_scale, const float* x, uint8_t* block, int64_t slot,
                    int64_t head);
// Reads row (slot, head) of a block into out[head_dim], as float32 (exact for F32/BF16; one rounding of the
// exact product for FP8 and NVFP4).
void kv_decode_head(const KvCacheShape& shape, float layer_scale, const uint8_t* block, int64_t slot,
                    int64_t head, float* out);

class KvCache {
public:
    // Checks the shape (positive sizes, head_dim a multiple of 16 for NVFP4, scales finite and positive,
    // one per layer when given) and allocates zeroed storage.
    explicit KvCache(const KvCacheShape& shape);
    const KvCacheShape& shape() const { return shape_; }
    // First byte of one block (block_bytes() bytes, layout above).
    uint8_t* k_block(int64_t layer, int64_t block);
    uint8_t* v_block(int64_t layer, int64_t block);
    const uint8_t* k_block(int64_t layer, int64_t block) const;
    const uint8_t* v_block(int64_t layer, int64_t block) const;
    // kv_layer_scale of the layer's K / V.
    float k_layer_scale(int64_t layer) const { return k_layer_scale_[static_cast<size_t>(layer)]; }
    float v_layer_scale(int64_t layer) const { return v_layer_scale_[static_cast<size_t>(layer)]; }

private:
    size_t offset(int64_t layer, int64_t block) const;
    KvCacheShape shape_;
    std::vector<float> k_layer_scale_, v_layer_scale_;  // [n_layers]
    std::vector<uint8_t> k_, v_;
};

}  // namespace nibble
