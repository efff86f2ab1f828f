// What `nibble tune` shares with `nibble serve --tune` (cli/tune.cpp).
#pragma once

#include <cstdint>
#include <optional>
#include <string>

#include "server/serve_args.h"
#include "tune/tune_cache.h"

namespace nibble::cli {

// The serve flags that decide which shapes a model runs (tune/model_shapes.h).
struct TuneShapeFlags {
    int64_t max_num_seqs = 256;
    int64_t max_num_batched_tokens = 2048;
    int64_t max_model_len = 0;            // 0: the model's max_position_embeddings
    std::string kv_cache_dtype = "auto";
};

// `nibble serve --tune`: off uses built-in choices; cached loads this GPU's tune cache (one warning when it
// is unusable, one info line either way); full tunes MODEL_DIR's shapes first and writes the cache, as
// `nibble tune MODEL_DIR` does. Nothing without a CUDA device (or in a CPU-only build).
std::optional<tune::TuneCache> serve_tune_cache(server::TuneMode mode, const std::string& model_dir,
                                                const TuneShapeFlags& flags);

}  // namespace nibble::cli
