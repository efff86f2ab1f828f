// `nibble serve` command line, parsed by hand so that every vLLM flag can be recognised: a flag nibble
// supports is taken with vLLM's name and meaning; a vLLM flag nibble does not support is refused naming it
// ("--enforce-eager is a vLLM flag nibble does not support"); anything else is refused as unknown. All
// problems of a command line are reported together, so a whole vLLM recipe shows what to remove at once.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "engine/engine.h"
#include "parallel/parallel_options.h"

namespace nibble::server {

// --tune: which kernel variant each op runs (tune/ and docs/tuning.md). cached: the tune cache's choices
// for this GPU, built-in heuristics for shapes it lacks; full: tune the model's shapes first (as
// `nibble tune` does) and write the cache; off: built-in heuristics only.
enum class TuneMode { Off, Cached, Full };

struct ServeOptions {
    std::string model_dir;                      // "" serves the embedded default model
    std::string host = "127.0.0.1";
    int port = 8000;
    std::string api_key;                        // "" means no authentication
    std::vector<std::string> served_model_names;  // first is reported; any is accepted; default: model_dir
    std::optional<int64_t> max_model_len;       // default: the model's max_position_embeddings
    int64_t max_num_seqs = 256;
    std::optional<int64_t> max_num_batched_tokens;  // default: max(2048, max_model_len) is not assumed: 2048
    bool enable_prefix_caching = true;
    std::string kv_cache_dtype = "auto";        // auto, bf16, fp8, nvfp4; resolved by the memory plan
    SsmStateDtype mamba_ssm_cache_dtype = SsmStateDtype::F32;  // --mamba-ssm-cache-dtype (hybrid models)
    int64_t mamba_prefix_snapshots = -1;        // --mamba-prefix-snapshots (hybrid prefix caching; -1: auto)
    std::string device = "auto";                // --device auto|cuda|cpu
    bool enforce_eager = false;                 // --enforce-eager: no CUDA graphs
    int64_t max_cudagraph_capture_size = 256;   // --max-cudagraph-capture-size
    double gpu_memory_utilization = 0.9;        // fraction of device memory nibble may use (CUDA backend)
    std::optional<int64_t> kv_cache_memory_bytes;  // KV cache size, overriding the plan
    int64_t block_size = 16;
    std::string reasoning_parser;               // "" none
    std::string tool_call_parser;               // "" none
    bool enable_auto_tool_choice = false;
    std::string chat_template;                  // file overriding the model's template
    std::string generation_config = "auto";     // auto: DIR/generation_config.json; vllm: none; or a folder
    ParallelOptions parallel;                   // --tensor-parallel-size/-tp, --nnodes, --node-rank, --master-addr/-port
    // Hidden (not in --help): set by `nibble serve -tp N` on the processes it starts itself for the node's
    // other GPUs (cli/serve_tensor_parallel.h), their local GPU index 1 .. gpus_per_node-1; -1 otherwise.
    int64_t tp_local_rank = -1;
    TuneMode tune = TuneMode::Cached;            // --tune off|cached|full
    bool help = false;
};

// Parses the arguments after `serve`. Throws nibble::Error listing every problem.
ServeOptions parse_serve_args(const std::vector<std::string>& args);

// Text for `nibble serve --help`.
std::string serve_usage();

// vLLM's human-readable integers: "4096", "32k" (k = 1000, m = 10^6, g = 10^9, t = 10^12) and "32K"
// (K = 1024, M = 2^20, G = 2^30, T = 2^40); a decimal mantissa is allowed ("1.5k" = 1500).
int64_t parse_size(const std::string& text, const std::string& flag);

}  // namespace nibble::server
