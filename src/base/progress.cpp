#include "base/progress.h"

#include <unistd.h>

#include <cstdio>

namespace nibble {

ProgressBar::ProgressBar(std::string label, uint64_t total)
    : label_(std::move(label)), total_(total), tty_(::isatty(STDERR_FILENO) != 0),
      start_(std::chrono::steady_clock::now()), last_draw_(start_) {}

ProgressBar::~ProgressBar() { finish(); }

void ProgressBar::advance(uint64_t amount) {
    done_ += amount;
    draw(false);
}

void ProgressBar::finish() {
    if (finished_) return;
    done_ = total_;
    draw(true);
    if (tty_) std::fputc('\n', stderr);
    finished_ = true;
}

void ProgressBar::draw(bool force) {
    auto now = std::chrono::steady_clock::now();
    double frac = total_ == 0 ? 1.0 : static_cast<double>(done_) / static_cast<double>(total_);
    double secs = std::chrono::duration<double>(now - start_).count();
    if (tty_) {
        if (!force && now - last_draw_ < std::chrono::milliseconds(100)) return;
        last_draw_ = now;
        constexpr int kWidth = 30;
        int filled = static_cast<int>(frac * kWidth);
        std::fprintf(stderr, "\r%s [%.*s%*s] %5.1f%% %.1fs", label_.c_str(), filled,
                     "##############################", kWidth - filled, "", frac * 100.0, secs);
        std::fflush(stderr);
    } else {
        int decile = static_cast<int>(frac * 10.0);
        if (decile == last_decile_ && !force) return;
        if (decile == last_decile_) return;
        last_decile_ = decile;
        std::fprintf(stderr, "%s %3d%% %.1fs\n", label_.c_str(), decile * 10, secs);
    }
}

}  // namespace nibble
