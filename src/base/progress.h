// A progress bar on stderr for long jobs (weight loading, quantization). Redraws at most ~10 times a
// second and only when stderr is a terminal; otherwise prints a line at each 10% step.
#pragma once

#include <chrono>
#include <cstdint>
#include <string>

namespace nibble {

class ProgressBar {
public:
    ProgressBar(std::string label, uint64_t total);
    ~ProgressBar();
    void advance(uint64_t amount);
    void finish();

private:
    void draw(bool force);
    std::string label_;
    uint64_t total_, done_ = 0;
    bool tty_, finished_ = false;
    int last_decile_ = -1;
    std::chrono::steady_clock::time_point start_, last_draw_;
};

}  // namespace nibble
