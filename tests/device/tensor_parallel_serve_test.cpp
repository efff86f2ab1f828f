// The serving path of tensor parallelism on N = 2 and N = 4 GPUs (each case skipped with fewer than N), in one
// process: an Engine whose runner is a TensorParallelLeader over rank 0's CudaModelRunner (GPU 0, this thread),
// with ranks 1 .. N-1 (GPU r, a thread here each, a process of its own under `nibble serve -tp N`) following
// over a localhost step channel through CudaModelRunner::run_step, NCCL between them. What `nibble serve -tp N`
// adds on top (processes, the setup message) is checked by scripts/tp-serve-check.sh.
//
// The model: decoder_forward_util.h's small random llama (head_dim 64, 4 heads / 2 KV heads, vocabulary 1024;
// at N = 4 one query head per rank and each KV head replicated on 2 ranks).
// Reference: an Engine over the TP = 1 CUDA runner on GPU 0, same requests. Both run F32 activations, where
// TP changes only the summation order of the row-parallel sums (tensor_parallel_forward_test.cpp: logits
// within 1e-3 x RMS, greedy tokens equal), so 8 concurrent greedy requests (batched prefill, then decode steps
// replayed as CUDA graphs) must decode the same tokens, and a seeded sampled request (execute_sample on rank 0
// only: the followers run the forward alone) must draw the same ones, barring a draw within ~1e-6 of a
// boundary of the sampling distribution. Every follower must see every step and stop at the leader's Shutdown.
#include <gtest/gtest.h>

#include <cuda_runtime.h>
#include <fmt/format.h>
#include <unistd.h>

#include <cstdio>
#include <exception>
#include <filesystem>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "base/thread_pool.h"
#include "cuda/cuda_check.h"
#include "cuda/device_info.h"
#include "decoder_forward_util.h"
#include "engine/engine.h"
#include "gpu/cuda_model_runner.h"
#include "gpu/tensor_parallel_runner.h"
#include "gpu/weight_upload.h"
#include "model/model.h"
#include "parallel/step_channel.h"

