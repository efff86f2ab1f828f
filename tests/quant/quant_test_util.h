// Helpers shared by the quantize tests: golden fixture paths, a scratch folder, tensor comparisons.
#pragma once

#include <gtest/gtest.h>
#include <unistd.h>

#include <atomic>
#include <cstring>
#include <filesystem>
#include <string>

#include "checkpoint/safetensors.h"

namespace nibble::quant_test {

namespace fs = std::filesystem;

inline fs::path fixture(const std::string& name) {
    return fs::path(NIBBLE_SOURCE_DIR) / "tests" / "golden" / "fixtures" / name;
}

// A fresh folder under the temp directory, removed on destruction; unique per process and instance.
struct TempDir {
    fs::path path;
    explicit TempDir(const std::string& tag = "out") {
        static std::atomic<int> counter{0};
        path = fs::temp_directory_path() /
               ("nibble-quant-test-" + tag + "-" + std::to_string(::getpid()) + "-" + std::to_string(counter++));
        fs::remove_all(path);
    }
    ~TempDir() { fs::remove_all(path); }
};

// A one-element F32 tensor's value.
inline float read_scalar(const Checkpoint& c, const std::string& name) {
    const TensorInfo& t = c.get(name);
    EXPECT_EQ(t.dtype, DType::F32) << name;
    EXPECT_EQ(t.shape.numel(), 1) << name;
    float v;
    std::memcpy(&v, t.data, 4);
    return v;
}

inline bool same_bytes(const TensorInfo& a, const TensorInfo& b) {
    return a.dtype == b.dtype && a.shape == b.shape && a.nbytes == b.nbytes &&
           std::memcmp(a.data, b.data, a.nbytes) == 0;
}

}  // namespace nibble::quant_test
