#include "tune/tuner.h"

#include <fmt/format.h>

#include <algorithm>
#include <stdexcept>

#include "base/log.h"

namespace nibble::tune {

namespace {

// Thrown inside a timed run when a launch fails after the probe succeeded.
struct LaunchFailed : std::runtime_error {
    using std::runtime_error::runtime_error;
};

bool name_starts_with(const KernelVariant& v, std::string_view prefix) { return v.name.substr(0, prefix.size()) == prefix; }

}  // namespace

const KernelVariant* heuristic_variant(const OpShape& shape, std::span<const KernelVariant* const> eligible) {
    if (eligible.empty()) return nullptr;
    if (shape.op == OpKind::GemvNvfp4) {
        // gemv_nvfp4: m = 1 below 65536 rows on CUDA cores (measured 12-15% faster), tensor cores elsewhere.
        const bool cuda_core = shape.m == 1 && shape.n < 65536;
        for (const KernelVariant* v : eligible)
            if (name_starts_with(*v, cuda_core ? "cuda_core." : "mma.")) return v;
    }
    if (shape.op == OpKind::AttentionPrefill) {
        // paged_attention's PrefillKernel::Auto: the narrow kernel for a BF16 cache, the wide one otherwise.
        for (const KernelVariant* v : eligible)
            if (name_starts_with(*v, shape.kv_dtype == KvDtype::Bf16 ? "prefill_mma." : "prefill_wide."))
                return v;
    }
    if (shape.op == OpKind::AttentionDecode && shape.kv_dtype != KvDtype::Bf16) {
        // paged_attention's DecodeKernel::Auto: the pipelined kernel for FP8 / NVFP4 caches.
        for (const KernelVariant* v : eligible)
            if (name_starts_with(*v, "decode_pipe.")) return v;
    }
    return eligible.front();
}

std::vector<const KernelVariant*> candidate_order(const OpShape& shape, const DeviceProfile& device,
                                                  const BuildTargets& build, const TuneCache* cache,
                                                  const FailedVariants& failed, int& splits) {
    splits = 0;
    std::vector<const KernelVariant*> eligible;
    for (const KernelVariant* v : eligible_variants(shape, device, build))
        if (!failed.failed(*v)) eligible.push_back(v);
    std::vector<const KernelVariant*> order;
    auto add = [&](const KernelVariant* v) {
        if (v && std::find(order.begin(), order.end(), v) == order.end()) order.push_back(v);
    };
    if (cache) {
        if (const TuneChoice* c = cache->find(shape.op, shape_bucket(shape), shape_dtype(shape))) {
            const KernelVariant* v = find_variant(shape.op, c->variant);
            if (v && std::find(eligible.begin(), eligible.end(), v) != eligible.end()) {
                add(v);
                splits = c->splits;
            }
        }
    }
    add(heuristic_variant(shape, eligible));
    for (const KernelVariant* v : eligible) add(v);
    return order;
}

ShapeTuning tune_shape(const OpShape& shape, std::span<const KernelVariant* const> eligible, VariantRunner& runner,
                       KernelTimer& timer, FailedVariants& failed, const TimingOptions& options) {
    ShapeTuning out;
    out.shape = shape;
    if (eligible.empty()) return out;
    runner.prepare(shape);
    for (const KernelVariant* v : eligible) {
        if (failed.failed(*v)) {
            out.failures.push_back(fmt::format("{}: failed earlier ({})", v->name, failed.reason(*v)));
            continue;
        }
        std::vector<int> split_choices(v->splits.begin(), v->splits.end());
        if (split_choices.empty()) split_choices.push_back(1);
        for (int splits : split_choices) {
            // The ops' own split heuristics never give a split fewer keys than this; nor does tuning.
            const int64_t min_keys = shape.op == OpKind::AttentionPrefill ? 512 : 256;
            if (splits > 1 && shape.kv_len / splits < min_keys) continue;
            // One probe launch first: a variant that cannot launch is marked failed before any timing.
            const LaunchOutcome probe = runner.launch(*v, shape, splits);
            if (!probe.ok) {
                failed.mark_failed(*v, probe.error);
                out.failures.push_back(fmt::format("{}: {}", v->name, probe.error));
                break;
            }
            try {
                const Timing t = timer.time(
                    [&] {
                        const LaunchOutcome o = runner.launch(*v, shape, splits);
                        if (!o.ok) throw LaunchFailed(o.error);
                    },
                    options);
                out.timed.push_back({v, splits, t});
                log::debug("tune: {} {} {} splits {}: {:.2f} us", op_name(shape.op), shape_bucket(shape), v->name,
                           splits, t.median_us);
            } catch (const LaunchFailed& e) {
                failed.mark_failed(*v, e.what());
                out.failures.push_back(fmt::format("{}: {}", v->name, e.what()));
                break;
            }
        }
    }
    const auto best = std::min_element(out.timed.begin(), out.timed.end(), [](const auto& a, const auto& b) {
        return a.timing.median_us < b.timing.median_us;
    });
    if (best != out.timed.end())
        out.best = TuneChoice{shape.op, shape_bucket(shape), shape_dtype(shape), std::string(best->variant->name),
                              best->splits, best->timing.median_us};
    return out;
}

}  // namespace nibble::tune
