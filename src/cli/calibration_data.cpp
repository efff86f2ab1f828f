#include "cli/calibration_data.h"

#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "base/error.h"
#include "tokenizer/tokenizer.h"

namespace nibble::cli {

namespace {

std::vector<std::vector<int32_t>> load_jsonl(const std::string& path, int64_t max_tokens) {
    std::ifstream in(path);
    NIBBLE_CHECK(in.good(), "--calibration-data: cannot open {}", path);
    std::vector<std::vector<int32_t>> samples;
    std::string line;
    for (int64_t line_no = 1; std::getline(in, line); ++line_no) {
        if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
        nlohmann::json j;
        try {
            j = nlohmann::json::parse(line);
        } catch (const nlohmann::json::exception& e) {
            fail("{}:{}: not valid JSON: {}", path, line_no, e.what());
        }
        NIBBLE_CHECK(j.is_object() && j.contains("ids") && j["ids"].is_array(),
                     "{}:{}: expected an object with an \"ids\" array", path, line_no);
        std::vector<int32_t> ids;
        for (const auto& v : j["ids"]) {
            NIBBLE_CHECK(v.is_number_integer(), "{}:{}: ids[{}] is not an integer", path, line_no, ids.size());
            ids.push_back(v.get<int32_t>());
            if (static_cast<int64_t>(ids.size()) == max_tokens) break;
        }
        if (!ids.empty()) samples.push_back(std::move(ids));
    }
    NIBBLE_CHECK(!samples.empty(), "--calibration-data {}: no samples", path);
    return samples;
}

}  // namespace

std::vector<std::vector<int32_t>> load_calibration_samples(const std::string& path, const std::string& model_dir,
                                                           int64_t max_tokens) {
    NIBBLE_CHECK(max_tokens > 0, "--calibration-max-tokens must be positive");
    if (path.size() >= 6 && path.compare(path.size() - 6, 6, ".jsonl") == 0) return load_jsonl(path, max_tokens);
    // Plain text: samples are paragraphs (separated by blank lines), tokenized with the model's tokenizer.
    std::ifstream in(path);
    NIBBLE_CHECK(in.good(), "--calibration-data: cannot open {}", path);
    const auto tok = tokenizer::Tokenizer::load(model_dir);
    std::vector<std::vector<int32_t>> samples;
    std::string line, paragraph;
    auto flush = [&] {
        if (paragraph.find_first_not_of(" \t\r\n") != std::string::npos) {
            const auto ids = tok.encode(paragraph, true);
            const size_t n = std::min(ids.size(), static_cast<size_t>(max_tokens));
            samples.emplace_back(ids.begin(), ids.begin() + static_cast<std::ptrdiff_t>(n));
        }
        paragraph.clear();
    };
    while (std::getline(in, line)) {
        if (line.find_first_not_of(" \t\r") == std::string::npos) flush();
        else paragraph += line + "\n";
    }
    flush();
    NIBBLE_CHECK(!samples.empty(), "--calibration-data {}: no text", path);
    return samples;
}

}  // namespace nibble::cli
