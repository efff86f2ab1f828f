// CPU reference of the MoE op (moe.h): routing in float32, experts over gathered token rows.
#include <algorithm>
#include <cmath>
#include <numeric>

#include "base/error.h"
#include "ops/activation/activation.h"
#include "ops/moe/moe.h"

namespace nibble {

MoeRouting moe_route_softmax_cpu(const float* logits, int64_t m, int64_t n_experts, int64_t top_k,
                                 bool norm_topk_prob) {
    NIBBLE_CHECK(top_k >= 1 && top_k <= n_experts, "MoE router: top_k {} must be in 1..{} (the expert count)",
                 top_k, n_experts);
    MoeRouting r;
    r.m = m;
    r.top_k = top_k;
    r.ids.resize(static_cast<size_t>(m * top_k));
    r.weights.resize(static_cast<size_t>(m * top_k));
    std::vector<float> p(static_cast<size_t>(n_experts));
    std::vector<int32_t> order(static_cast<size_t>(n_experts));
    for (int64_t t = 0; t < m; ++t) {
        const float* l = logits + t * n_experts;
        const float mx = *std::max_element(l, l + n_experts);
        float sum = 0.0f;
        for (int64_t e = 0; e < n_experts; ++e) {
            p[static_cast<size_t>(e)] = std::exp(l[e] - mx);
            sum += p[static_cast<size_t>(e)];
        }
        for (float& v : p) v /= sum;
        std::iota(order.begin(), order.end(), 0);
        std::partial_sort(order.begin(), order.begin() + top_k, order.end(), [&](int32_t a, int32_t b) {
            const float pa = p[static_cast<size_t>(a)], pb = p[static_cast<size_t>(b)];
            return pa > pb || (pa == pb && a < b);
        });
        float chosen = 0.0f;
        for (int64_t j = 0; j < top_k; ++j) chosen += p[static_cast<size_t>(order[static_cast<size_t>(j)])];
        for (int64_t j = 0; j < top_k; ++j) {
            const int32_t e = order[static_cast<size_t>(j)];
            r.ids[static_cast<size_t>(t * top_k + j)] = e;
            const float w = p[static_cast<size_t>(e)];
            r.weights[static_cast<size_t>(t * top_k + j)] = norm_topk_prob ? w / chosen : w;
        }
    }
    return r;
}

void moe_experts_cpu(const float* x, int64_t n_embd, std::span<const MoeExpertWeights> experts,
                     const MoeRouting& routing, MoeActivation act, const MoeLinearFn& linear, float* y) {
    const int64_t m = routing.m, k = routing.top_k;
    const auto n_experts = static_cast<int64_t>(experts.size());
    std::fill(y, y + m * n_embd, 0.0f);
    // Tokens (and their router weight) per expert, in token order.
    std::vector<std::vector<std::pair<int64_t, float>>> routed(static_cast<size_t>(n_experts));
    for (int64_t t = 0; t < m; ++t)
        for (int64_t j = 0; j < k; ++j) {
            const int32_t e = routing.ids[static_cast<size_t>(t * k + j)];
            NIBBLE_CHECK(e >= 0 && e < n_experts, "MoE: expert id {} out of range (n_experts {})", e, n_experts);
            routed[static_cast<size_t>(e)].emplace_back(t, routing.weights[static_cast<size_t>(t * k + j)]);
        }

    std::vector<float> xs, gate, up, out;
    for (int64_t e = 0; e < n_experts; ++e) {
        const auto& rows = routed[static_cast<size_t>(e)];
        if (rows.empty()) continue;
        const MoeExpertWeights& w = experts[static_cast<size_t>(e)];
        const auto n = static_cast<int64_t>(rows.size());
        const int64_t n_ff = w.up.n_out;
        NIBBLE_CHECK(w.up.n_in == n_embd && w.down.n_in == n_ff && w.down.n_out == n_embd,
                     "MoE expert {}: shapes up [{}, {}], down [{}, {}] do not fit hidden size {}", e, w.up.n_out,
                     w.up.n_in, w.down.n_out, w.down.n_in, n_embd);
        xs.resize(static_cast<size_t>(n * n_embd));
        for (int64_t i = 0; i < n; ++i)
            std::copy_n(x + rows[static_cast<size_t>(i)].first * n_embd, n_embd, xs.data() + i * n_embd);
        up.resize(static_cast<size_t>(n * n_ff));
        linear(w.up, xs.data(), n, up.data());
        switch (act) {
            case MoeActivation::SwiGlu:
                NIBBLE_CHECK(w.gate.n_out == n_ff && w.gate.n_in == n_embd,
                             "MoE expert {}: gate [{}, {}] does not match up [{}, {}]", e, w.gate.n_out,
                             w.gate.n_in, n_ff, n_embd);
                gate.resize(up.size());
                linear(w.gate, xs.data(), n, gate.data());
                silu_mul_cpu(gate.data(), up.data(), n * n_ff, up.data());
                break;
            case MoeActivation::Relu2:
                for (float& v : up) v = v > 0.0f ? v * v : 0.0f;
                break;
        }
        out.resize(static_cast<size_t>(n * n_embd));
        linear(w.down, up.data(), n, out.data());
        for (int64_t i = 0; i < n; ++i) {
            const auto [t, rw] = rows[static_cast<size_t>(i)];
            float* yt = y + t * n_embd;
            const float* ot = out.data() + i * n_embd;
            for (int64_t c = 0; c < n_embd; ++c) yt[c] += rw * ot[c];
        }
    }
}

std::vector<int32_t> moe_localize_ids_cpu(std::span<const int32_t> ids, int64_t begin, int64_t end) {
    std::vector<int32_t> local(ids.size());
    for (size_t i = 0; i < ids.size(); ++i)
        local[i] = ids[i] >= begin && ids[i] < end ? static_cast<int32_t>(ids[i] - begin) : -1;
    return local;
}

}  // namespace nibble
