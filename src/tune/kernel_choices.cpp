#include "tune/kernel_choices.h"

#include <algorithm>
#include <bit>

#include "base/error.h"
#include "tune/tuner.h"

namespace nibble::tune {

KernelChoices::KernelChoices(const TuneCache* cache, DeviceProfile device, BuildTargets build)
    : device_(std::move(device)), build_(std::move(build)) {
    if (cache) cache_ = *cache;
    const size_t n = kernel_registry().size();
    failed_flag_ = std::make_unique<std::atomic<bool>[]>(n);
    launched_eager_ = std::make_unique<std::atomic<bool>[]>(n);
    launch_count_ = std::make_unique<std::atomic<int64_t>[]>(n);
    for (size_t i = 0; i < n; ++i) {
        failed_flag_[i].store(false);
        launched_eager_[i].store(false);
        launch_count_[i].store(0);
    }
}

size_t KernelChoices::index_of(const KernelVariant& v) const {
    const std::span<const KernelVariant> all = kernel_registry();
    // Every KernelVariant lives in the registry's table; anything else is a caller's bug.
    const auto i = static_cast<size_t>(&v - all.data());
    NIBBLE_CHECK(&v >= all.data() && i < all.size(), "tune: variant {} is not in the kernel registry", v.name);
    return i;
}

ResolvedChoice KernelChoices::resolve(const OpShape& shape) const {
    int splits = 0;
    const std::vector<const KernelVariant*> order =
        candidate_order(shape, device_, build_, cache_ ? &*cache_ : nullptr, failed_, splits);
    ResolvedChoice out;
    for (const KernelVariant* v : order) {
        if (out.n_candidates == ResolvedChoice::kMaxCandidates) break;
        out.candidates[out.n_candidates++] = v;
    }
    std::vector<const KernelVariant*> eligible;
    for (const KernelVariant* v : eligible_variants(shape, device_, build_))
        if (!failed_.failed(*v)) eligible.push_back(v);
    out.heuristic = heuristic_variant(shape, eligible);
    if (cache_ && out.n_candidates > 0)
        if (const TuneChoice* c = cache_->find(shape.op, shape_bucket(shape), shape_dtype(shape)))
            out.from_cache = find_variant(shape.op, c->variant) == out.candidates[0];
    // candidate_order gives the cache's split count only with the cache's (eligible) variant first.
    out.splits = out.from_cache ? std::max(splits, 0) : 0;
    return out;
}

const KernelVariant* KernelChoices::pick(const ResolvedChoice& c, bool capturing) const {
    for (int i = 0; i < c.n_candidates; ++i) {
        const KernelVariant* v = c.candidates[i];
        const size_t at = static_cast<size_t>(v - kernel_registry().data());
        if (failed_flag_[at].load(std::memory_order_relaxed)) continue;
        if (capturing && v != c.heuristic && !launched_eager_[at].load(std::memory_order_relaxed)) continue;
        return v;
    }
    return nullptr;
}

void KernelChoices::note_launched(const KernelVariant& v, bool capturing) {
    const size_t at = index_of(v);
    launch_count_[at].fetch_add(1, std::memory_order_relaxed);
    if (!capturing) launched_eager_[at].store(true, std::memory_order_relaxed);
}

void KernelChoices::mark_failed(const KernelVariant& v, const std::string& why) {
    failed_flag_[index_of(v)].store(true, std::memory_order_relaxed);
    failed_.mark_failed(v, why);
}

bool KernelChoices::failed(const KernelVariant& v) const {
    return failed_flag_[index_of(v)].load(std::memory_order_relaxed);
}

int64_t KernelChoices::launches(const KernelVariant& v) const {
    return launch_count_[index_of(v)].load(std::memory_order_relaxed);
}

int gemv_tile_index(int64_t m) {
    if (m <= 1) return 0;
    if (m == 2) return 1;
    if (m <= 4) return 2;
    if (m <= 8) return 3;
    return 4;
}

int64_t gemv_tile_rows(int tile_index) { return int64_t{1} << std::clamp(tile_index, 0, kGemvTiles - 1); }

int log2_bucket(int64_t v) {
    return v <= 1 ? 0 : static_cast<int>(std::bit_width(static_cast<uint64_t>(v - 1)));
}

}  // namespace nibble::tune
