// The model `nibble serve` runs when given no MODEL_DIR: a tiny Llama-architecture checkpoint with random
// weights and a byte-level BPE tokenizer with a ChatML chat template, created deterministically (same
// bytes on every machine) in a cache folder on first use. Its text is meaningless; it exists so that the
// API can be tried, and the tests run, on a fresh machine without downloading anything.
//
// Folder layout, as a Hugging Face checkpoint: config.json, generation_config.json, model.safetensors
// (BF16), tokenizer.json, tokenizer_config.json (with chat_template).
#pragma once

#include <filesystem>

namespace nibble::cli {

// $XDG_CACHE_HOME/nibble/default-model-v1, else $HOME/.cache/nibble/default-model-v1, else a folder under
// the system's temporary directory.
std::filesystem::path default_model_dir();

// Creates the model in `dir` unless it is already complete there; returns `dir`. The files are written to
// a sibling temporary folder and renamed into place, so a crash never leaves a half-written model.
std::filesystem::path ensure_default_model(const std::filesystem::path& dir);

}  // namespace nibble::cli