namespace nibble {
namespace {

namespace fs = std::filesystem;

constexpr int64_t kBlocks = 96, kBlockSize = 16, kMaxModelLen = 128;

gpu::CudaRunnerOptions runner_options() {
    return {.kv_dtype = KvDtype::Bf16,
            .num_blocks = kBlocks,
            .block_size = kBlockSize,
            .max_model_len = kMaxModelLen,
            .max_num_batched_tokens = 512,
            .max_num_seqs = 16,
            .act_dtype = DType::F32,
            .max_cudagraph_capture_size = 16};
}

EngineConfig engine_config() {
    return EngineConfig{.max_model_len = kMaxModelLen,
                        .max_num_seqs = 16,
                        .max_num_batched_tokens = 512,
                        .block_size = kBlockSize,
                        .num_blocks = kBlocks,
                        .enable_prefix_caching = true,
                        .kv_cache_dtype = KvDtype::Bf16};
}

// 8 greedy prompts of 3 .. 66 tokens (each a different walk over the vocabulary) and one seeded sampled one.
std::vector<GenerationRequest> requests(int64_t vocab) {
    std::vector<GenerationRequest> out;
    for (int i = 0; i < 9; ++i) {
        GenerationRequest r;
        r.id = fmt::format("r{}", i);
        for (int j = 0; j < 3 + 9 * (i % 8); ++j) r.prompt.push_back(static_cast<int32_t>((5 + 37 * j + 113 * i) % vocab));
        r.max_tokens = 8;
        r.ignore_eos = true;
        r.sampling.temperature = 0.0f;
        if (i == 8) {
            r.sampling.temperature = 0.8f;
            r.sampling.top_p = 0.9f;
            r.sampling.seed = 1234;
        }
        out.push_back(std::move(r));
    }
    return out;
}

std::map<std::string, std::vector<int32_t>> serve(Engine& engine, int64_t vocab) {
    std::map<std::string, std::vector<int32_t>> tokens;
    std::map<std::string, std::string> errors;
    for (GenerationRequest& r : requests(vocab))
        engine.submit(std::move(r), [&](const RequestOutput& o) {
            for (const auto& s : o.outputs) tokens[o.request_id].insert(tokens[o.request_id].end(), s.tokens.begin(), s.tokens.end());
            if (!o.error.empty()) errors[o.request_id] = o.error;
        });
    for (int steps = 0; engine.step(); ++steps)
        if (steps > 1000) break;
    for (const auto& [id, e] : errors) ADD_FAILURE() << id << ": " << e;
    return tokens;
}

class TensorParallelServeCuda : public ::testing::TestWithParam<int> {};

TEST_P(TensorParallelServeCuda, AnEngineOverNGpusDecodesAsOne) {
    const int tp = GetParam();
    const int gpus = cuda::device_count();
    if (gpus < tp) GTEST_SKIP() << "TP=" << tp << " needs " << tp << " GPUs, this machine has " << gpus;
    // A small random llama with head_dim 64 (the golden fixtures' 16 is below what the CUDA attention takes).
    const fs::path root =
        fs::temp_directory_path() / ("nibble-tp-serve-" + std::to_string(getpid()) + "-tp" + std::to_string(tp));
    const fs::path dir = test::write_checkpoint(root / "llama", test::TinyArch{}, 21);
    ThreadPool pool(0);
    std::unique_ptr<Model> model = load_model(dir.string(), pool);
    const int64_t vocab = model->config().vocab_size;
    DecoderView view;
    ASSERT_TRUE(model->decoder_view(view));

    NIBBLE_CUDA_CHECK(cudaSetDevice(0));
    std::map<std::string, std::vector<int32_t>> expected;
    {
        auto weights = std::make_shared<const gpu::DeviceDecoder>(gpu::upload_decoder(model->config(), view));
        Engine engine(*model, engine_config(), std::make_unique<gpu::CudaModelRunner>(weights, runner_options()));
        expected = serve(engine, vocab);
    }
    ASSERT_EQ(expected.size(), 9u);

    auto channel = std::make_unique<StepChannelLeader>(
        StepChannelOptions{.master_addr = "127.0.0.1", .port = 0, .world_size = tp, .rank = 0, .timeout_ms = 60000});
    const int channel_port = channel->port();
    const int nccl_port = 29650 + tp;  // one rendezvous port per group size: the last group's socket may linger
    // [tp] per follower rank ([0] unused): steps run and the error that stopped it.
    std::vector<int64_t> follower_steps(static_cast<size_t>(tp), -1);
    std::vector<std::exception_ptr> follower_errors(static_cast<size_t>(tp));
    std::vector<std::thread> followers;
    for (int r = 1; r < tp; ++r)
        followers.emplace_back([&, r] {
            try {
                NIBBLE_CUDA_CHECK(cudaSetDevice(r));
                auto weights = std::make_shared<const gpu::DeviceDecoder>(
                    gpu::upload_decoder_rank(model->config(), model->quant_config(), view, tp, r));
                auto runner = std::make_unique<gpu::CudaModelRunner>(weights, runner_options());
                StepChannelFollower ch({.master_addr = "127.0.0.1", .port = channel_port, .world_size = tp, .rank = r,
                                        .timeout_ms = 60000});
                auto comm = gpu::join_tensor_parallel_group(
                    *runner, {.world_size = tp, .rank = r, .device = r, .master_port = nccl_port, .timeout_ms = 60000});
                follower_steps[static_cast<size_t>(r)] = gpu::run_tensor_parallel_follower(*runner, ch);
                runner.reset();
                comm.reset();
            } catch (...) {
                follower_errors[static_cast<size_t>(r)] = std::current_exception();
            }
        });
    std::map<std::string, std::vector<int32_t>> got;
    try {
        NIBBLE_CUDA_CHECK(cudaSetDevice(0));
        auto weights = std::make_shared<const gpu::DeviceDecoder>(
            gpu::upload_decoder_rank(model->config(), model->quant_config(), view, tp, 0));
        auto runner = std::make_unique<gpu::CudaModelRunner>(weights, runner_options());
        channel->accept_followers();
        auto comm = gpu::join_tensor_parallel_group(
            *runner, {.world_size = tp, .rank = 0, .device = 0, .master_port = nccl_port, .timeout_ms = 60000});
        Engine engine(*model, engine_config(),
                      gpu::make_tensor_parallel_leader(std::move(channel), std::move(runner), std::move(comm)));
        got = serve(engine, vocab);
    } catch (const std::exception& e) {
        ADD_FAILURE() << "rank 0 of " << tp << ": " << e.what();
    }  // the engine's leader sends Shutdown here
    for (std::thread& t : followers) t.join();
    for (int r = 1; r < tp; ++r) {
        if (follower_errors[static_cast<size_t>(r)]) {
            try {
                std::rethrow_exception(follower_errors[static_cast<size_t>(r)]);
            } catch (const std::exception& e) {
                ADD_FAILURE() << "rank " << r << " of " << tp << ": " << e.what();
            }
        }
        EXPECT_GE(follower_steps[static_cast<size_t>(r)], 8)
            << "rank " << r << " of " << tp << ": a prefill and 7 decode steps at least";
        EXPECT_EQ(follower_steps[static_cast<size_t>(r)], follower_steps[1]) << "rank " << r << " vs rank 1";
    }
    EXPECT_EQ(got, expected);
    fs::remove_all(root);
    std::printf("[  detail  ] TP=%d serve path: %zu requests, rank 1 ran %lld steps\n", tp, got.size(),
                static_cast<long long>(follower_steps[1]));
}

INSTANTIATE_TEST_SUITE_P(Llama, TensorParallelServeCuda, ::testing::Values(2, 4),
                         [](const auto& info) { return "tp" + std::to_string(info.param); });

}  // namespace
}  // namespace nibble
