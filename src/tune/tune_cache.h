// The tuning cache: the chosen variant per (op, shape bucket, dtype), persisted as JSON so that a second
// start does no tuning. One file per GPU model and SM count under $XDG_CACHE_HOME/nibble/tune/ (default
// ~/.cache/nibble/tune/), keyed inside by GPU name, compute capability, SM count, driver and CUDA runtime
// versions and nibble's build id. A file that is not valid JSON, is not a nibble tune cache, or was written
// under another key is ignored with one warning that says why (a new driver or build re-tunes).
//
// File format (version 1):
//   {"format": "nibble-tune-cache", "version": 1,
//    "key": {"gpu": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0", "sm_count": 132,
//            "driver_version": 13000, "runtime_version": 13000, "build_id": "0.1.0+abc1234.r5e1f..."},
//    "choices": [{"op": "gemv_nvfp4", "bucket": "m1.n4096.k4096", "dtype": "bf16", "variant": "cuda_core.mt1",
//                 "splits": 1, "median_us": 9.8}, ...]}
#pragma once

#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "tune/device_profile.h"
#include "tune/registry.h"

namespace nibble::tune {

struct CacheKey {
    std::string gpu_name;
    int cc_major = 0, cc_minor = 0;
    int sm_count = 0;
    int driver_version = 0, runtime_version = 0;
    std::string build_id;
    bool operator==(const CacheKey&) const = default;
    std::string describe() const;  // one line for messages
};

// The key of `device` under this build (build_id()).
CacheKey cache_key_for(const DeviceProfile& device);

// nibble's version, the git commit the build was configured at (when known) and a fingerprint of the
// kernel registry (every variant's name and needs): a changed variant list invalidates old caches.
std::string build_id();

struct TuneChoice {
    OpKind op = OpKind::GemvNvfp4;
    std::string bucket;   // shape_bucket()
    std::string dtype;    // shape_dtype()
    std::string variant;  // KernelVariant::name
    int splits = 1;       // attention key-range splits
    double median_us = 0; // measured time of the choice
};

class TuneCache {
public:
    explicit TuneCache(CacheKey key) : key_(std::move(key)) {}
    const CacheKey& key() const { return key_; }
    // Adds or replaces the choice of (op, bucket, dtype).
    void put(const TuneChoice& choice);
    const TuneChoice* find(OpKind op, std::string_view bucket, std::string_view dtype) const;
    const std::vector<TuneChoice>& choices() const { return choices_; }

    std::string to_json() const;
    // Parses a cache file's text. Nothing, with `why` set, when it is corrupt or keyed differently than
    // `expected`; choices naming an op or variant this build does not have are dropped (noted in `why`).
    static std::optional<TuneCache> from_json(std::string_view text, const CacheKey& expected, std::string& why);

private:
    CacheKey key_;
    std::vector<TuneChoice> choices_;
};

// $XDG_CACHE_HOME/nibble/tune when XDG_CACHE_HOME is set to an absolute path, else $HOME/.cache/nibble/tune.
// A nibble::Error when neither gives a directory.
std::string tune_cache_dir();

// dir/<gpu name>-cc<major><minor>-sm<count>.json (the name in lower case, runs of other characters as '-').
std::string tune_cache_path(const std::string& dir, const CacheKey& key);

// Reads `path`. Nothing when the file does not exist (silently) or is unusable (one warning saying why).
std::optional<TuneCache> load_tune_cache(const std::string& path, const CacheKey& expected);

// Writes `cache` to `path` (creating directories; through a temporary file and a rename, so a reader never
// sees half a file). A nibble::Error naming the path when it cannot.
void save_tune_cache(const TuneCache& cache, const std::string& path);

}  // namespace nibble::tune
