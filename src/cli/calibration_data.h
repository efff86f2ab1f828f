// Calibration samples for `nibble quantize --calibration-data FILE`: token id sequences, each cut to at
// most max_tokens.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace nibble::cli {

// FILE ending in .jsonl: one {"ids": [...]} object per line. Otherwise plain text, split into samples at
// blank lines and tokenized with MODEL_DIR's tokenizer.json.
std::vector<std::vector<int32_t>> load_calibration_samples(const std::string& path, const std::string& model_dir,
                                                           int64_t max_tokens);

}  // namespace nibble::cli
