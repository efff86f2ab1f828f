// Helpers of the tensor-parallel device tests (tensor_parallel_forward_test.cpp, expert_parallel_forward_test.cpp):
// a prompt and greedy decode steps run by the ranks of a TP group as threads of this process on GPUs
// 0 .. tp-1 (one NCCL group), and the comparison of TP = N with TP = 1 that both tests make.
#pragma once

#include <gtest/gtest.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <exception>
#include <memory>
#include <span>
#include <string>
#include <thread>
#include <vector>

#include "cuda/cuda_check.h"
#include "cuda/device_info.h"
#include "gpu/cuda_model_runner.h"
#include "gpu/weight_upload.h"
#include "model/model.h"
#include "parallel/nccl_communicator.h"

namespace nibble::test {

constexpr int kTpDecodeSteps = 12;

struct RankResult {
    std::vector<std::vector<float>> logits;  // [steps][vocab]: prefill's last row, then each decode step
    std::vector<int32_t> greedy;             // [steps] argmax of each
    int64_t experts_held = 0;                // a MoE layer's experts on this rank (0: no MoE layer)
};

inline int32_t argmax_of(const std::vector<float>& row) {
    return static_cast<int32_t>(std::max_element(row.begin(), row.end()) - row.begin());
}

// Runs the prompt and kTpDecodeSteps decode steps on tp ranks (GPUs 0 .. tp-1, rendezvous on 127.0.0.1:port);
// decode feeds `forced` when given, else each step's own greedy token. Every rank's result; a rank's failure
// is a test failure naming it.
inline std::vector<RankResult> run_ranks(const Model& model, int tp, DType act, int64_t graph_size,
                                         const std::vector<int32_t>& prompt, const std::vector<int32_t>& forced,
                                         int port) {
    DecoderView view;
    EXPECT_TRUE(model.decoder_view(view));
    std::vector<RankResult> results(static_cast<size_t>(tp));
    std::vector<std::exception_ptr> errors(static_cast<size_t>(tp));
    std::vector<std::thread> threads;
    for (int r = 0; r < tp; ++r)
        threads.emplace_back([&, r] {
            try {
                NIBBLE_CUDA_CHECK(cudaSetDevice(r));
                auto weights = std::make_shared<const gpu::DeviceDecoder>(
                    gpu::upload_decoder_rank(model.config(), model.quant_config(), view, tp, r));
                RankResult& out = results[static_cast<size_t>(r)];
                for (const gpu::DeviceDecoderLayer& L : weights->layers)
                    if (L.moe) out.experts_held = L.experts.n_experts;
                cudaStream_t stream = nullptr;
                NIBBLE_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
                std::unique_ptr<NcclCommunicator> comm;
                if (tp > 1) {
                    comm = std::make_unique<NcclCommunicator>(
                        NcclBootstrap{.world_size = tp, .rank = r, .device = r, .master_addr = "127.0.0.1",
                                      .master_port = port, .timeout_ms = 60000},
                        stream);
                }
                {
                    gpu::CudaModelRunner runner(weights, {.kv_dtype = KvDtype::Bf16,
                                                          .num_blocks = 16,
                                                          .block_size = 16,
                                                          .max_model_len = 256,
                                                          .max_num_batched_tokens = 128,
                                                          .max_num_seqs = 4,
                                                          .act_dtype = act,
                                                          .max_cudagraph_capture_size = graph_size,
                                                          .stream = stream});
                    runner.set_communicator(comm.get());
                    std::vector<int32_t> table(16);
                    for (int i = 0; i < 16; ++i) table[static_cast<size_t>(i)] = i;
                    std::vector<float> logits;
                    const RunnerSequence prefill{.tokens = prompt, .block_table = table, .start_pos = 0,
                                                 .needs_logits = true};
                    runner.execute(std::span(&prefill, 1), logits);
                    out.logits.push_back(logits);
                    out.greedy.push_back(argmax_of(logits));
                    for (int step = 0; step < kTpDecodeSteps; ++step) {
                        const std::vector<int32_t> token{forced.empty() ? out.greedy.back()
                                                                        : forced[static_cast<size_t>(step)]};
                        const RunnerSequence s{.tokens = token, .block_table = table,
                                               .start_pos = static_cast<int64_t>(prompt.size()) + step,
                                               .needs_logits = true};
                        runner.execute(std::span(&s, 1), logits);
                        out.logits.push_back(logits);
                        out.greedy.push_back(argmax_of(logits));
                    }
                    if (graph_size > 0) {
                        EXPECT_GE(runner.num_cuda_graphs(), 1) << "rank " << r;
                    }
                }
                comm.reset();
                (void)cudaStreamDestroy(stream);
            } catch (...) {
                errors[static_cast<size_t>(r)] = std::current_exception();
            }
        });
    for (std::thread& t : threads) t.join();
    for (int r = 0; r < tp; ++r)
        if (errors[static_cast<size_t>(r)]) {
            try {
                std::rethrow_exception(errors[static_cast<size_t>(r)]);
            } catch (const std::exception& e) {
                ADD_FAILURE() << "rank " << r << " of " << tp << ": " << e.what();
            }
        }
    return results;
}

struct TpComparison {
    double worst = 0;   // largest |TP=N - TP=1| logit over steps and ranks
    int near_ties = 0;  // BF16 (rank, step) pairs whose greedy token differs within the tolerance
};

// GPUs a TP = tp case needs, or a GTEST_SKIP reason naming the count when this machine has fewer ("" when it
// has enough).
inline std::string missing_gpus(int tp) {
    const int gpus = cuda::device_count();
    if (gpus >= tp) return "";
    return "TP=" + std::to_string(tp) + " needs " + std::to_string(tp) + " GPUs, this machine has " +
           std::to_string(gpus);
}

// TP = N (`many`, N = many.size() ranks fed TP = 1's tokens) against TP = 1 (`one`): at every step and on every
// rank finite logits within rel x max(1, RMS of TP = 1's) and the same greedy token (with F32 activations
// always; otherwise a difference only at a near-tie, counted per rank and step); every rank holds the same
// gathered logits as rank 0, bit for bit (the all-gather hands each rank the same rows).
inline TpComparison compare_tp_with_one(const std::vector<RankResult>& one, const std::vector<RankResult>& many,
                                        DType act, double rel) {
    TpComparison out;
    EXPECT_EQ(one.size(), 1u);
    EXPECT_GE(many.size(), 2u);
    if (one.empty() || many.size() < 2) return out;
    for (size_t step = 0; step < one[0].logits.size(); ++step) {
        const std::vector<float>& ref = one[0].logits[step];
        double ms = 0;
        for (float v : ref) ms += static_cast<double>(v) * v;
        const double tol = rel * std::max(1.0, std::sqrt(ms / static_cast<double>(ref.size())));
        for (size_t r = 0; r < many.size(); ++r) {
            const RankResult& rank = many[r];
            EXPECT_EQ(rank.logits.size(), one[0].logits.size()) << "rank " << r << " of " << many.size();
            if (rank.logits.size() != one[0].logits.size()) return out;
            const std::vector<float>& got = rank.logits[step];
            EXPECT_EQ(got.size(), ref.size()) << "rank " << r << " of " << many.size();
            if (got.size() != ref.size()) return out;
            double d = 0;
            for (size_t i = 0; i < ref.size(); ++i) {
                EXPECT_TRUE(std::isfinite(got[i])) << "rank " << r << " of " << many.size() << " step " << step
                                                   << " logit " << i;
                if (!std::isfinite(got[i])) return out;
                d = std::max(d, std::fabs(static_cast<double>(got[i]) - ref[i]));
            }
            EXPECT_LE(d, tol) << "rank " << r << " of " << many.size() << " step " << step;
            out.worst = std::max(out.worst, d);
            const int32_t want = one[0].greedy[step], have = rank.greedy[step];
            if (have != want) {
                EXPECT_NE(act, DType::F32) << "rank " << r << " of " << many.size() << " step " << step << ": greedy "
                                           << have << " vs TP=1 " << want;
                EXPECT_LT(ref[static_cast<size_t>(want)] - ref[static_cast<size_t>(have)], tol)
                    << "rank " << r << " of " << many.size() << " step " << step << ": greedy " << have
                    << " vs TP=1 " << want << " beyond a near-tie";
                ++out.near_ties;
            }
            if (r > 0) {  // the same gathered logits on every rank
                EXPECT_EQ(got, many[0].logits[step]) << "rank " << r << " vs rank 0 of " << many.size() << ", step "
                                                     << step;
            }
        }
    }
    return out;
}

}  // namespace nibble::test
