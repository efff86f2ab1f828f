// CPU reference of the sigmoid / grouped top-k router (moe.h).
#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "base/error.h"
#include "ops/moe/moe.h"

namespace nibble {

MoeRouting moe_route_sigmoid_cpu(const float* logits, int64_t m, int64_t n_experts, int64_t top_k,
                                 const float* correction_bias, int64_t n_group, int64_t topk_group,
                                 bool norm_topk_prob, float routed_scaling_factor) {
    NIBBLE_CHECK(n_group > 0 && n_experts % n_group == 0 && topk_group >= 1 && topk_group <= n_group,
                 "moe router: {} experts in {} groups, keeping {}", n_experts, n_group, topk_group);
    const int64_t per_group = n_experts / n_group;
    NIBBLE_CHECK(top_k >= 1 && top_k <= topk_group * per_group, "moe router: top_k {} of {} eligible experts", top_k,
                 topk_group * per_group);
    MoeRouting r;
    r.m = m;
    r.top_k = top_k;
    r.ids.resize(static_cast<size_t>(m * top_k));
    r.weights.resize(static_cast<size_t>(m * top_k));
    std::vector<float> s(static_cast<size_t>(n_experts)), choice(static_cast<size_t>(n_experts));
    std::vector<float> group_score(static_cast<size_t>(n_group));
    std::vector<int64_t> order(static_cast<size_t>(std::max(n_experts, n_group)));
    std::vector<char> eligible(static_cast<size_t>(n_experts));
    for (int64_t t = 0; t < m; ++t) {
        for (int64_t e = 0; e < n_experts; ++e) {
            const float v = 1.0f / (1.0f + std::exp(-logits[t * n_experts + e]));
            s[static_cast<size_t>(e)] = v;
            choice[static_cast<size_t>(e)] = v + (correction_bias != nullptr ? correction_bias[e] : 0.0f);
        }
        // Group score: the sum of the group's two best choice values (one when the group has one expert).
        for (int64_t g = 0; g < n_group; ++g) {
            float best = -INFINITY, second = -INFINITY;
            for (int64_t e = g * per_group; e < (g + 1) * per_group; ++e) {
                const float v = choice[static_cast<size_t>(e)];
                if (v > best) {
                    second = best;
                    best = v;
                } else if (v > second) {
                    second = v;
                }
            }
            group_score[static_cast<size_t>(g)] = per_group >= 2 ? best + second : best;
        }
        std::iota(order.begin(), order.begin() + n_group, 0);
        std::stable_sort(order.begin(), order.begin() + n_group, [&](int64_t a, int64_t b) {
            return group_score[static_cast<size_t>(a)] > group_score[static_cast<size_t>(b)];
        });
        std::fill(eligible.begin(), eligible.end(), 0);
        for (int64_t i = 0; i < topk_group; ++i) {
            const int64_t g = order[static_cast<size_t>(i)];
            std::fill(eligible.begin() + g * per_group, eligible.begin() + (g + 1) * per_group, 1);
        }
        std::vector<int64_t> cand;
        for (int64_t e = 0; e < n_experts; ++e)
            if (eligible[static_cast<size_t>(e)]) cand.push_back(e);
        std::stable_sort(cand.begin(), cand.end(), [&](int64_t a, int64_t b) {
            return choice[static_cast<size_t>(a)] > choice[static_cast<size_t>(b)];
        });
        float sum = 0.0f;
        for (int64_t j = 0; j < top_k; ++j) sum += s[static_cast<size_t>(cand[static_cast<size_t>(j)])];
        const float denom = norm_topk_prob ? sum + 1e-20f : 1.0f;
        for (int64_t j = 0; j < top_k; ++j) {
            const int64_t e = cand[static_cast<size_t>(j)];
            r.ids[static_cast<size_t>(t * top_k + j)] = static_cast<int32_t>(e);
            r.weights[static_cast<size_t>(t * top_k + j)] = s[static_cast<size_t>(e)] / denom * routed_scaling_factor;
        }
    }
    return r;
}

}  // namespace nibble
