// Helpers for the safetensors tests: a fresh temporary folder per test, files built byte by byte, the
// Python reference script (tests/checkpoint/safetensors_reference.py), and error-message assertions.
#pragma once

#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <initializer_list>
#include <string>

#include "base/error.h"

namespace nibble::test {

// A folder unique to the running test, removed at the end of it.
class TempDir {
public:
    TempDir() {
        const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
        path_ = std::filesystem::temp_directory_path() /
                (std::string("nibble-st-") + std::to_string(::getpid()) + "-" + info->test_suite_name() + "-" +
                 info->name());
        std::filesystem::remove_all(path_);
        std::filesystem::create_directories(path_);
    }
    ~TempDir() { std::filesystem::remove_all(path_); }
    std::string operator/(const std::string& name) const { return (path_ / name).string(); }
    std::string str() const { return path_.string(); }

private:
    std::filesystem::path path_;
};

inline void write_bytes(const std::string& path, const std::string& bytes) {
    std::ofstream out(path, std::ios::binary);
    out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
    ASSERT_TRUE(out.good()) << path;
}

// A safetensors file: the 8-byte little-endian length of `header`, `header`, then `data_size` data bytes.
inline std::string safetensors_bytes(const std::string& header, size_t data_size) {
    std::string out(8, '\0');
    uint64_t n = header.size();
    for (int i = 0; i < 8; ++i) out[static_cast<size_t>(i)] = static_cast<char>(n >> (8 * i));
    out += header;
    for (size_t i = 0; i < data_size; ++i) out += static_cast<char>(i * 37 + 11);
    return out;
}

// Runs the reference script; true when it exits 0.
inline bool run_reference(const std::string& args) {
    std::string cmd = std::string("/usr/bin/python3 ") + NIBBLE_SOURCE_DIR +
                      "/tests/checkpoint/safetensors_reference.py " + args;
    return std::system(cmd.c_str()) == 0;
}

// Runs f, expects a nibble::Error whose message holds every one of `needles`.
template <class F>
void expect_error(F&& f, std::initializer_list<std::string> needles) {
    try {
        f();
        ADD_FAILURE() << "no error thrown; expected one mentioning " << *needles.begin();
    } catch (const Error& e) {
        std::string msg = e.what();
        for (const auto& n : needles) EXPECT_NE(msg.find(n), std::string::npos) << "'" << n << "' not in: " << msg;
    }
}

}  // namespace nibble::test
