// KernelChoices on the CPU: what the CUDA runner resolves per shape from a tune cache (cached choice first,
// its split count; the heuristic's otherwise), what it may launch eagerly and under graph capture, failure
// marking, the launch counters the device tests observe, and the tile / bucket indices the runner's arrays
// use agreeing with the tune cache's shape buckets.
#include <gtest/gtest.h>

#include <string>

#include "tune/kernel_choices.h"
#include "tune/registry.h"
#include "tune/tune_cache.h"

namespace nibble::tune {
namespace {

const BuildTargets kTargets = BuildTargets::parse("90a");

const KernelVariant& named(OpKind op, std::string_view name) {
    const KernelVariant* v = find_variant(op, name);
    if (!v) throw std::runtime_error("no variant " + std::string(name));
    return *v;
}

const OpShape kGemvM1{.op = OpKind::GemvNvfp4, .activation = DType::BF16, .m = 1, .n = 4096, .k = 4096};
const OpShape kDecodeFp8{.op = OpKind::AttentionDecode, .activation = DType::BF16, .head_dim = 128, .group = 4,
                         .kv_dtype = KvDtype::Fp8, .n_seqs = 8, .n_kv_heads = 8, .q_len = 1, .kv_len = 4096};

TuneCache cache_with(const OpShape& s, std::string_view variant, int splits) {
    TuneCache c(CacheKey{.gpu_name = "test"});
    c.put({.op = s.op, .bucket = shape_bucket(s), .dtype = shape_dtype(s), .variant = std::string(variant),
           .splits = splits, .median_us = 3.0});
    return c;
}

TEST(KernelChoices, CachedVariantComesFirstWithItsSplits) {
    const TuneCache cache = cache_with(kDecodeFp8, "decode_mma.fp8.hd128", 8);
    const KernelChoices choices(&cache, builtin_profile("h100"), kTargets);
    EXPECT_TRUE(choices.has_cache());
    const ResolvedChoice r = choices.resolve(kDecodeFp8);
    ASSERT_GE(r.n_candidates, 2);
    EXPECT_EQ(r.candidates[0]->name, "decode_mma.fp8.hd128");
    EXPECT_TRUE(r.from_cache);
    EXPECT_EQ(r.splits, 8);
    ASSERT_NE(r.heuristic, nullptr);
    EXPECT_EQ(r.heuristic->name, "decode_pipe.fp8.hd128");
    EXPECT_EQ(r.candidates[1], r.heuristic) << "the heuristic's variant is the first fallback";
}

TEST(KernelChoices, WithoutACacheEntryTheHeuristicLeadsAndTheOpPicksSplits) {
    const TuneCache cache = cache_with(kDecodeFp8, "decode_mma.fp8.hd128", 8);
    const KernelChoices with_cache(&cache, builtin_profile("h100"), kTargets);
    const KernelChoices without(nullptr, builtin_profile("h100"), kTargets);
    EXPECT_FALSE(without.has_cache());
    for (const KernelChoices* c : {&with_cache, &without}) {
        const ResolvedChoice r = c->resolve(kGemvM1);  // not in the cache
        ASSERT_GE(r.n_candidates, 1);
        EXPECT_FALSE(r.from_cache);
        EXPECT_EQ(r.splits, 0);
        EXPECT_EQ(r.candidates[0], r.heuristic);
        EXPECT_EQ(r.candidates[0]->name, "cuda_core.mt1") << "gemv_nvfp4's own pick at m = 1 below 65536 rows";
    }
    // Another bucket of the same op (16 sequences instead of 8) is not the cached one either.
    OpShape more = kDecodeFp8;
    more.n_seqs = 16;
    EXPECT_FALSE(with_cache.resolve(more).from_cache);
}

TEST(KernelChoices, CachedVariantThatDoesNotServeTheShapeIsIgnored) {
    // hd64's kernel named for an hd128 bucket (a hand-edited or stale cache): not eligible, not used.
    const TuneCache cache = cache_with(kDecodeFp8, "decode_mma.fp8.hd64", 4);
    const KernelChoices choices(&cache, builtin_profile("h100"), kTargets);
    const ResolvedChoice r = choices.resolve(kDecodeFp8);
    EXPECT_FALSE(r.from_cache);
    EXPECT_EQ(r.splits, 0);
    for (int i = 0; i < r.n_candidates; ++i) EXPECT_NE(r.candidates[i]->name, "decode_mma.fp8.hd64");
}

TEST(KernelChoices, CaptureUsesOnlyEagerlyLaunchedVariantsOrTheHeuristic) {
    const TuneCache cache = cache_with(kGemvM1, "mma.nt1", 1);
    KernelChoices choices(&cache, builtin_profile("h100"), kTargets);
    const ResolvedChoice r = choices.resolve(kGemvM1);
    const KernelVariant& cached = named(OpKind::GemvNvfp4, "mma.nt1");
    const KernelVariant& heuristic = named(OpKind::GemvNvfp4, "cuda_core.mt1");
    ASSERT_EQ(r.candidates[0], &cached);
    EXPECT_EQ(choices.pick(r, /*capturing=*/false), &cached);
    EXPECT_EQ(choices.pick(r, /*capturing=*/true), &heuristic) << "never launched eagerly: not captured";
    choices.note_launched(cached, /*capturing=*/true);  // a captured launch proves nothing
    EXPECT_EQ(choices.pick(r, true), &heuristic);
    choices.note_launched(cached, /*capturing=*/false);
    EXPECT_EQ(choices.pick(r, true), &cached);
    EXPECT_EQ(choices.launches(cached), 2);
    EXPECT_EQ(choices.launches(heuristic), 0);
}

TEST(KernelChoices, FailedVariantIsNeverPickedOrResolvedAgain) {
    const TuneCache cache = cache_with(kGemvM1, "mma.nt1", 1);
    KernelChoices choices(&cache, builtin_profile("h100"), kTargets);
    const ResolvedChoice before = choices.resolve(kGemvM1);
    const KernelVariant& cached = named(OpKind::GemvNvfp4, "mma.nt1");
    EXPECT_FALSE(choices.failed(cached));
    choices.mark_failed(cached, "too many resources requested for launch");
    EXPECT_TRUE(choices.failed(cached));
    EXPECT_EQ(choices.failed_variants().size(), 1u);
    EXPECT_EQ(choices.failed_variants().reason(cached), "too many resources requested for launch");
    // An already resolved choice skips it at pick time; a new resolution leaves it out.
    EXPECT_EQ(choices.pick(before, false)->name, "cuda_core.mt1");
    const ResolvedChoice after = choices.resolve(kGemvM1);
    for (int i = 0; i < after.n_candidates; ++i) EXPECT_NE(after.candidates[i], &cached);
    EXPECT_FALSE(after.from_cache);
    // With every candidate failed nothing is left.
    for (int i = 0; i < before.n_candidates; ++i) choices.mark_failed(*before.candidates[i], "gone");
    EXPECT_EQ(choices.pick(before, false), nullptr);
}

TEST(KernelChoices, InjectedFailureNamesOneVariant) {
    KernelChoices choices(nullptr, builtin_profile("h100"), kTargets);
    const KernelVariant& a = named(OpKind::GemvNvfp4, "mma.nt1");
    const KernelVariant& b = named(OpKind::GemvNvfp4, "cuda_core.mt1");
    EXPECT_FALSE(choices.injected_failure(a));
    choices.inject_launch_failure(&a);
    EXPECT_TRUE(choices.injected_failure(a));
    EXPECT_FALSE(choices.injected_failure(b));
    choices.inject_launch_failure(nullptr);
    EXPECT_FALSE(choices.injected_failure(a));
}

// A shape no registered variant serves resolves to no candidates (the runner then uses the op's dispatch).
TEST(KernelChoices, UnservedShapeHasNoCandidates) {
    const KernelChoices choices(nullptr, builtin_profile("h100"), kTargets);
    OpShape hd256 = kDecodeFp8;
    hd256.head_dim = 256;
    const ResolvedChoice r = choices.resolve(hd256);
    EXPECT_EQ(r.n_candidates, 0);
    EXPECT_EQ(r.heuristic, nullptr);
}

// The runner indexes its arrays by gemv_tile_index(m) and log2_bucket(v) and resolves each entry at
// gemv_tile_rows(index) / 1 << index: those must land in the same tune-cache bucket as the real shape.
TEST(KernelChoices, TileAndBucketIndicesMatchTheCacheBuckets) {
    for (int64_t m = 1; m <= 40; ++m) {
        const OpShape real{.op = OpKind::GemvNvfp4, .m = m, .n = 4096, .k = 4096};
        OpShape rep = real;
        rep.m = gemv_tile_rows(gemv_tile_index(m));
        EXPECT_EQ(shape_bucket(real), shape_bucket(rep)) << "m = " << m;
        EXPECT_LT(gemv_tile_index(m), kGemvTiles);
    }
    for (int64_t seqs = 1; seqs <= 300; ++seqs)
        for (int64_t kv : {1, 2, 3, 511, 512, 513, 1024, 4095, 4097, 131072}) {
            OpShape real = kDecodeFp8;
            real.n_seqs = seqs;
            real.kv_len = kv;
            OpShape rep = real;
            rep.n_seqs = int64_t{1} << log2_bucket(seqs);
            rep.kv_len = int64_t{1} << log2_bucket(kv);
            ASSERT_EQ(shape_bucket(real), shape_bucket(rep)) << "seqs " << seqs << " kv " << kv;
        }
    EXPECT_EQ(log2_bucket(0), 0);
    EXPECT_EQ(log2_bucket(1), 0);
    EXPECT_EQ(log2_bucket(2), 1);
    EXPECT_EQ(log2_bucket(3), 2);
    EXPECT_EQ(log2_bucket(1024), 10);
    EXPECT_EQ(log2_bucket(1025), 11);
}

}  // namespace
}  // namespace nibble::tune
