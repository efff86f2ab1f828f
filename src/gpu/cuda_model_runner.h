// The CUDA backend's ModelRunner: the dense decoder's weights and its paged KV cache in device memory, each
// step's batch staged to the device in one copy, the forward on one stream, and either the float32 logits of
// the sampled rows copied back (for the engine's sampler) or, for greedy steps, only their argmax tokens.
#pragma once

#include <cuda_runtime.h>

#include <compare>
#include <cstdint>
#include <map>
#include <memory>
#include <span>
#include <vector>

#include "engine/model_runner.h"
#include "gpu/decoder_forward.h"
#include "gpu/device_decoder.h"
#include "ops/sampling/sample_cuda.h"
#include "gpu/device_forward.h"
#include "gpu/device_hybrid.h"
#include "gpu/hybrid_forward.h"

namespace nibble::gpu {

struct CudaRunnerOptions {
    KvDtype kv_dtype = KvDtype::Bf16;
    int64_t num_blocks = 0;                  // KV blocks (from the memory plan)
    int64_t block_size = 16;
    int64_t max_model_len = 4096;            // bounds each sequence's block table
    int64_t max_num_batched_tokens = 2048;   // rows per step
    int64_t max_num_seqs = 256;              // sequences per step
    DType act_dtype = DType::BF16;           // F32: the exactness mode of the device tests
    // Decode steps of up to this many sequences replay CUDA graphs (vLLM's --max-cudagraph-capture-size);
    // 0 runs every step eagerly (vLLM's --enforce-eager).
    int64_t max_cudagraph_capture_size = 256;
    bool fused_gemv = true;  // decode: q/k/v in one launch, gate/up with SwiGLU in one (NVFP4 weights)
    // The autotuner's kernel choices (tune cache + device profile + build targets); null: the ops' built-in
    // dispatch. Resolved once at construction (DecoderForward::set_kernel_choices); shared so that several
    // runners (and tests) see one record of failed variants and launches.
    std::shared_ptr<tune::KernelChoices> kernel_choices;
    // Hybrid models (NemotronH): recurrent-state slots (RunnerSequence::state_slot), their SSM state's
    // dtype (--mamba-ssm-cache-dtype) and snapshots for prefix caching.
    int64_t num_state_slots = 0;
    SsmStateDtype ssm_dtype = SsmStateDtype::F32;
    int64_t num_state_snapshots = 0;
    // The stream every step runs on, owned by the caller (a tensor-parallel rank shares it with its
    // NcclCommunicator); null: the runner makes its own.
    cudaStream_t stream = nullptr;
};

class CudaModelRunner final : public ModelRunner {
public:
    CudaModelRunner(std::shared_ptr<const DeviceDecoder> weights, const CudaRunnerOptions& options);
    // A hybrid model (NemotronH): options.num_state_slots recurrent states beside the KV cache.
    CudaModelRunner(std::shared_ptr<const DeviceHybrid> weights, const CudaRunnerOptions& options);
    ~CudaModelRunner() override;

    int64_t vocab_size() const override { return hybrid_ ? hybrid_->config.vocab_size : weights_->vocab_size(); }
    void execute(std::span<const RunnerSequence> batch, std::vector<float>& logits) override;
    // As execute, but the sampled rows' argmax tokens (greedy decoding) instead of their logits.
    bool samples_greedy_on_device() const override { return true; }
    void execute_greedy(std::span<const RunnerSequence> batch, std::vector<int32_t>& tokens) override;
    // As execute, but each sampled row's token drawn on the device (ops/sampling/sample_cuda.h).
    bool samples_on_device() const override { return true; }
    void execute_sample(std::span<const RunnerSequence> batch, std::span<const RowSampling> rows,
                        std::vector<int32_t>& tokens) override;
    int64_t num_state_snapshots() const override { return fwd_->num_state_snapshots(); }
    void save_state_snapshot(int32_t state_slot, int32_t snapshot) override;
    void restore_state_snapshot(int32_t snapshot, int32_t state_slot) override;

    // Tensor parallelism: the group of this rank (its weights a shard, weights().sharded()); required before
    // the first step. Its collectives must be enqueued on stream() (NcclCommunicator(bootstrap, stream())).
    void set_communicator(Communicator* comm);
    // The forward of one step and nothing else, waited for: what ranks other than 0 run for each step rank 0
    // executes (every rank runs the same steps in the same order, so their collectives match).
    void run_step(std::span<const RunnerSequence> batch);

    const DeviceDecoder& weights() const { return *weights_; }
    const DeviceKvCache& kv_cache() const { return *kv_; }
    cudaStream_t stream() const { return stream_; }

    // Graphs captured so far (decode buckets x cache-length classes), for logs and tests.
    int64_t num_cuda_graphs() const { return static_cast<int64_t>(graphs_.size()); }
    // Batch sizes decode graphs are captured for: 1, 2, 4, 8, then multiples of 8 up to the capture size.
    static std::vector<int64_t> graph_batch_sizes(int64_t max_capture_size);

private:
    CudaModelRunner(std::shared_ptr<const DeviceDecoder> weights, std::shared_ptr<const DeviceHybrid> hybrid,
                    const CudaRunnerOptions& options);
    // Copies the batch's tokens, positions, slots, block tables and logits rows to the device. With
    // pad_to > batch size, padding sequences (one token, no cache write) fill the batch up to it, and
    // table_stride / kv_bound fix the shapes a captured graph was made with.
    DeviceBatch stage(std::span<const RunnerSequence> batch, int64_t pad_to = 0, int64_t table_blocks = 0,
                      int64_t kv_bound = 0);
    // Runs the forward of `batch`: a graph replay for decode steps within the capture size, else eagerly.
    DeviceBatch run_forward(std::span<const RunnerSequence> batch);
    struct GraphKey {
        int64_t batch, kv_bound;
        auto operator<=>(const GraphKey&) const = default;
    };

    std::shared_ptr<const DeviceDecoder> weights_;  // shared: a benchmark runs several caches over one upload
    CudaRunnerOptions options_;
    std::unique_ptr<DeviceKvCache> kv_;
    std::unique_ptr<DecoderForward> forward_;
    std::shared_ptr<const DeviceHybrid> hybrid_;       // a hybrid model's weights (then weights_ is null)
    std::unique_ptr<HybridForward> hybrid_forward_;
    DeviceForward* fwd_ = nullptr;                     // forward_ or hybrid_forward_
    cudaStream_t stream_ = nullptr;
    int64_t max_blocks_per_seq_ = 0;
    void* staging_host_ = nullptr;     // pinned, staging_bytes_
    cuda::DeviceBuffer staging_device_;
    size_t staging_bytes_ = 0;
    float* logits_host_ = nullptr;     // pinned [max_num_seqs, vocab]
    int32_t* tokens_host_ = nullptr;   // pinned [max_num_seqs]
    cuda::DeviceBuffer tokens_device_;  // [max_num_seqs] argmax results
    cuda::RowSamplingParams* sampling_host_ = nullptr;  // pinned [max_num_seqs]
    cuda::DeviceBuffer sampling_device_;                // [max_num_seqs] RowSamplingParams
    std::vector<int64_t> graph_sizes_;
    std::map<GraphKey, cudaGraphExec_t> graphs_;
    cuda::DeviceBuffer graph_workspace_;  // attention splits of every captured graph (sized once)
    bool graphs_failed_ = false;          // a capture failed: eager from then on (logged once)
};

}  // namespace nibble::gpu
