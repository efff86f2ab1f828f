// Failure isolation and tuning on the CPU: a fake runner whose chosen variants fail to launch, a fake timer
// whose times come from a table. A failed variant is never used again in the process, the op falls back to
// the next fitting one, and tuning keeps the fastest of those that ran.
#include <gtest/gtest.h>

#include <initializer_list>
#include <map>
#include <stdexcept>
#include <set>
#include <string>

#include "base/error.h"
#include "tune/fallback.h"
#include "tune/tuner.h"

namespace nibble::tune {
namespace {

const BuildTargets kTargets = BuildTargets::parse("90a;100a;120a;121a");

// Launch results by variant name: names in `fail_always` fail every launch, names in `fail_after` succeed
// `fail_after[name]` times and then fail. Counts every launch.
class FakeRunner final : public VariantRunner {
public:
    std::set<std::string> fail_always;
    std::map<std::string, int> fail_after;
    std::map<std::string, int> launches;
    std::vector<int> splits_seen;
    int prepared = 0;
    void prepare(const OpShape&) override { ++prepared; }
    LaunchOutcome launch(const KernelVariant& v, const OpShape&, int splits) override {
        const std::string name(v.name);
        const int n = launches[name]++;
        splits_seen.push_back(splits);
        if (fail_always.count(name)) return LaunchOutcome::failure("too many resources requested for launch");
        if (auto it = fail_after.find(name); it != fail_after.end() && n >= it->second)
            return LaunchOutcome::failure("unspecified launch failure");
        return LaunchOutcome::success();
    }
};

// Median time per variant name (and split count): times[name] + splits_penalty * |splits - best_splits|.
class FakeTimer final : public KernelTimer {
public:
    std::function<double()> next;  // the time of the run in progress
    Timing time(const std::function<void()>& launch, const TimingOptions& opts) override {
        std::vector<double> us;
        for (int i = 0; i < opts.warmup; ++i) launch();
        for (int i = 0; i < opts.repeats; ++i) {
            launch();
            us.push_back(next());
        }
        return summarize_times(us);
    }
};

// Named variants, in the order given (the tests do not depend on how many others the registry holds).
std::vector<const KernelVariant*> variants(OpKind op, std::initializer_list<std::string_view> names) {
    std::vector<const KernelVariant*> out;
    for (std::string_view n : names) {
        const KernelVariant* v = find_variant(op, n);
        if (!v) throw std::runtime_error("no variant " + std::string(n));
        out.push_back(v);
    }
    return out;
}

bool contains(const std::vector<const KernelVariant*>& order, std::string_view name) {
    for (const KernelVariant* v : order)
        if (v->name == name) return true;
    return false;
}

TEST(Fallback, FailedVariantIsSkippedForTheRestOfTheProcess) {
    const auto candidates = variants(OpKind::GemvNvfp4, {"mma.nt1", "cuda_core.mt1"});
    FailedVariants failed;
    FakeRunner runner;
    runner.fail_always.insert(std::string(candidates[0]->name));
    const OpShape shape{.op = OpKind::GemvNvfp4, .m = 1, .n = 4096, .k = 4096};
    auto launch = [&](const KernelVariant& v) { return runner.launch(v, shape, 0); };
    const KernelVariant& ran = launch_with_fallback(candidates, failed, launch, "gemv_nvfp4 m1");
    EXPECT_EQ(&ran, candidates[1]);
    EXPECT_TRUE(failed.failed(*candidates[0]));
    EXPECT_NE(failed.reason(*candidates[0]).find("too many resources"), std::string::npos);
    // The next call does not try the failed variant again.
    for (int i = 0; i < 5; ++i) EXPECT_EQ(&launch_with_fallback(candidates, failed, launch, "gemv_nvfp4 m1"), candidates[1]);
    EXPECT_EQ(runner.launches[std::string(candidates[0]->name)], 1);
    EXPECT_EQ(runner.launches[std::string(candidates[1]->name)], 6);
}

TEST(Fallback, AllFailingIsAnErrorNamingEach) {
    const auto candidates = variants(OpKind::GemvNvfp4, {"mma.nt1", "cuda_core.mt1"});
    FailedVariants failed;
    FakeRunner runner;
    for (const KernelVariant* v : candidates) runner.fail_always.insert(std::string(v->name));
    const OpShape shape{.op = OpKind::GemvNvfp4, .m = 1, .n = 4096, .k = 4096};
    auto launch = [&](const KernelVariant& v) { return runner.launch(v, shape, 0); };
    try {
        launch_with_fallback(candidates, failed, launch, "gemv_nvfp4 m1");
        FAIL() << "expected an error";
    } catch (const Error& e) {
        const std::string msg = e.what();
        for (const KernelVariant* v : candidates) EXPECT_NE(msg.find(std::string(v->name)), std::string::npos) << msg;
    }
    EXPECT_EQ(failed.size(), candidates.size());
    std::vector<const KernelVariant*> none;
    EXPECT_THROW(launch_with_fallback(none, failed, launch, "x"), Error);
}

TEST(CandidateOrder, CachedChoiceThenHeuristicThenRestWithoutFailed) {
    const DeviceProfile h100 = builtin_profile("h100");
    const OpShape shape{.op = OpKind::GemvNvfp4, .m = 1, .n = 4096, .k = 4096};
    FailedVariants failed;
    int splits = -1;
    // No cache: the heuristic (CUDA cores at m = 1 below 65536 rows) first.
    auto order = candidate_order(shape, h100, kTargets, nullptr, failed, splits);
    EXPECT_EQ(order.size(), eligible_variants(shape, h100, kTargets).size());  // every eligible one, once
    EXPECT_EQ(order[0]->name, "cuda_core.mt1");
    EXPECT_EQ(splits, 0);
    // lm_head-sized: tensor cores.
    const OpShape big{.op = OpKind::GemvNvfp4, .m = 1, .n = 128256, .k = 4096};
    EXPECT_EQ(candidate_order(big, h100, kTargets, nullptr, failed, splits)[0]->name, "mma.nt1");
    // A cached choice comes first.
    TuneCache cache(cache_key_for(h100));
    cache.put({OpKind::GemvNvfp4, shape_bucket(shape), shape_dtype(shape), "mma.nt1", 1, 5.0});
    order = candidate_order(shape, h100, kTargets, &cache, failed, splits);
    EXPECT_EQ(order[0]->name, "mma.nt1");
    EXPECT_EQ(splits, 1);
    // ... unless it failed in this process.
    failed.mark_failed(*order[0], "test");
    order = candidate_order(shape, h100, kTargets, &cache, failed, splits);
    EXPECT_EQ(order[0]->name, "cuda_core.mt1");
    EXPECT_FALSE(contains(order, "mma.nt1"));
    // A cached choice that is not eligible on this device is not used.
    DeviceProfile tiny = h100;
    tiny.smem_per_block = tiny.smem_per_block_optin = 1024;
    FailedVariants none;
    order = candidate_order(shape, tiny, kTargets, &cache, none, splits);
    EXPECT_EQ(order[0]->name, "cuda_core.mt1");
    EXPECT_FALSE(contains(order, "mma.nt1"));  // 4096 B of shared memory: more than this device's 1024
    EXPECT_EQ(splits, 0);
}

TEST(TuneShape, KeepsTheFastestAndMarksFailures) {
    const OpShape shape{.op = OpKind::GemvNvfp4, .m = 12, .n = 4096, .k = 4096};
    const auto eligible = variants(OpKind::GemvNvfp4, {"mma.nt2", "cuda_core.mt16"});
    FakeRunner runner;
    FakeTimer timer;
    // The fake timer reports by which variant the runner last launched: 30 us for mma, 20 us for CUDA cores.
    runner.launches.clear();
    std::string last;
    struct Recording final : VariantRunner {
        FakeRunner& inner;
        std::string& last;
        Recording(FakeRunner& r, std::string& l) : inner(r), last(l) {}
        void prepare(const OpShape& s) override { inner.prepare(s); }
        LaunchOutcome launch(const KernelVariant& v, const OpShape& s, int splits) override {
            last = std::string(v.name);
            return inner.launch(v, s, splits);
        }
    } recording(runner, last);
    timer.next = [&] { return last.rfind("mma.", 0) == 0 ? 30.0 : 20.0; };
    FailedVariants failed;
    const TimingOptions opts{.warmup = 2, .repeats = 5};
    ShapeTuning t = tune_shape(shape, eligible, recording, timer, failed, opts);
    EXPECT_EQ(runner.prepared, 1);
    ASSERT_TRUE(t.best);
    EXPECT_EQ(t.best->variant, "cuda_core.mt16");
    EXPECT_DOUBLE_EQ(t.best->median_us, 20.0);
    EXPECT_EQ(t.best->bucket, "m16.n4096.k4096");
    EXPECT_EQ(t.timed.size(), 2u);
    // 1 probe + 2 warm-up + 5 timed per variant.
    EXPECT_EQ(runner.launches["mma.nt2"], 8);

    // The faster variant fails in the middle of its timing: marked failed, the other kept.
    FakeRunner runner2;
    Recording recording2(runner2, last);
    runner2.fail_after["cuda_core.mt16"] = 3;
    FailedVariants failed2;
    t = tune_shape(shape, eligible, recording2, timer, failed2, opts);
    ASSERT_TRUE(t.best);
    EXPECT_EQ(t.best->variant, "mma.nt2");
    EXPECT_TRUE(failed2.failed(*find_variant(OpKind::GemvNvfp4, "cuda_core.mt16")));
    ASSERT_EQ(t.failures.size(), 1u);
    // Tuning again in the same process does not launch it again.
    const int before = runner2.launches["cuda_core.mt16"];
    t = tune_shape(shape, eligible, recording2, timer, failed2, opts);
    EXPECT_EQ(runner2.launches["cuda_core.mt16"], before);
    EXPECT_EQ(t.best->variant, "mma.nt2");

    // Every variant failing at the probe: no choice.
    FakeRunner runner3;
    Recording recording3(runner3, last);
    for (const KernelVariant* v : eligible) runner3.fail_always.insert(std::string(v->name));
    FailedVariants failed3;
    t = tune_shape(shape, eligible, recording3, timer, failed3, opts);
    EXPECT_FALSE(t.best);
    EXPECT_EQ(t.failures.size(), 2u);
    for (const KernelVariant* v : eligible) EXPECT_EQ(runner3.launches[std::string(v->name)], 1);
}

TEST(TuneShape, AttentionTriesSplitCountsThatFitTheContext) {
    const OpShape shape{.op = OpKind::AttentionDecode, .head_dim = 128, .group = 4, .kv_dtype = KvDtype::Bf16,
                        .n_seqs = 1, .n_kv_heads = 8, .q_len = 1, .kv_len = 1024};
    const auto eligible = eligible_variants(shape, builtin_profile("h100"), kTargets);
    ASSERT_EQ(eligible.size(), 1u);  // BF16 cache: the tensor-core decode kernel alone
    EXPECT_EQ(eligible[0]->name, "decode_mma.bf16.hd128");
    FakeRunner runner;
    FakeTimer timer;
    int current = 0;
    struct Splits final : VariantRunner {
        FakeRunner& inner;
        int& current;
        Splits(FakeRunner& r, int& c) : inner(r), current(c) {}
        void prepare(const OpShape& s) override { inner.prepare(s); }
        LaunchOutcome launch(const KernelVariant& v, const OpShape& s, int splits) override {
            current = splits;
            return inner.launch(v, s, splits);
        }
    } splits_runner(runner, current);
    timer.next = [&] { return current == 2 ? 5.0 : 10.0; };
    FailedVariants failed;
    const ShapeTuning t = tune_shape(shape, eligible, splits_runner, timer, failed, {.warmup = 0, .repeats = 3});
    ASSERT_TRUE(t.best);
    EXPECT_EQ(t.best->splits, 2);
    // kv_len 1024 at >= 256 keys a split: splits 1, 2, 4 only.
    std::set<int> tried(runner.splits_seen.begin(), runner.splits_seen.end());
    EXPECT_EQ(tried, (std::set<int>{1, 2, 4}));
}

TEST(Timing, MedianOfRepeats) {
    EXPECT_DOUBLE_EQ(summarize_times({5, 1, 3}).median_us, 3);
    EXPECT_DOUBLE_EQ(summarize_times({4, 1, 3, 2}).median_us, 2.5);
    EXPECT_DOUBLE_EQ(summarize_times({4, 1, 3, 2}).min_us, 1);
    EXPECT_THROW(summarize_times({}), std::invalid_argument);
}

}  // namespace
}  // namespace nibble::tune
