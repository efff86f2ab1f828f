#include "base/error.h"
#include "ops/embed/embed.h"
#include "tensor/convert.h"

namespace nibble {

void embed_cpu(const Tensor& table, const int32_t* tokens, int64_t m, float* out) {
    const int64_t vocab = table.shape[0], d = table.shape[1];
    const size_t row_bytes = static_cast<size_t>(d) * dtype_size(table.dtype);
    for (int64_t i = 0; i < m; ++i) {
        NIBBLE_CHECK(tokens[i] >= 0 && tokens[i] < vocab, "token {} at index {} is outside the vocabulary [0, {})",
                     tokens[i], i, vocab);
        decode_to_float(static_cast<const uint8_t*>(table.data) + static_cast<size_t>(tokens[i]) * row_bytes,
                        table.dtype, d, out + i * d);
    }
}

}  // namespace nibble
