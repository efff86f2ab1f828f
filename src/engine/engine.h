// The engine: requests in, tokens out, continuous batching in between. One thread (the engine loop)
// runs steps: Scheduler picks running decodes first, then prefill chunks, under the token budget;
// the ModelRunner runs one batched forward; the sampler picks tokens; each request's sink receives
// its new tokens. submit/abort/finish_sequence are thread-safe and may be called from HTTP threads.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "engine/model_runner.h"
#include "engine/request.h"
#include "ops/attention/kv_cache.h"
#include "ops/ssm/ssm_state.h"

namespace nibble {

class Model;

struct EngineConfig {
    int64_t max_model_len = 4096;          // prompt + generated tokens per sequence
    int64_t max_num_seqs = 256;            // sequences running at once
    int64_t max_num_batched_tokens = 2048; // tokens per step (decodes + prefill chunks)
    int64_t block_size = 16;               // tokens per KV block
    int64_t num_blocks = 0;                // KV blocks in the pool (from the memory plan); must be > 0
    bool enable_prefix_caching = true;
    SsmStateDtype mamba_ssm_cache_dtype = SsmStateDtype::F32;  // hybrid models' SSM state (vLLM's flag)
    // Hybrid models (Mamba layers) reuse cached blocks only up to one holding a snapshot of the recurrent
    // state (Scheduler: where they are taken; BlockPool: their life). Snapshots kept (the memory plan counts
    // them; `nibble serve` passes the plan's count): -1 one per sequence slot (max_num_seqs), 0 none (prefix
    // caching then off for hybrids).
    int64_t mamba_prefix_snapshots = -1;
    int64_t mamba_snapshot_interval = 2048;  // tokens between prefill snapshots, a multiple of block_size; 0 none
    KvDtype kv_cache_dtype = KvDtype::F32;  // resolved by the memory plan ("auto" is not a dtype)
    std::vector<int32_t> eos_token_ids;    // end generation unless ignore_eos
};

struct EngineStats {
    int64_t num_running = 0, num_waiting = 0;
    int64_t kv_blocks_total = 0, kv_blocks_used = 0;
    int64_t prefix_cache_queries = 0, prefix_cache_hits = 0;  // in tokens
    int64_t prompt_tokens_total = 0, generation_tokens_total = 0;
    int64_t num_preemptions = 0;
    int64_t state_snapshots_total = 0, state_snapshots_used = 0;  // hybrid prefix caching (attached ones)
};

// Called on the engine thread with each step's output of one request. Must return quickly; it may call
// Engine::abort / finish_sequence (they take effect at the next step).
using OutputSink = std::function<void(const RequestOutput&)>;

class Engine {
public:
    // runner: the backend that runs the forward (e.g. the CUDA runner); null for the CPU runner over `model`.
    // A given runner must be shaped by `config` (its KV blocks, block size and cache dtype).
    Engine(Model& model, const EngineConfig& config, std::unique_ptr<ModelRunner> runner = nullptr);
    ~Engine();  // stops the loop; pending requests finish with FinishReason::Abort
    Engine(const Engine&) = delete;
    Engine& operator=(const Engine&) = delete;

    // Queues a request (validated: empty prompt, prompt + max_tokens beyond max_model_len, n < 1 ... are
    // nibble::Error with a message naming the field, thrown here, before anything is queued).
    void submit(GenerationRequest request, OutputSink sink);
    // Cancels a request: its sequences finish with Abort and their blocks are freed at the next step.
    void abort(const std::string& request_id);
    // Ends one sequence (the server saw a stop string): finishes with `reason`, frees its blocks.
    void finish_sequence(const std::string& request_id, int index, FinishReason reason);

    // Runs the loop on a thread of its own until stop() (serving), or ...
    void start();
    void stop();
    // ... runs one step on the caller's thread (tests, offline use). Returns false when idle.
    bool step();

    EngineStats stats() const;
    const EngineConfig& config() const;
    // Throws nibble::Error naming the first broken invariant of the scheduler queues and the block pool
    // (ref counts, free/LRU lists, prefix-cache map); tests call it after every step. Not while the loop
    // thread runs.
    void check_invariants() const;

private:
    struct Impl;
    std::unique_ptr<Impl> impl_;
};

}  // namespace nibble
