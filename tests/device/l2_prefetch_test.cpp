// ops/prefetch/l2_prefetch_cuda.h: the L2 prefetch changes no memory, asks for exactly the bytes its ranges
// describe (prefixes rounded down to 16 bytes), issues nothing when the step's KV reads exceed its bound (decided
// on the device from start_pos and q_start), rejects bad ranges by name, and leaves the forward's logits
// bit-identical (the decoder forward with and without it, decode steps included).
#include <gtest/gtest.h>

#include <cstring>
#include <filesystem>
#include <random>
#include <stdexcept>
#include <vector>

#include "base/thread_pool.h"
#include "cuda/cuda_check.h"
#include "cuda/device_buffer.h"
#include "decoder_forward_util.h"
#include "device_test_util.h"
#include "engine/model_runner.h"
#include "gpu/cuda_model_runner.h"
#include "gpu/weight_upload.h"
#include "model/model.h"
#include "ops/prefetch/l2_prefetch_cuda.h"

namespace nibble {
namespace {

namespace fs = std::filesystem;

struct Counter {
    cuda::DeviceBuffer buf{sizeof(unsigned long long)};
    Counter() { NIBBLE_CUDA_CHECK(cudaMemset(buf.get(), 0, sizeof(unsigned long long))); }
    unsigned long long read() const {
        unsigned long long v = 0;
        NIBBLE_CUDA_CHECK(cudaDeviceSynchronize());
        NIBBLE_CUDA_CHECK(cudaMemcpy(&v, buf.get(), sizeof v, cudaMemcpyDeviceToHost));
        return v;
    }
    unsigned long long* ptr() { return buf.as<unsigned long long>(); }
};

std::vector<uint8_t> random_bytes(std::mt19937_64& rng, size_t n) {
    std::vector<uint8_t> v(n);
    for (auto& b : v) b = static_cast<uint8_t>(rng());
    return v;
}

TEST(L2Prefetch, AsksForItsRangesAndChangesNothing) {
    NIBBLE_REQUIRE_GPU();
    std::mt19937_64 rng(test::fresh_seed());
    // A whole matrix (contiguous pieces, a partial last piece) and row prefixes (one piece and several a row).
    const int64_t rows_a = 37, row_a = 2048 + 16 * static_cast<int64_t>(rng() % 64);
    const int64_t rows_b = 101, row_b = 40 * 1024, prefix_b = 17 * 1024 + 7;  // rounds down to 17408
    const int64_t rows_c = 300, row_c = 256, prefix_c = 96;
    const std::vector<uint8_t> host_a = random_bytes(rng, static_cast<size_t>(rows_a * row_a));
    const std::vector<uint8_t> host_b = random_bytes(rng, static_cast<size_t>(rows_b * row_b));
    const std::vector<uint8_t> host_c = random_bytes(rng, static_cast<size_t>(rows_c * row_c));
    cuda::DeviceBuffer a(host_a.size()), b(host_b.size()), c(host_c.size());
    NIBBLE_CUDA_CHECK(cudaMemcpy(a.get(), host_a.data(), host_a.size(), cudaMemcpyHostToDevice));
    NIBBLE_CUDA_CHECK(cudaMemcpy(b.get(), host_b.data(), host_b.size(), cudaMemcpyHostToDevice));
    NIBBLE_CUDA_CHECK(cudaMemcpy(c.get(), host_c.data(), host_c.size(), cudaMemcpyHostToDevice));
    Counter issued;
    cuda::L2PrefetchJob job;
    job.ranges[0] = {a.get(), rows_a, row_a, row_a};
    job.ranges[1] = {b.get(), rows_b, row_b, prefix_b};
    job.ranges[2] = {c.get(), rows_c, row_c, prefix_c};
    job.ranges[3] = {c.get(), rows_c, row_c, 15};  // rounds to nothing
    job.n_ranges = 4;
    job.issued_bytes = issued.ptr();
    const int64_t expected = rows_a * row_a + rows_b * (prefix_b / 16 * 16) + rows_c * prefix_c;
    EXPECT_EQ(cuda::l2_prefetch_bytes(job), expected);
    cuda::l2_prefetch(job, nullptr);
    EXPECT_EQ(issued.read(), static_cast<unsigned long long>(expected));
    for (auto [dev, host] : {std::pair{&a, &host_a}, std::pair{&b, &host_b}, std::pair{&c, &host_c}}) {
        std::vector<uint8_t> back(host->size());
        NIBBLE_CUDA_CHECK(cudaMemcpy(back.data(), dev->get(), back.size(), cudaMemcpyDeviceToHost));
        EXPECT_EQ(std::memcmp(back.data(), host->data(), back.size()), 0) << "the prefetch changed memory";
    }
}

TEST(L2Prefetch, SkipsWhenTheStepReadsMoreKvThanItsBound) {
    NIBBLE_REQUIRE_GPU();
    std::mt19937_64 rng(test::fresh_seed());
    const int n_seqs = 1 + static_cast<int>(rng() % 300);  // more than one CTA's threads: the sum strides
    std::vector<int32_t> start_pos(static_cast<size_t>(n_seqs)), q_start(static_cast<size_t>(n_seqs) + 1, 0);
    int64_t keys = 0;
    for (int s = 0; s < n_seqs; ++s) {
        start_pos[static_cast<size_t>(s)] = static_cast<int32_t>(rng() % 5000);
        q_start[static_cast<size_t>(s) + 1] = q_start[static_cast<size_t>(s)] + 1 + static_cast<int32_t>(rng() % 3);
        keys += start_pos[static_cast<size_t>(s)] + q_start[static_cast<size_t>(s) + 1] - q_start[static_cast<size_t>(s)];
    }
    cuda::DeviceBuffer sp(start_pos.size() * 4), qs(q_start.size() * 4), w(64 * 1024);
    NIBBLE_CUDA_CHECK(cudaMemcpy(sp.get(), start_pos.data(), sp.bytes(), cudaMemcpyHostToDevice));
    NIBBLE_CUDA_CHECK(cudaMemcpy(qs.get(), q_start.data(), qs.bytes(), cudaMemcpyHostToDevice));
    const int64_t per_key = 2048;
    for (const int64_t bound : {keys * per_key, keys * per_key - 1}) {  // at the bound: issue; one byte under: skip
        Counter issued;
        cuda::L2PrefetchJob job;
        job.ranges[0] = {w.get(), 64, 1024, 1024};
        job.n_ranges = 1;
        job.start_pos = sp.as<int32_t>();
        job.q_start = qs.as<int32_t>();
        job.n_seqs = n_seqs;
        job.kv_bytes_per_key = per_key;
        job.max_kv_bytes = bound;
        job.issued_bytes = issued.ptr();
        cuda::l2_prefetch(job, nullptr);
        EXPECT_EQ(issued.read(), bound == keys * per_key ? 64u * 1024u : 0u)
            << n_seqs << " sequences, " << keys << " keys, bound " << bound;
    }
}

TEST(L2Prefetch, RejectsBadRangesByName) {
    NIBBLE_REQUIRE_GPU();
    cuda::DeviceBuffer buf(4096);
    auto expect_error = [](const cuda::L2PrefetchJob& job, const std::string& needle) {
        try {
            cuda::l2_prefetch(job, nullptr);
            ADD_FAILURE() << "no error; expected one naming " << needle;
        } catch (const std::invalid_argument& e) {
            EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
        }
    };
    cuda::L2PrefetchJob job;
    job.n_ranges = 2;
    job.ranges[0] = {buf.get(), 2, 1024, 1024};
    job.ranges[1] = {buf.as<uint8_t>() + 8, 2, 1024, 1024};
    expect_error(job, "range 1: base and row_bytes must be 16-byte aligned");
    job.ranges[1] = {buf.get(), 2, 1024, 2048};
    expect_error(job, "range 1: rows 2, row_bytes 1024, prefix_bytes 2048");
    job.n_ranges = cuda::kMaxL2PrefetchRanges + 1;
    expect_error(job, "n_ranges = 9");
}

TEST(L2Prefetch, DecoderLogitsIdenticalWithAndWithout) {
    NIBBLE_REQUIRE_GPU();
    const fs::path root = fs::temp_directory_path() / ("nibble-prefetch-" + std::to_string(::getpid()));
    const fs::path dir = test::quantized(test::write_checkpoint(root / "llama", {.head_dim = 128}, 21), root / "nvfp4",
                                         QuantLayout::ModelOpt, false);
    ThreadPool pool(0);
    std::unique_ptr<Model> model = load_model(dir.string(), pool);
    DecoderView view;
    ASSERT_TRUE(model->decoder_view(view));
    auto weights = std::make_shared<gpu::DeviceDecoder>(gpu::upload_decoder(model->config(), view));
    gpu::CudaRunnerOptions o{.kv_dtype = KvDtype::Bf16, .num_blocks = 64, .block_size = 16, .max_model_len = 512,
                             .max_num_batched_tokens = 256, .max_num_seqs = 8, .act_dtype = DType::F32};
    o.l2_prefetch = true;
    gpu::CudaModelRunner with(weights, o);
    o.l2_prefetch = false;
    gpu::CudaModelRunner without(weights, o);
    std::mt19937_64 rng(test::fresh_seed());
    std::uniform_int_distribution<int32_t> tok(0, static_cast<int32_t>(model->config().vocab_size - 1));
    std::vector<std::vector<int32_t>> seqs = {std::vector<int32_t>(9), std::vector<int32_t>(30)};
    std::vector<std::vector<int32_t>> tables(seqs.size());
    for (size_t s = 0; s < seqs.size(); ++s) {
        for (auto& t : seqs[s]) t = tok(rng);
        for (int32_t blk = 0; blk < 8; ++blk) tables[s].push_back(static_cast<int32_t>(s) * 8 + blk);
    }
    std::vector<int64_t> done(seqs.size(), 0);
    for (int step = 0; step < 8; ++step) {  // a prefill step, then decode steps (the prefetching ones)
        std::vector<RunnerSequence> batch;
        for (size_t s = 0; s < seqs.size(); ++s)
            batch.push_back({.tokens = std::span(seqs[s]).subspan(static_cast<size_t>(done[s])),
                             .block_table = tables[s], .start_pos = done[s], .needs_logits = true});
        std::vector<float> a, b;
        with.execute(batch, a);
        without.execute(batch, b);
        ASSERT_EQ(a.size(), b.size());
        ASSERT_EQ(std::memcmp(a.data(), b.data(), a.size() * sizeof(float)), 0) << "step " << step;
        for (size_t s = 0; s < seqs.size(); ++s) {
            done[s] = static_cast<int64_t>(seqs[s].size());
            seqs[s].push_back(tok(rng));
        }
    }
    fs::remove_all(root);
}

}  // namespace
}  // namespace nibble
