// Helpers of the CLI tests: run the built `nibble` binary with arguments and collect its exit code and its
// output (stdout and stderr together), and find the golden fixtures' model folders.
#pragma once

#include <sys/wait.h>

#include <array>
#include <cstdio>
#include <filesystem>
#include <string>

namespace nibble::test {

struct CommandResult {
    int rc = -1;      // exit code; -1 when the process did not exit normally or could not start
    std::string out;  // stdout and stderr
};

inline CommandResult run_nibble(const std::string& args) {
    const std::string cmd = std::string(NIBBLE_BINARY) + " " + args + " 2>&1";
    CommandResult r;
    FILE* p = popen(cmd.c_str(), "r");
    if (p == nullptr) return r;
    std::array<char, 4096> buf{};
    size_t n = 0;
    while ((n = fread(buf.data(), 1, buf.size(), p)) > 0) r.out.append(buf.data(), n);
    const int status = pclose(p);
    r.rc = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
    return r;
}

inline std::filesystem::path fixture_model(const std::string& name) {
    return std::filesystem::path(NIBBLE_SOURCE_DIR) / "tests" / "golden" / "fixtures" / name / "model";
}

}  // namespace nibble::test
