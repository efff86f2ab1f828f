// `nibble quantize` from the command line: calibration text sets input_scale = amax/2688 of each linear's
// input over the tokenized paragraphs; --exclude and the error paths.
#include <gtest/gtest.h>

#include <array>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>

#include "base/thread_pool.h"
#include "checkpoint/safetensors.h"
#include "model/model.h"
#include "quant/calibrate.h"
#include "tokenizer/tokenizer.h"

namespace nibble {
namespace {

namespace fs = std::filesystem;

std::pair<int, std::string> nibble_cmd(const std::string& args) {
    const std::string cmd = std::string(NIBBLE_BINARY) + " " + args + " 2>&1";
    FILE* pipe = popen(cmd.c_str(), "r");
    std::string out;
    std::array<char, 4096> buf{};
    size_t n;
    while ((n = fread(buf.data(), 1, buf.size(), pipe)) > 0) out.append(buf.data(), n);
    return {pclose(pipe), out};
}

TEST(QuantizeCommand, CalibrationTextSetsInputScales) {
    const fs::path tmp = fs::temp_directory_path() / ("nibble-qcli-" + std::to_string(::getpid()));
    fs::remove_all(tmp);
    fs::create_directories(tmp);
    const std::string src = std::string(NIBBLE_SOURCE_DIR) + "/tests/golden/fixtures/llama_gqa/model";
    const std::string text =
        "The quick brown fox jumps over the lazy dog.\n\nOnce upon a time there was a small model.\nIt ran.\n";
    std::ofstream(tmp / "calib.txt") << text;
    auto [status, out] = nibble_cmd("quantize " + src + " " + (tmp / "q").string() + " --calibration-data " +
                                    (tmp / "calib.txt").string());
    ASSERT_EQ(status, 0) << out;
    EXPECT_NE(out.find("tensors quantized to NVFP4"), std::string::npos) << out;

    // The same calibration through the library: two paragraphs, each tokenized with special tokens.
    ThreadPool pool(2);
    auto model = load_model(src, pool);
    auto tok = tokenizer::Tokenizer::load(src);
    std::vector<std::vector<int32_t>> samples;
    for (const char* p : {"The quick brown fox jumps over the lazy dog.\n",
                          "Once upon a time there was a small model.\nIt ran.\n"}) {
        auto ids = tok.encode(p, true);
        samples.emplace_back(ids.begin(), ids.end());
    }
    const auto amax = calibrate_input_amax(*model, samples);
    Checkpoint q((tmp / "q").string());
    int checked = 0;
    for (const auto& [module, a] : amax) {
        if (!q.has(module + ".input_scale")) continue;
        float scale;
        std::memcpy(&scale, q.get(module + ".input_scale").data, 4);
        EXPECT_FLOAT_EQ(scale, a / 2688.0f) << module;
        ++checked;
    }
    EXPECT_EQ(checked, 14);
    fs::remove_all(tmp);
}

TEST(QuantizeCommand, ErrorsNameTheProblem) {
    const std::string src = std::string(NIBBLE_SOURCE_DIR) + "/tests/golden/fixtures/llama_gqa/model";
    auto [s1, o1] = nibble_cmd("quantize " + src + " /tmp/nibble-never --format mxfp8");
    EXPECT_NE(s1, 0);
    EXPECT_NE(o1.find("mxfp8"), std::string::npos) << o1;
    auto [s2, o2] = nibble_cmd("quantize /nonexistent-model /tmp/nibble-never");
    EXPECT_NE(s2, 0);
    EXPECT_NE(o2.find("/nonexistent-model"), std::string::npos) << o2;
    auto [s3, o3] = nibble_cmd("quantize " + src + " /tmp/nibble-never --calibration-data /nonexistent.txt");
    EXPECT_NE(s3, 0);
    EXPECT_NE(o3.find("/nonexistent.txt"), std::string::npos) << o3;
}

}  // namespace
}  // namespace nibble
