// The engine sampling on the CUDA runner (ModelRunner::execute_sample: the device kernel of
// ops/sampling/sample_cuda.h, greedy rows by argmax) generates what it generates sampling on the host over the
// CPU runner, for seeded temperature / top-k / top-p / min-p requests batched with a greedy one, on a small
// random llama checkpoint with F32 activations.
//
// Both sides draw the same u per step from each sequence's stream and walk the same rule; the logits differ
// by float32 summation order (and the rare BF16 K/V rounding flip, see decoder_forward_test.cpp), which moves a
// cumulative probability by about 1e-6 relative, so a draw lands on the other side of a boundary with
// probability of that order per kept token per step. The requests are few and short (40 draws) and the
// filters keep few tokens, so a run fails spuriously about once in a thousand or less; a failure's seed is
// printed (NIBBLE_TEST_SEED replays it).
#include <gtest/gtest.h>

#include <filesystem>
#include <map>
#include <mutex>
#include <random>
#include <string>
#include <unistd.h>
#include <vector>

#include "base/thread_pool.h"
#include "decoder_forward_util.h"
#include "device_test_util.h"
#include "engine/engine.h"
#include "engine/model_runner.h"
#include "gpu/cuda_model_runner.h"
#include "gpu/weight_upload.h"
#include "model/model.h"

namespace nibble {
namespace {

namespace fs = std::filesystem;

// Forwards to the CUDA runner, counting the steps the engine sent down the device-sampling path.
class CountingRunner final : public ModelRunner {
public:
    explicit CountingRunner(std::unique_ptr<ModelRunner> inner) : inner_(std::move(inner)) {}
    int64_t vocab_size() const override { return inner_->vocab_size(); }
    void execute(std::span<const RunnerSequence> batch, std::vector<float>& logits) override {
        inner_->execute(batch, logits);
    }
    bool samples_greedy_on_device() const override { return inner_->samples_greedy_on_device(); }
    void execute_greedy(std::span<const RunnerSequence> batch, std::vector<int32_t>& tokens) override {
        inner_->execute_greedy(batch, tokens);
    }
    bool samples_on_device() const override { return inner_->samples_on_device(); }
    void execute_sample(std::span<const RunnerSequence> batch, std::span<const RowSampling> rows,
                        std::vector<int32_t>& tokens) override {
        ++*sample_calls;
        inner_->execute_sample(batch, rows, tokens);
    }
    std::shared_ptr<int> sample_calls = std::make_shared<int>(0);

private:
    std::unique_ptr<ModelRunner> inner_;
};

TEST(SamplingEngineCuda, SeededSamplingOnCudaMatchesTheCpu) {
    NIBBLE_REQUIRE_GPU();
    const fs::path root = fs::temp_directory_path() / ("nibble-sampling-" + std::to_string(::getpid()));
    const fs::path dir = test::write_checkpoint(root / "llama", {}, 11);
    ThreadPool pool(0);
    std::unique_ptr<Model> model = load_model(dir.string(), pool);
    DecoderView view;
    ASSERT_TRUE(model->decoder_view(view));
    const EngineConfig cfg{.max_model_len = 256, .max_num_seqs = 8, .max_num_batched_tokens = 128, .block_size = 16,
                           .num_blocks = 96, .enable_prefix_caching = true, .kv_cache_dtype = KvDtype::Bf16};
    auto weights = std::make_shared<gpu::DeviceDecoder>(gpu::upload_decoder(model->config(), view));
    const uint64_t seed = test::fresh_seed();
    std::mt19937_64 rng(seed);
    std::uniform_int_distribution<int32_t> tok(0, static_cast<int32_t>(model->config().vocab_size - 1));
    std::vector<GenerationRequest> requests;
    const std::vector<SamplingParams> mixes = {
        {.temperature = 0.5f, .top_k = 8, .top_p = 1.0f, .min_p = 0.0f},
        {.temperature = 1.0f, .top_k = 20, .top_p = 0.6f, .min_p = 0.1f},
        {.temperature = 0.3f, .top_k = -1, .top_p = 0.3f, .min_p = 0.0f},
        {.temperature = 0.0f},  // greedy, batched with the sampled ones (the kernel's argmax rows)
    };
    for (size_t i = 0; i < mixes.size(); ++i) {
        GenerationRequest r;
        r.id = std::string("r").append(std::to_string(i));
        r.prompt.resize(5 + 13 * i);
        for (auto& t : r.prompt) t = tok(rng);
        r.sampling = mixes[i];
        r.sampling.seed = seed + i;
        r.n = i == 1 ? 2 : 1;
        r.max_tokens = 8;
        r.ignore_eos = true;
        requests.push_back(r);
    }
    using Outputs = std::map<std::string, std::map<int, std::vector<int32_t>>>;
    auto generate = [&](std::unique_ptr<ModelRunner> runner) {
        Engine engine(*model, cfg, std::move(runner));
        std::mutex mu;
        Outputs out;
        for (const auto& r : requests)
            engine.submit(r, [&](const RequestOutput& o) {
                std::lock_guard lock(mu);
                for (const auto& s : o.outputs) {
                    auto& t = out[o.request_id][s.index];
                    t.insert(t.end(), s.tokens.begin(), s.tokens.end());
                }
            });
        int steps = 0;
        while (engine.step()) EXPECT_LT(++steps, 10000);
        return out;
    };
    const Outputs on_cpu = generate(nullptr);
    auto counting = std::make_unique<CountingRunner>(std::make_unique<gpu::CudaModelRunner>(
        weights, gpu::CudaRunnerOptions{.kv_dtype = KvDtype::Bf16, .num_blocks = 96, .block_size = 16,
                                        .max_model_len = 256, .max_num_batched_tokens = 128, .max_num_seqs = 8,
                                        .act_dtype = DType::F32, .max_cudagraph_capture_size = 8}));
    const std::shared_ptr<int> sample_calls = counting->sample_calls;
    const Outputs on_gpu = generate(std::move(counting));
    EXPECT_GE(*sample_calls, 8);  // every step sampled on the device (a prefill, then decode steps from graphs)
    ASSERT_EQ(on_cpu.size(), requests.size());
    for (const auto& [id, samples] : on_cpu) {
        for (const auto& [index, tokens] : samples) {
            EXPECT_EQ(tokens.size(), 8u) << id << " sample " << index;
            EXPECT_EQ(on_gpu.at(id).at(index), tokens) << id << " sample " << index;
        }
    }
    fs::remove_all(root);
}

}  // namespace
}  // namespace nibble
