#include "gpu/cuda_model_runner.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "base/error.h"
#include "base/log.h"
#include "cuda/cuda_check.h"
#include "model/transformer_blocks.h"
#include "ops/sampling/argmax_cuda.h"

namespace nibble::gpu {
namespace {

size_t align16(size_t n) { return (n + 15) / 16 * 16; }

// Byte offsets of the staged arrays in one buffer (each 16-byte aligned).
struct StagingLayout {
    size_t tokens, positions, slots, q_start, start_pos, logit_rows, state_slots, block_tables, total;
    StagingLayout(int64_t n_tokens, int64_t n_seqs, int64_t max_blocks) {
        size_t at = 0;
        auto take = [&](size_t bytes) {
            const size_t here = at;
            at += align16(bytes);
            return here;
        };
        tokens = take(static_cast<size_t>(n_tokens) * 4);
        positions = take(static_cast<size_t>(n_tokens) * 8);
        slots = take(static_cast<size_t>(n_tokens) * 8);
        q_start = take(static_cast<size_t>(n_seqs + 1) * 4);
        start_pos = take(static_cast<size_t>(n_seqs) * 4);
        logit_rows = take(static_cast<size_t>(n_seqs) * 4);
        state_slots = take(static_cast<size_t>(n_seqs) * 4);
        block_tables = take(static_cast<size_t>(n_seqs * max_blocks) * 4);
        total = at;
    }
};

}  // namespace

CudaModelRunner::CudaModelRunner(std::shared_ptr<const DeviceDecoder> weights, const CudaRunnerOptions& o)
    : CudaModelRunner(std::move(weights), nullptr, o) {}

CudaModelRunner::CudaModelRunner(std::shared_ptr<const DeviceHybrid> weights, const CudaRunnerOptions& o)
    : CudaModelRunner(nullptr, std::move(weights), o) {}

CudaModelRunner::CudaModelRunner(std::shared_ptr<const DeviceDecoder> weights,
                                 std::shared_ptr<const DeviceHybrid> hybrid, const CudaRunnerOptions& o)
    : weights_(std::move(weights)), options_(o), hybrid_(std::move(hybrid)) {
    const ModelConfig& c = hybrid_ ? hybrid_->config : weights_->config;
    NIBBLE_CHECK(o.num_blocks > 0 && o.block_size > 0, "CUDA runner: {} KV blocks of {} tokens", o.num_blocks,
                 o.block_size);
    if (hybrid_) {  // the KV cache holds the attention layers only; the Mamba state lives in the forward's slots
        kv_ = std::make_unique<DeviceKvCache>(attention_kv_cache_shape(c, hybrid_->n_attention, o.num_blocks,
                                                                       o.block_size, o.kv_dtype, hybrid_->k_scales,
                                                                       hybrid_->v_scales));
        hybrid_forward_ = std::make_unique<HybridForward>(*hybrid_, o.act_dtype, o.max_num_batched_tokens,
                                                          o.max_num_seqs, o.num_state_slots, o.ssm_dtype,
                                                          o.num_state_snapshots);
        fwd_ = hybrid_forward_.get();
    } else {
        kv_ = std::make_unique<DeviceKvCache>(attention_kv_cache_shape(c, c.n_layers, o.num_blocks, o.block_size,
                                                                       o.kv_dtype, weights_->k_scales,
                                                                       weights_->v_scales));
        forward_ = std::make_unique<DecoderForward>(*weights_, o.act_dtype, o.max_num_batched_tokens, o.max_num_seqs);
        forward_->set_fused_gemv(o.fused_gemv);
        if (o.kernel_choices)
            forward_->set_kernel_choices(o.kernel_choices, o.kv_dtype, o.max_num_seqs, o.max_model_len);
        fwd_ = forward_.get();
    }
    if (o.stream != nullptr)
        stream_ = o.stream;
    else
        NIBBLE_CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
    max_blocks_per_seq_ = (o.max_model_len + o.block_size - 1) / o.block_size;
    staging_bytes_ = StagingLayout(o.max_num_batched_tokens, o.max_num_seqs, max_blocks_per_seq_).total;
    NIBBLE_CUDA_CHECK(cudaHostAlloc(&staging_host_, staging_bytes_, cudaHostAllocDefault));
    staging_device_ = cuda::DeviceBuffer(staging_bytes_);
    NIBBLE_CUDA_CHECK(cudaHostAlloc(reinterpret_cast<void**>(&logits_host_),
                                    static_cast<size_t>(o.max_num_seqs * vocab_size()) * sizeof(float),
                                    cudaHostAllocDefault));
    NIBBLE_CUDA_CHECK(cudaHostAlloc(reinterpret_cast<void**>(&tokens_host_),
                                    static_cast<size_t>(o.max_num_seqs) * sizeof(int32_t), cudaHostAllocDefault));
    tokens_device_ = cuda::DeviceBuffer(static_cast<size_t>(o.max_num_seqs) * sizeof(int32_t));
    NIBBLE_CUDA_CHECK(cudaHostAlloc(reinterpret_cast<void**>(&sampling_host_),
                                    static_cast<size_t>(o.max_num_seqs) * sizeof(cuda::RowSamplingParams),
                                    cudaHostAllocDefault));
    sampling_device_ = cuda::DeviceBuffer(static_cast<size_t>(o.max_num_seqs) * sizeof(cuda::RowSamplingParams));
    graph_sizes_ = graph_batch_sizes(std::min({o.max_cudagraph_capture_size, o.max_num_seqs, o.max_num_batched_tokens}));
    // One workspace for every graph, sized for the most splits any of them can use (the longest cache).
    size_t most = 0;
    for (int64_t b : graph_sizes_) {
        const DeviceBatch probe{.n_tokens = b, .n_seqs = b, .max_q_len = 1, .max_kv_len = o.max_model_len,
                                .max_blocks = max_blocks_per_seq_};
        most = std::max(most, fwd_->attention_workspace_bytes(fwd_->attention_splits(probe, *kv_), b));
        // Split counts differ per cache-length class (tuned ones, and the short-context rule of
        // paged_attention_splits): room for the most any class of this batch uses.
        for (int64_t bound = 1024; bound < o.max_model_len; bound *= 2) {
            DeviceBatch shorter = probe;
            shorter.max_kv_len = bound;
            most = std::max(most, fwd_->attention_workspace_bytes(fwd_->attention_splits(shorter, *kv_), b));
        }
    }
    graph_workspace_ = cuda::DeviceBuffer(most);
}

std::vector<int64_t> CudaModelRunner::graph_batch_sizes(int64_t max_capture_size) {
    std::vector<int64_t> sizes;
    for (int64_t b : {1, 2, 4})
        if (b <= max_capture_size) sizes.push_back(b);
    for (int64_t b = 8; b <= max_capture_size; b += 8) sizes.push_back(b);
    if (max_capture_size > 0 && sizes.back() != max_capture_size && max_capture_size > 8) sizes.push_back(max_capture_size);
    return sizes;
}

CudaModelRunner::~CudaModelRunner() {
    if (stream_) (void)cudaStreamSynchronize(stream_);
    for (auto& [key, exec] : graphs_) (void)cudaGraphExecDestroy(exec);
    forward_.reset();
    hybrid_forward_.reset();
    (void)cudaFreeHost(staging_host_);
    (void)cudaFreeHost(logits_host_);
    (void)cudaFreeHost(tokens_host_);
    (void)cudaFreeHost(sampling_host_);
    if (stream_ && options_.stream == nullptr) (void)cudaStreamDestroy(stream_);
}

DeviceBatch CudaModelRunner::stage(std::span<const RunnerSequence> batch, int64_t pad_to, int64_t table_blocks,
                                   int64_t kv_bound) {
    const int64_t n_real = static_cast<int64_t>(batch.size());
    const int64_t n_seqs = std::max(n_real, pad_to);
    NIBBLE_CHECK(n_real > 0 && n_seqs <= options_.max_num_seqs, "CUDA runner: {} sequences in a step of at most {}",
                 n_seqs, options_.max_num_seqs);
    int64_t n_tokens = 0, max_q = 0, max_kv = 0, max_blocks = 1;
    for (const RunnerSequence& s : batch) {
        const int64_t n = static_cast<int64_t>(s.tokens.size());
        NIBBLE_CHECK(n > 0, "CUDA runner: a sequence with no new tokens");
        const int64_t end = s.start_pos + n;
        const int64_t blocks_needed = (end + options_.block_size - 1) / options_.block_size;
        NIBBLE_CHECK(static_cast<int64_t>(s.block_table.size()) >= blocks_needed,
                     "CUDA runner: block table of {} blocks for {} positions", s.block_table.size(), end);
        NIBBLE_CHECK(blocks_needed <= max_blocks_per_seq_, "CUDA runner: {} positions exceed max_model_len {}", end,
                     options_.max_model_len);
        n_tokens += n;
        max_q = std::max(max_q, n);
        max_kv = std::max(max_kv, end);
        max_blocks = std::max(max_blocks, blocks_needed);
    }
    n_tokens += n_seqs - n_real;  // one token per padding sequence
    NIBBLE_CHECK(n_tokens <= options_.max_num_batched_tokens, "CUDA runner: {} tokens in a step of at most {}",
                 n_tokens, options_.max_num_batched_tokens);
    if (table_blocks > 0) max_blocks = table_blocks;
    if (kv_bound > 0) max_kv = kv_bound;
    if (n_seqs > n_real) max_q = std::max<int64_t>(max_q, 1);
    const StagingLayout L(n_tokens, n_seqs, max_blocks);
    auto* base = static_cast<uint8_t*>(staging_host_);
    auto* tokens = reinterpret_cast<int32_t*>(base + L.tokens);
    auto* positions = reinterpret_cast<int64_t*>(base + L.positions);
    auto* slots = reinterpret_cast<int64_t*>(base + L.slots);
    auto* q_start = reinterpret_cast<int32_t*>(base + L.q_start);
    auto* start_pos = reinterpret_cast<int32_t*>(base + L.start_pos);
    auto* logit_rows = reinterpret_cast<int32_t*>(base + L.logit_rows);
    auto* state_slots = reinterpret_cast<int32_t*>(base + L.state_slots);
    auto* tables = reinterpret_cast<int32_t*>(base + L.block_tables);
    const int64_t bs = options_.block_size, vocab = vocab_size();
    int64_t row = 0, n_logits = 0;
    for (int64_t si = n_real; si < n_seqs; ++si) {  // padding: token 0 at position 0, its K/V not written
        q_start[si] = static_cast<int32_t>(n_tokens - (n_seqs - si));
        start_pos[si] = 0;
        state_slots[si] = -1;  // a hybrid forward computes it in its scratch slot
    }
    for (int64_t si = 0; si < n_real; ++si) {
        const RunnerSequence& s = batch[static_cast<size_t>(si)];
        q_start[si] = static_cast<int32_t>(row);
        start_pos[si] = static_cast<int32_t>(s.start_pos);
        const int64_t n_state_slots = fwd_->num_state_slots();
        NIBBLE_CHECK(n_state_slots == 0 || (s.state_slot >= 0 && s.state_slot < n_state_slots),
                     "CUDA runner: state slot {} outside the {} slots", s.state_slot, n_state_slots);
        state_slots[si] = s.state_slot;
        for (size_t i = 0; i < s.tokens.size(); ++i, ++row) {
            NIBBLE_CHECK(s.tokens[i] >= 0 && s.tokens[i] < vocab, "token id {} outside the vocabulary of {}",
                         s.tokens[i], vocab);
            const int64_t pos = s.start_pos + static_cast<int64_t>(i);
            const int32_t block = s.block_table[static_cast<size_t>(pos / bs)];
            NIBBLE_CHECK(block >= 0 && block < options_.num_blocks, "CUDA runner: block {} outside the cache of {}",
                         block, options_.num_blocks);
            tokens[row] = s.tokens[i];
            positions[row] = pos;
            slots[row] = static_cast<int64_t>(block) * bs + pos % bs;
        }
        if (s.needs_logits) logit_rows[n_logits++] = static_cast<int32_t>(row - 1);
        for (int64_t b = 0; b < max_blocks; ++b)
            tables[si * max_blocks + b] =
                b < static_cast<int64_t>(s.block_table.size()) ? s.block_table[static_cast<size_t>(b)] : 0;
    }
    for (int64_t si = n_real; si < n_seqs; ++si, ++row) {
        tokens[row] = 0;
        positions[row] = 0;
        slots[row] = -1;
        logit_rows[n_logits++] = static_cast<int32_t>(row);
        std::fill(tables + si * max_blocks, tables + (si + 1) * max_blocks, 0);
    }
    q_start[n_seqs] = static_cast<int32_t>(row);
    NIBBLE_CUDA_CHECK(cudaMemcpyAsync(staging_device_.get(), staging_host_, L.total, cudaMemcpyHostToDevice, stream_));
    auto* dev = staging_device_.as<uint8_t>();
    return {.n_tokens = n_tokens,
            .n_seqs = n_seqs,
            .max_q_len = max_q,
            .max_kv_len = max_kv,
            .max_blocks = max_blocks,
            .n_logit_rows = n_logits,
            .tokens = reinterpret_cast<const int32_t*>(dev + L.tokens),
            .positions = reinterpret_cast<const int64_t*>(dev + L.positions),
            .slot_mapping = reinterpret_cast<const int64_t*>(dev + L.slots),
            .q_start = reinterpret_cast<const int32_t*>(dev + L.q_start),
            .start_pos = reinterpret_cast<const int32_t*>(dev + L.start_pos),
            .block_tables = reinterpret_cast<const int32_t*>(dev + L.block_tables),
            .logit_rows = reinterpret_cast<const int32_t*>(dev + L.logit_rows),
            .state_slots = reinterpret_cast<const int32_t*>(dev + L.state_slots)};
}

DeviceBatch CudaModelRunner::run_forward(std::span<const RunnerSequence> batch) {
    const bool decode_step =
        !graph_sizes_.empty() && !graphs_failed_ && static_cast<int64_t>(batch.size()) <= graph_sizes_.back() &&
        std::all_of(batch.begin(), batch.end(), [](const RunnerSequence& s) { return s.tokens.size() == 1 && s.needs_logits; });
    if (!decode_step) {
        const DeviceBatch b = stage(batch);
        fwd_->run(b, *kv_, stream_);
        return b;
    }
    // The graph's shapes: the batch padded to its bucket, the cache length rounded up to a power of two
    // (at least 1024, at most max_model_len), so one graph serves every step until the context doubles.
    const int64_t bucket = *std::lower_bound(graph_sizes_.begin(), graph_sizes_.end(), static_cast<int64_t>(batch.size()));
    int64_t longest = 0;
    for (const RunnerSequence& s : batch) longest = std::max(longest, s.start_pos + 1);
    int64_t kv_bound = 1024;
    while (kv_bound < longest) kv_bound *= 2;
    const int64_t bs = options_.block_size;
    kv_bound = std::min(kv_bound, max_blocks_per_seq_ * bs);
    const DeviceBatch b = stage(batch, bucket, (kv_bound + bs - 1) / bs, kv_bound);
    const GraphKey key{bucket, kv_bound};
    auto it = graphs_.find(key);
    if (it == graphs_.end()) {
        // With tune choices, a captured launch may only use a variant that has launched eagerly: the step
        // runs eagerly first (its results are this step's), then the graph is captured for the next ones.
        const bool eager_first = options_.kernel_choices != nullptr;
        if (eager_first) fwd_->run(b, *kv_, stream_);
        const size_t failed_before = eager_first ? options_.kernel_choices->failed_variants().size() : 0;
        const int splits = fwd_->attention_splits(b, *kv_);
        cudaGraph_t graph = nullptr;
        NIBBLE_CUDA_CHECK(cudaStreamBeginCapture(stream_, cudaStreamCaptureModeThreadLocal));
        try {
            fwd_->run(b, *kv_, stream_, splits, graph_workspace_.get(), graph_workspace_.bytes());
        } catch (const std::exception& e) {
            (void)cudaStreamEndCapture(stream_, &graph);
            if (graph) (void)cudaGraphDestroy(graph);
            (void)cudaGetLastError();
            if (eager_first && options_.kernel_choices->failed_variants().size() > failed_before) {
                // A variant failed to launch during capture and is now excluded: the next step captures again.
                log::debug("CUDA graph capture for decode batch {} discarded ({}); capturing again next step",
                           bucket, e.what());
                return b;
            }
            graphs_failed_ = true;
            log::warn("CUDA graph capture failed for decode batch {} ({}); decode steps run eagerly from now on",
                      bucket, e.what());
            if (!eager_first) fwd_->run(b, *kv_, stream_);
            return b;
        }
        NIBBLE_CUDA_CHECK(cudaStreamEndCapture(stream_, &graph));
        cudaGraphExec_t exec = nullptr;
        const cudaError_t err = cudaGraphInstantiate(&exec, graph, 0);
        (void)cudaGraphDestroy(graph);
        NIBBLE_CUDA_CHECK(err);
        it = graphs_.emplace(key, exec).first;
        log::debug("captured a CUDA graph for decode batch {} with caches up to {} tokens ({} splits)", bucket,
                   kv_bound, splits);
        if (eager_first) return b;  // this step already ran eagerly
    }
    NIBBLE_CUDA_CHECK(cudaGraphLaunch(it->second, stream_));
    return b;
}

namespace {

int64_t sampled_rows(std::span<const RunnerSequence> batch) {
    return std::count_if(batch.begin(), batch.end(), [](const RunnerSequence& s) { return s.needs_logits; });
}

}  // namespace

void CudaModelRunner::set_communicator(Communicator* comm) {
    NIBBLE_CHECK(forward_ != nullptr, "CUDA runner: tensor parallelism runs the llama family, not a hybrid model");
    forward_->set_communicator(comm);
}

void CudaModelRunner::run_step(std::span<const RunnerSequence> batch) {
    run_forward(batch);
    NIBBLE_CUDA_CHECK(cudaStreamSynchronize(stream_));
}

void CudaModelRunner::execute(std::span<const RunnerSequence> batch, std::vector<float>& logits) {
    run_forward(batch);
    // The sampled rows come first (padding rows of a graph step follow them).
    const size_t n = static_cast<size_t>(sampled_rows(batch) * vocab_size());
    if (n > 0)
        NIBBLE_CUDA_CHECK(cudaMemcpyAsync(logits_host_, fwd_->logits(), n * sizeof(float), cudaMemcpyDeviceToHost,
                                          stream_));
    NIBBLE_CUDA_CHECK(cudaStreamSynchronize(stream_));
    logits.assign(logits_host_, logits_host_ + n);
}

void CudaModelRunner::execute_greedy(std::span<const RunnerSequence> batch, std::vector<int32_t>& tokens) {
    run_forward(batch);
    const int64_t rows = sampled_rows(batch);
    if (rows > 0) {
        cuda::argmax_rows(fwd_->logits(), rows, vocab_size(), tokens_device_.as<int32_t>(), stream_);
        NIBBLE_CUDA_CHECK(cudaMemcpyAsync(tokens_host_, tokens_device_.get(), static_cast<size_t>(rows) * 4,
                                          cudaMemcpyDeviceToHost, stream_));
    }
    NIBBLE_CUDA_CHECK(cudaStreamSynchronize(stream_));
    tokens.assign(tokens_host_, tokens_host_ + rows);
}

void CudaModelRunner::execute_sample(std::span<const RunnerSequence> batch, std::span<const RowSampling> rows,
                                     std::vector<int32_t>& tokens) {
    const int64_t n = sampled_rows(batch);
    NIBBLE_CHECK(static_cast<int64_t>(rows.size()) == n, "CUDA runner: {} sampling rows for {} sampled sequences",
                 rows.size(), n);
    for (size_t i = 0; i < rows.size(); ++i) {
        const RowSampling& r = rows[i];
        NIBBLE_CHECK(r.temperature >= 0.0f && std::isfinite(r.temperature) && r.u >= 0.0 && r.u < 1.0,
                     "CUDA runner: sampling row {} has temperature {} and u {} (want >= 0 and [0, 1))", i,
                     r.temperature, r.u);
        sampling_host_[i] = {.temperature = r.temperature, .top_k = r.top_k, .top_p = r.top_p, .min_p = r.min_p,
                             .u = r.u};
    }
    run_forward(batch);
    if (n > 0) {  // the sampled rows come first in the logits (padding rows of a graph step follow them)
        NIBBLE_CUDA_CHECK(cudaMemcpyAsync(sampling_device_.get(), sampling_host_,
                                          static_cast<size_t>(n) * sizeof(cuda::RowSamplingParams),
                                          cudaMemcpyHostToDevice, stream_));
        cuda::sample_rows(fwd_->logits(), n, vocab_size(), sampling_device_.as<const cuda::RowSamplingParams>(),
                          tokens_device_.as<int32_t>(), stream_);
        NIBBLE_CUDA_CHECK(cudaMemcpyAsync(tokens_host_, tokens_device_.get(), static_cast<size_t>(n) * 4,
                                          cudaMemcpyDeviceToHost, stream_));
    }
    NIBBLE_CUDA_CHECK(cudaStreamSynchronize(stream_));
    tokens.assign(tokens_host_, tokens_host_ + n);
}

void CudaModelRunner::save_state_snapshot(int32_t state_slot, int32_t snapshot) {
    fwd_->save_state_snapshot(state_slot, snapshot, stream_);
}

void CudaModelRunner::restore_state_snapshot(int32_t snapshot, int32_t state_slot) {
    fwd_->restore_state_snapshot(snapshot, state_slot, stream_);
}

}  // namespace nibble::gpu
