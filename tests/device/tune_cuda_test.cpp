// Device tests of the autotuner's CUDA side (tune/launch_guard_cuda.h, timer_cuda.h, variant_runner_cuda.h):
//   - a real launch failure (paged attention with a grid of more than 65535 sequences: invalid configuration,
//     raised at launch, before any memory is touched) comes back as a failed outcome, leaves no error behind,
//     and the next launch on the same stream works; launch_with_fallback marks it failed and runs the next;
//   - every eligible variant of GEMV and attention shapes of an 8B model launches and is timed on this GPU,
//     with no failure and no error left, and the choices round-trip through the cache file;
//   - the device's profile agrees with its properties.
// No numerics here: the ops' own device tests check each kernel against the CPU reference.
#include <gtest/gtest.h>

#include <cuda_runtime.h>

#include <filesystem>
#include <stdexcept>
#include <string>
#include <unistd.h>

#include "cuda/cuda_check.h"
#include "cuda/device_buffer.h"
#include "cuda/device_info.h"
#include "cuda/fill_random.h"
#include "device_test_util.h"
#include "ops/attention/attention_cuda.h"
#include "tune/eligibility.h"
#include "tune/fallback.h"
#include "tune/launch_guard_cuda.h"
#include "tune/timer_cuda.h"
#include "tune/tuner.h"
#include "tune/tune_cache.h"
#include "tune/variant_runner_cuda.h"

namespace nibble {
namespace {

struct Stream {
    cudaStream_t s = nullptr;
    Stream() { NIBBLE_CUDA_CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking)); }
    ~Stream() { (void)cudaStreamDestroy(s); }
};

// A launch that works: random words into a small buffer.
void good_launch(cuda::DeviceBuffer& buf, cudaStream_t stream) {
    cuda::fill_random_u32(buf.as<uint32_t>(), buf.bytes() / 4, 1, 0xffffffffu, 0, stream);
}

// A real kernel launch that CUDA refuses: paged attention over 70000 sequences puts 70000 in gridDim.y
// (limit 65535). The launch fails with an invalid configuration before the kernel runs, so the null data
// pointers are never read.
void refused_launch(cudaStream_t stream) {
    cuda::PagedKvLayer kv;
    kv.n_blocks = 1, kv.block_size = 16, kv.n_kv_heads = 8, kv.head_dim = 128, kv.dtype = KvDtype::Bf16;
    kv.block_bytes = 16 * 8 * 128 * 2;
    cuda::AttentionBatch b;
    b.n_seqs = 70000, b.n_tokens = 70000, b.max_blocks = 1, b.max_q_len = 1, b.max_kv_len = 16;
    cuda::AttentionArgs args;
    args.n_heads = 32, args.scale = 0.088f;
    cuda::paged_attention(nullptr, DType::BF16, kv, b, args, 1, nullptr, 0, nullptr, stream);
}

