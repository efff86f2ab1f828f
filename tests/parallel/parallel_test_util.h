// Helpers of the parallel/ tests: a decoder config from its shape fields alone, and the message a call throws.
#pragma once

#include <cstdint>
#include <string>

#include "base/error.h"
#include "checkpoint/model_config.h"

namespace nibble::test {

// The shape fields every decoder config of these tests sets, in ModelConfig's order; what a test leaves out
// keeps ModelConfig's default.
struct DecoderShape {
    Arch arch = Arch::Llama;
    std::string arch_name;
    int64_t n_embd = 0, n_layers = 0, n_heads = 0, n_kv_heads = 0, head_dim = 0, n_ff = 0, vocab_size = 0;
    int64_t max_position_embeddings = 0;
    DType dtype = DType::F32;
};

inline ModelConfig decoder_config(const DecoderShape& s) {
    ModelConfig c;
    c.arch = s.arch;
    c.arch_name = s.arch_name;
    c.n_embd = s.n_embd;
    c.n_layers = s.n_layers;
    c.n_heads = s.n_heads;
    c.n_kv_heads = s.n_kv_heads;
    c.head_dim = s.head_dim;
    c.n_ff = s.n_ff;
    c.vocab_size = s.vocab_size;
    c.max_position_embeddings = s.max_position_embeddings;
    c.dtype = s.dtype;
    return c;
}

// The message of the nibble::Error that f throws; "" when it throws none.
template <class F>
std::string error_of(F&& f) {
    try {
        f();
    } catch (const Error& e) {
        return e.what();
    }
    return "";
}

}  // namespace nibble::test
