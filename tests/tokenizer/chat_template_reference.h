// Test helper: renders cases with Python's jinja2 set up as transformers does
// (tests/tokenizer/chat_template_reference.py, run with /usr/bin/python3).
#pragma once

#include <nlohmann/json.hpp>

#include <gtest/gtest.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <memory>
#include <string>
#include <unistd.h>

namespace nibble::test {

// Returns one {"ok": text} or {"error": message} per case, or null when Python's jinja2 is missing.
inline nlohmann::ordered_json jinja2_reference(const nlohmann::ordered_json& cases) {
    if (std::system("/usr/bin/python3 -c 'import jinja2' >/dev/null 2>&1") != 0) return nullptr;
    auto dir = std::filesystem::temp_directory_path();
    auto input = dir / ("nibble_jinja_cases_" + std::to_string(::getpid()) + ".json");
    {
        std::ofstream out(input, std::ios::binary);
        out << cases.dump();
    }
    std::string cmd = std::string("/usr/bin/python3 ") + NIBBLE_SOURCE_DIR +
                      "/tests/tokenizer/chat_template_reference.py " + input.string();
    std::unique_ptr<FILE, int (*)(FILE*)> pipe(::popen(cmd.c_str(), "r"), ::pclose);
    std::string text;
    char buf[65536];
    size_t n;
    while ((n = std::fread(buf, 1, sizeof(buf), pipe.get())) > 0) text.append(buf, n);
    pipe.reset();
    std::filesystem::remove(input);
    return nlohmann::ordered_json::parse(text);
}

}  // namespace nibble::test
