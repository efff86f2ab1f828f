// CPU reference of the W4A4 FP4 tensor-core GEMV (gemv_fp4mma.h).
#include "ops/linear/gemv_fp4mma.h"

#include <cmath>
#include <vector>

#include "base/error.h"
#include "ops/linear/nvfp4_activation_quant.h"

namespace nibble {

float fp4mma_quantize_activation_row(const float* x, int64_t k, uint8_t* packed, uint8_t* scales) {
    NIBBLE_CHECK(k >= 0 && k % fp4act::kBlock == 0,
                 "fp4mma_quantize_activation_row: row length {} is not a multiple of {}", k, fp4act::kBlock);
    float amax = 0.0f;
    for (int64_t i = 0; i < k; ++i) {
        NIBBLE_CHECK(std::isfinite(x[i]), "fp4mma_quantize_activation_row: element {} is {}, not finite", i, x[i]);
        amax = std::fmax(amax, std::fabs(x[i]));
    }
    const float global = fp4act::global_scale_of(amax);
    for (int64_t b = 0; b < k / fp4act::kBlock; ++b)
        scales[b] = fp4act::quantize_block(x + b * fp4act::kBlock, global, packed + b * fp4act::kBlock / 2);
    return global;
}

void gemv_fp4mma_reference(const float* x, int64_t m, int64_t k, const uint8_t* w_packed, const uint8_t* w_scales,
                           float w_global, int64_t n, const float* bias, float* y) {
    NIBBLE_CHECK(m >= 0 && n >= 0 && k > 0 && k % 64 == 0,
                 "gemv_fp4mma_reference: shape m {} n {} k {} (k must be a positive multiple of 64)", m, n, k);
    std::vector<uint8_t> xq(static_cast<size_t>(k / 2)), xs(static_cast<size_t>(k / 16));
    for (int64_t t = 0; t < m; ++t) {
        const float xg = fp4mma_quantize_activation_row(x + t * k, k, xq.data(), xs.data());
        for (int64_t r = 0; r < n; ++r) {
            const uint8_t* wq = w_packed + r * (k / 2);
            const uint8_t* ws = w_scales + r * (k / 16);
            float acc = 0.0f;
            for (int64_t b = 0; b < k / 16; ++b) {
                // Within a block every product e2m1 * e2m1 is a multiple of 1/4 of magnitude <= 36: the
                // block's sum of 16 (<= 576, 12 significant bits) is exact in float32, and so is its product
                // with the two E4M3 scales (4 significant bits each): one rounding per block, in `acc`.
                float block = 0.0f;
                for (int64_t i = 0; i < 8; ++i) {
                    const uint8_t a = xq[static_cast<size_t>(b * 8 + i)], w = wq[b * 8 + i];
                    block += fp4act::e2m1_decode(a & 0x0f) * fp4act::e2m1_decode(w & 0x0f);
                    block += fp4act::e2m1_decode(a >> 4) * fp4act::e2m1_decode(w >> 4);
                }
                const uint8_t wsb = ws[b];
                NIBBLE_CHECK((wsb & 0x80) == 0 && wsb != 0x7f,
                             "gemv_fp4mma_reference: weight row {} block {} has scale code {:#04x}; the tensor core "
                             "reads unsigned E4M3 (.ue4m3) scales", r, b, wsb);
                const float w_scale = fp4act::e4m3_decode_positive(wsb);
                acc += block * fp4act::e4m3_decode_positive(xs[static_cast<size_t>(b)]) * w_scale;
            }
            y[t * n + r] = acc * w_global * xg + (bias ? bias[r] : 0.0f);
        }
    }
}

}  // namespace nibble