TEST(TuneCuda, GuardedLaunchClearsALaunchFailure) {
    NIBBLE_REQUIRE_GPU();
    Stream stream;
    cuda::DeviceBuffer buf(4096);
    EXPECT_TRUE(tune::guarded_launch([&] { good_launch(buf, stream.s); }, stream.s).ok);

    const tune::LaunchOutcome refused = tune::guarded_launch([&] { refused_launch(stream.s); }, stream.s);
    EXPECT_FALSE(refused.ok);
    // CUDA names the refusal InvalidConfiguration or InvalidValue depending on how the launcher sets the
    // kernel up (the attention launcher raises dynamic shared memory first): either is a refused launch.
    EXPECT_TRUE(refused.error.find("cudaErrorInvalidConfiguration") != std::string::npos ||
                refused.error.find("cudaErrorInvalidValue") != std::string::npos)
        << refused.error;
    EXPECT_EQ(cudaGetLastError(), cudaSuccess);
    EXPECT_EQ(cudaPeekAtLastError(), cudaSuccess);
    // The context is fine: the next launch runs and the stream completes.
    EXPECT_TRUE(tune::guarded_launch([&] { good_launch(buf, stream.s); }, stream.s).ok);
    EXPECT_EQ(cudaStreamSynchronize(stream.s), cudaSuccess);

    // An error the launcher leaves unchecked is cleared too (an impossible allocation).
    const tune::LaunchOutcome unchecked = tune::guarded_launch(
        [&] {
            void* p = nullptr;
            (void)cudaMalloc(&p, size_t{1} << 60);
        },
        stream.s);
    EXPECT_FALSE(unchecked.ok);
    EXPECT_NE(unchecked.error.find("cudaErrorMemoryAllocation"), std::string::npos) << unchecked.error;
    EXPECT_EQ(cudaGetLastError(), cudaSuccess);

    // A caller's bad argument is not the variant's failure: it passes through.
    EXPECT_THROW(tune::guarded_launch([] { throw std::invalid_argument("bad shape"); }, stream.s),
                 std::invalid_argument);
    EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
}

TEST(TuneCuda, FallbackRunsTheNextVariantAfterARealFailure) {
    NIBBLE_REQUIRE_GPU();
    Stream stream;
    cuda::DeviceBuffer buf(4096);
    const tune::KernelVariant* first = tune::find_variant(tune::OpKind::GemvNvfp4, "mma.nt1");
    const tune::KernelVariant* second = tune::find_variant(tune::OpKind::GemvNvfp4, "cuda_core.mt1");
    ASSERT_TRUE(first && second);
    const tune::KernelVariant* const candidates[] = {first, second};
    tune::FailedVariants failed;
    int refused_calls = 0;
    auto launch = [&](const tune::KernelVariant& v) {
        if (&v == first) {
            ++refused_calls;
            return tune::guarded_launch([&] { refused_launch(stream.s); }, stream.s);
        }
        return tune::guarded_launch([&] { good_launch(buf, stream.s); }, stream.s);
    };
    for (int i = 0; i < 3; ++i) EXPECT_EQ(&tune::launch_with_fallback(candidates, failed, launch, "test"), second);
    EXPECT_EQ(refused_calls, 1);  // never tried again after failing once
    EXPECT_TRUE(failed.failed(*first));
    EXPECT_EQ(cudaStreamSynchronize(stream.s), cudaSuccess);
}

