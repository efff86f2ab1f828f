#include "quant/calibrate.h"

#include <algorithm>
#include <cmath>
#include <mutex>

#include "base/error.h"

namespace nibble {

namespace {
class AmaxObserver final : public LinearInputObserver {
public:
    void observe(const LinearWeight& w, const float* x, int64_t m) override {
        float amax = 0.0f;
        for (int64_t i = 0; i < m * w.n_in; ++i) amax = std::max(amax, std::fabs(x[i]));
        float& slot = amax_[w.name];
        slot = std::max(slot, amax);
    }
    std::map<std::string, float> amax_;
};
}  // namespace

std::map<std::string, float> calibrate_input_amax(Model& model, const std::vector<std::vector<int32_t>>& samples) {
    AmaxObserver observer;
    model.set_linear_input_observer(&observer);
    try {
        for (const auto& tokens : samples) {
            if (tokens.empty()) continue;
            const int64_t n = static_cast<int64_t>(tokens.size());
            constexpr int64_t kBlock = 16;
            const int64_t n_blocks = (n + kBlock - 1) / kBlock;
            KvCache cache(model.kv_cache_shape(n_blocks, kBlock));
            std::vector<int32_t> table(static_cast<size_t>(n_blocks));
            for (int64_t b = 0; b < n_blocks; ++b) table[static_cast<size_t>(b)] = static_cast<int32_t>(b);
            ForwardSequence seq{.tokens = tokens, .kv = {.block_table = table.data(), .n_table = n_blocks, .start_pos = 0}};
            std::vector<float> logits;
            model.forward(std::span(&seq, 1), cache, logits);
        }
    } catch (...) {
        model.set_linear_input_observer(nullptr);
        throw;
    }
    model.set_linear_input_observer(nullptr);
    return observer.amax_;
}

}  // namespace nibble