TEST(TuneCuda, EveryEligibleVariantOfAnEightBModelRunsAndIsTimed) {
    NIBBLE_REQUIRE_GPU();
    const tune::DeviceProfile device = tune::profile_from_device(cuda::query_device(0));
    const tune::BuildTargets build = tune::BuildTargets::configured();
    Stream stream;
    auto runner = tune::make_cuda_variant_runner(stream.s);
    auto timer = tune::make_cuda_event_timer(stream.s);
    tune::FailedVariants failed;
    tune::TuneCache cache(tune::cache_key_for(device));
    using tune::OpKind;
    const tune::OpShape shapes[] = {
        {.op = OpKind::GemvNvfp4, .m = 1, .n = 4096, .k = 4096},
        {.op = OpKind::GemvNvfp4, .m = 16, .n = 14336, .k = 4096},
        {.op = OpKind::GemvNvfp4, .activation = DType::F32, .m = 4, .n = 1024, .k = 4096},
        {.op = OpKind::GemvBf16, .m = 2, .n = 4096, .k = 4096},
        {.op = OpKind::AttentionDecode, .head_dim = 128, .group = 4, .kv_dtype = KvDtype::Bf16, .n_seqs = 16,
         .n_kv_heads = 8, .q_len = 1, .kv_len = 4096},
        {.op = OpKind::AttentionDecode, .head_dim = 128, .group = 4, .kv_dtype = KvDtype::Nvfp4, .n_seqs = 8,
         .n_kv_heads = 8, .q_len = 1, .kv_len = 8192},  // decode_mma and decode_pipe both run
        {.op = OpKind::AttentionDecode, .head_dim = 64, .group = 8, .kv_dtype = KvDtype::Fp8, .n_seqs = 4,
         .n_kv_heads = 4, .q_len = 1, .kv_len = 1024},
        {.op = OpKind::AttentionDecode, .head_dim = 128, .group = 16, .kv_dtype = KvDtype::Nvfp4, .n_seqs = 1,
         .n_kv_heads = 2, .q_len = 1, .kv_len = 2048},
        {.op = OpKind::AttentionPrefill, .head_dim = 128, .group = 4, .kv_dtype = KvDtype::Fp8, .n_seqs = 1,
         .n_kv_heads = 8, .q_len = 512, .kv_len = 512},
        {.op = OpKind::AttentionPrefill, .activation = DType::F32, .head_dim = 64, .group = 2, .kv_dtype = KvDtype::Bf16,
         .n_seqs = 2, .n_kv_heads = 4, .q_len = 64, .kv_len = 256},
    };
    for (const tune::OpShape& shape : shapes) {
        SCOPED_TRACE(std::string(tune::op_name(shape.op)) + " " + tune::shape_bucket(shape));
        const auto eligible = tune::eligible_variants(shape, device, build);
        ASSERT_FALSE(eligible.empty());
        const tune::ShapeTuning t = tune::tune_shape(shape, eligible, *runner, *timer, failed, {.warmup = 2, .repeats = 5});
        for (const std::string& f : t.failures) ADD_FAILURE() << f;
        ASSERT_TRUE(t.best);
        EXPECT_GE(t.timed.size(), eligible.size());
        for (const tune::CandidateTiming& c : t.timed) EXPECT_GT(c.timing.median_us, 0.0) << c.variant->name;
        cache.put(*t.best);
    }
    EXPECT_EQ(failed.size(), 0u);
    EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    EXPECT_EQ(cudaGetLastError(), cudaSuccess);

    const std::string dir = (std::filesystem::temp_directory_path() / ("nibble_tune_cuda_" + std::to_string(getpid()))).string();
    const std::string path = tune::tune_cache_path(dir, cache.key());
    tune::save_tune_cache(cache, path);
    const auto back = tune::load_tune_cache(path, cache.key());
    std::filesystem::remove_all(dir);
    ASSERT_TRUE(back);
    EXPECT_EQ(back->choices().size(), cache.choices().size());
}

TEST(TuneCuda, ProfileFromTheDevice) {
    NIBBLE_REQUIRE_GPU();
    const cuda::DeviceInfo info = cuda::query_device(0);
    const tune::DeviceProfile p = tune::profile_from_device(info);
    EXPECT_EQ(p.name, info.name);
    EXPECT_EQ(p.sm_count, info.sm_count);
    EXPECT_GE(p.smem_per_block_optin, 48 * 1024);
    EXPECT_GE(p.smem_per_sm, p.smem_per_block_optin);
    EXPECT_EQ(p.smem_per_block, 48 * 1024);
    EXPECT_GT(p.memory_bandwidth, 0.0) << "memory clock " << info.memory_clock_khz << " kHz, bus " << info.memory_bus_bits;
    EXPECT_GT(p.driver_version, 0);
    if (p.cc() == 90) {  // H100 / H200: the built-in profiles' limits are the device's
        const tune::DeviceProfile h100 = tune::builtin_profile("h100");
        EXPECT_EQ(p.smem_per_block_optin, h100.smem_per_block_optin);
        EXPECT_EQ(p.smem_per_sm, h100.smem_per_sm);
        EXPECT_EQ(p.max_threads_per_sm, h100.max_threads_per_sm);
        EXPECT_EQ(p.smem_reserved_per_block, h100.smem_reserved_per_block);
    }
}

}  // namespace
}  // namespace nibble
