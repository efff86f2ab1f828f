// The flag tables: what nibble serve takes, and the vLLM flags it knows to refuse (with whether they take
// a value, so that parsing continues past them and every problem is reported).
#include "server/serve_args.h"

#include <fmt/format.h>

#include <cmath>
#include <set>

#include "base/error.h"

namespace nibble::server {

namespace {

// vLLM `serve` flags nibble does not implement. Flags that take no value are in kVllmSwitches.
const std::set<std::string>& vllm_valued_flags() {
    static const std::set<std::string> flags = {
        "--model", "--tokenizer", "--tokenizer-mode", "--revision", "--code-revision", "--tokenizer-revision",
        "--dtype", "--seed", "--pipeline-parallel-size", "-pp",
        "--data-parallel-size", "-dp", "--data-parallel-size-local", "--data-parallel-address",
        "--data-parallel-rpc-port", "--data-parallel-start-rank", "--data-parallel-backend",
        "--decode-context-parallel-size", "--distributed-executor-backend", "--max-parallel-loading-workers",
        "--swap-space", "--cpu-offload-gb", "--quantization", "-q", "--load-format", "--download-dir",
        "--max-seq-len-to-capture", "--max-num-partial-prefills", "--max-long-partial-prefills",
        "--long-prefill-token-threshold", "--speculative-config", "--num-speculative-tokens",
        "--guided-decoding-backend", "--structured-outputs-config", "--max-loras", "--max-lora-rank",
        "--lora-modules", "--lora-dtype", "--max-cpu-loras", "--limit-mm-per-prompt", "--mm-processor-kwargs",
        "--uvicorn-log-level", "--allowed-origins", "--allowed-methods", "--allowed-headers", "--root-path",
        "--middleware", "--ssl-keyfile", "--ssl-certfile", "--ssl-ca-certs", "--ssl-cert-reqs",
        "--response-role", "--chat-template-content-format", "--max-log-len", "--tool-parser-plugin",
        "--reasoning-parser-plugin", "--compilation-config", "-O", "--kv-transfer-config", "--kv-events-config",
        "--cuda-graph-sizes", "--hf-overrides", "--override-generation-config",
        "--scheduling-policy", "--scheduler-cls", "--config", "--api-server-count", "--num-gpu-blocks-override",
        "--mamba-cache-dtype", "--model-impl", "--logits-processors",
        "--default-chat-template-kwargs", "--max-logprobs", "--logprobs-mode", "--prefix-caching-hash-algo",
        "--mm-encoder-tp-mode", "--allowed-local-media-path", "--worker-cls", "--worker-extension-cls",
        "--otlp-traces-endpoint", "--collect-detailed-traces", "--show-hidden-metrics-for-version",
        "--eplb-config", "--num-redundant-experts", "--attention-backend", "--all2all-backend",
        "--pt-load-map-location", "--tool-server", "--log-config-file", "--io-processor-plugin",
        "--h11-max-incomplete-event-size", "--stream-interval",
        "--override-neuron-config", "--override-pooler-config", "--task",
        "--runner", "--convert", "--tokenizer-pool-size", "--hf-config-path",
        "--hf-token", "--rope-scaling", "--rope-theta", "--lora-extra-vocab-size",
        "--long-lora-scaling-factors", "--speculative-model",
        "--uds", "--safetensors-load-strategy", "--mm-processor-cache-gb",
        "--media-io-kwargs",
    };
    return flags;
}

const std::set<std::string>& vllm_switches() {
    static const std::set<std::string> flags = {
        "--ray-workers-use-nsight", "--enable-expert-parallel", "--enable-eplb", "--disable-custom-all-reduce",
        "--enable-chunked-prefill", "--enable-lora", "--fully-sharded-loras", "--disable-log-stats",
        "--disable-log-requests", "--enable-log-requests", "--enable-log-outputs", "--disable-frontend-multiprocessing",
        "--enable-request-id-headers", "--async-scheduling", "--calculate-kv-scales", "--enable-sleep-mode",
        "--enable-force-include-usage", "--enable-prompt-tokens-details", "--enable-server-load-tracking",
        "--return-tokens-as-token-ids", "--disable-fastapi-docs", "--disable-sliding-window",
        "--disable-cascade-attn", "--skip-tokenizer-init", "--enable-prompt-embeds", "--kv-sharing-fast-prefill",
        "--trust-request-chat-template", "--exclude-tools-when-tool-choice-none", "--enable-mm-embeds",
        "--disable-uvicorn-access-log", "--enable-tokenizer-info-endpoint", "--tokens-only", "--headless",
        "--disable-mm-preprocessor-cache", "--disable-async-output-proc",
        "--disable-hybrid-kv-cache-manager", "--enable-lora-bias",
        "--disable-chunked-mm-input",
        "--enable-multimodal-encoder-data-parallel",
    };
    return flags;
}

bool is_vllm_flag(const std::string& name) {
    if (vllm_valued_flags().count(name) || vllm_switches().count(name)) return true;
    // argparse.BooleanOptionalAction gives every switch a --no- twin.
    return name.rfind("--no-", 0) == 0 && vllm_switches().count("--" + name.substr(5));
}

bool vllm_flag_takes_value(const std::string& name) { return vllm_valued_flags().count(name) > 0; }

int64_t parse_int(const std::string& text, const std::string& flag, int64_t lo) {
    const int64_t v = parse_size(text, flag);
    NIBBLE_CHECK(v >= lo, "{} must be at least {}, got {}", flag, lo, text);
    return v;
}

}  // namespace

int64_t parse_size(const std::string& text, const std::string& flag) {
    NIBBLE_CHECK(!text.empty(), "{} needs a number", flag);
    size_t used = 0;
    double mantissa = 0.0;
    try {
        mantissa = std::stod(text, &used);
    } catch (const std::exception&) {
        fail("{} needs a number, got '{}'", flag, text);
    }
    const std::string suffix = text.substr(used);
    double scale = 1.0;
    if (suffix.empty()) scale = 1.0;
    else if (suffix == "k") scale = 1e3;
    else if (suffix == "m") scale = 1e6;
    else if (suffix == "g") scale = 1e9;
    else if (suffix == "t") scale = 1e12;
    else if (suffix == "K") scale = 1024.0;
    else if (suffix == "M") scale = 1024.0 * 1024.0;
    else if (suffix == "G") scale = 1024.0 * 1024.0 * 1024.0;
    else if (suffix == "T") scale = 1024.0 * 1024.0 * 1024.0 * 1024.0;
    else fail("{}: unknown suffix '{}' in '{}' (k, m, g, t are powers of 1000; K, M, G, T of 1024)", flag, suffix, text);
    const double v = mantissa * scale;
    NIBBLE_CHECK(std::isfinite(v) && v >= -9.2e18 && v <= 9.2e18 && v == std::floor(v),
                 "{} needs a whole number, got '{}'", flag, text);
    return static_cast<int64_t>(v);
}

ServeOptions parse_serve_args(const std::vector<std::string>& args) {
    ServeOptions o;
    std::vector<std::string> problems;
    std::vector<std::string> positional;
    for (size_t i = 0; i < args.size(); ++i) {
        std::string name = args[i];
        std::optional<std::string> inline_value;
        if (name.rfind("--", 0) == 0) {
            if (const size_t eq = name.find('='); eq != std::string::npos) {
                inline_value = name.substr(eq + 1);
                name = name.substr(0, eq);
            }
        } else if (name.size() > 1 && name[0] == '-' && !std::isdigit(static_cast<unsigned char>(name[1]))) {
            // short forms: -h, and vLLM's -tp / -pp / -dp / -q / -O
        } else {
            positional.push_back(name);
            continue;
        }
        // The value of a flag: --flag=value or the next argument.
        auto value = [&]() -> std::string {
            if (inline_value) return *inline_value;
            NIBBLE_CHECK(i + 1 < args.size(), "{} needs a value", name);
            return args[++i];
        };
        auto no_value = [&] { NIBBLE_CHECK(!inline_value, "{} takes no value", name); };
        try {
            if (name == "--help" || name == "-h") {
                o.help = true;
            } else if (name == "--host") {
                o.host = value();
            } else if (name == "--port") {
                const int64_t p = parse_int(value(), name, 0);
                NIBBLE_CHECK(p <= 65535, "--port must be in [0, 65535], got {}", p);
                o.port = static_cast<int>(p);
            } else if (name == "--api-key") {
                o.api_key = value();
                NIBBLE_CHECK(!o.api_key.empty(), "--api-key must not be empty");
            } else if (name == "--served-model-name") {
                // nargs='+': names up to the next flag.
                o.served_model_names.push_back(value());
                while (!inline_value && i + 1 < args.size() && args[i + 1].rfind("-", 0) != 0)
                    o.served_model_names.push_back(args[++i]);
            } else if (name == "--max-model-len") {
                o.max_model_len = parse_int(value(), name, 1);
            } else if (name == "--max-num-seqs") {
                o.max_num_seqs = parse_int(value(), name, 1);
            } else if (name == "--max-num-batched-tokens") {
                o.max_num_batched_tokens = parse_int(value(), name, 1);
            } else if (name == "--enable-prefix-caching") {
                no_value();
                o.enable_prefix_caching = true;
            } else if (name == "--no-enable-prefix-caching") {
                no_value();
                o.enable_prefix_caching = false;
            } else if (name == "--kv-cache-dtype") {
                const std::string v = value();
                if (v == "auto") o.kv_cache_dtype = v;
                else if (v == "bf16" || v == "bfloat16") o.kv_cache_dtype = "bf16";
                else if (v == "fp8" || v == "fp8_e4m3") o.kv_cache_dtype = "fp8";
                else if (v == "nvfp4") o.kv_cache_dtype = v;
                else fail("--kv-cache-dtype must be auto, bf16, fp8 or nvfp4, got '{}'", v);
            } else if (name == "--mamba-ssm-cache-dtype") {
                o.mamba_ssm_cache_dtype = parse_ssm_state_dtype(value());
            } else if (name == "--mamba-prefix-snapshots") {
                o.mamba_prefix_snapshots = parse_int(value(), name, -1);
            } else if (name == "--gpu-memory-utilization") {
                const std::string v = value();
                double x = 0.0;
                try {
                    x = std::stod(v);
                } catch (const std::exception&) {
                    fail("--gpu-memory-utilization needs a number, got '{}'", v);
                }
                NIBBLE_CHECK(x > 0.0 && x <= 1.0, "--gpu-memory-utilization must be in (0, 1], got {}", v);
                o.gpu_memory_utilization = x;
            } else if (name == "--device") {
                const std::string v = value();
                NIBBLE_CHECK(v == "auto" || v == "cuda" || v == "cpu", "--device must be auto, cuda or cpu, got '{}'", v);
                o.device = v;
            } else if (name == "--enforce-eager") {
                no_value();
                o.enforce_eager = true;
            } else if (name == "--max-cudagraph-capture-size") {
                o.max_cudagraph_capture_size = parse_int(value(), name, 0);
            } else if (name == "--kv-cache-memory-bytes") {
                o.kv_cache_memory_bytes = parse_int(value(), name, 1);
            } else if (name == "--block-size") {
                const int64_t b = parse_int(value(), name, 1);
                NIBBLE_CHECK(b == 16 || b == 32 || b == 64 || b == 128 || b == 8,
                             "--block-size must be 8, 16, 32, 64 or 128, got {}", b);
                o.block_size = b;
            } else if (name == "--reasoning-parser") {
                o.reasoning_parser = value();
                NIBBLE_CHECK(o.reasoning_parser == "qwen3" || o.reasoning_parser == "deepseek_r1" ||
                                 o.reasoning_parser == "nemotron_v3",
                             "--reasoning-parser {} is not supported (supported: qwen3, deepseek_r1, nemotron_v3)",
                             o.reasoning_parser);
            } else if (name == "--tool-call-parser") {
                o.tool_call_parser = value();
                NIBBLE_CHECK(o.tool_call_parser == "hermes" || o.tool_call_parser == "qwen3_coder",
                             "--tool-call-parser {} is not supported (supported: hermes, qwen3_coder)",
                             o.tool_call_parser);
            } else if (name == "--enable-auto-tool-choice") {
                no_value();
                o.enable_auto_tool_choice = true;
            } else if (name == "--chat-template") {
                o.chat_template = value();
            } else if (name == "--generation-config") {
                o.generation_config = value();
            } else if (name == "--tune") {
                const std::string v = value();
                if (v == "off") o.tune = TuneMode::Off;
                else if (v == "cached") o.tune = TuneMode::Cached;
                else if (v == "full") o.tune = TuneMode::Full;
                else fail("--tune must be off, cached or full, got '{}'", v);
            } else if (name == "--tensor-parallel-size" || name == "-tp") {
                o.parallel.tensor_parallel_size = parse_int(value(), name, 1);
            } else if (name == "--nnodes") {
                o.parallel.nnodes = parse_int(value(), name, 1);
            } else if (name == "--node-rank") {
                o.parallel.node_rank = parse_int(value(), name, 0);
            } else if (name == "--master-addr") {
                o.parallel.master_addr = value();
            } else if (name == "--master-port") {
                o.parallel.master_port = parse_int(value(), name, 1);
            } else if (name == "--tp-local-rank") {
                o.tp_local_rank = parse_int(value(), name, 1);
            } else if (name == "--trust-remote-code") {
                no_value();  // accepted for recipes' sake; nibble runs no code from model folders
            } else if (is_vllm_flag(name)) {
                problems.push_back(fmt::format("{} is a vLLM flag nibble does not support", name));
                if (vllm_flag_takes_value(name) && !inline_value && i + 1 < args.size()) ++i;
            } else {
                problems.push_back(fmt::format("{} is not a flag of nibble serve (see nibble serve --help)", name));
                // Skip a value that clearly belongs to it, so later flags are still checked.
                if (!inline_value && i + 1 < args.size() && args[i + 1].rfind("-", 0) != 0 && !positional.empty()) ++i;
            }
        } catch (const Error& e) {
            problems.push_back(e.what());
        }
    }
    if (positional.size() > 1)
        problems.push_back(fmt::format("nibble serve takes one MODEL_DIR, got {}: {}", positional.size(),
                                       fmt::join(positional, " ")));
    if (!positional.empty()) o.model_dir = positional[0];
    try {
        check_parallel_options(o.parallel);
    } catch (const Error& e) {
        problems.push_back(e.what());
    }
    if (o.tp_local_rank >= 0 && o.tp_local_rank >= o.parallel.gpus_per_node())
        problems.push_back(fmt::format("--tp-local-rank {} (set by nibble serve for the GPUs it starts) is not below the "
                                       "{} GPUs per node",
                                       o.tp_local_rank, o.parallel.gpus_per_node()));
    if (o.enable_auto_tool_choice && o.tool_call_parser.empty())
        problems.push_back("--enable-auto-tool-choice needs --tool-call-parser");
    if (!problems.empty()) fail("nibble serve: {}", fmt::join(problems, "; "));
    return o;
}

std::string serve_usage() {
    return R"(usage: nibble serve [MODEL_DIR] [flags]

Serves MODEL_DIR (a Hugging Face checkpoint folder) over an OpenAI-compatible HTTP API. Without MODEL_DIR,
serves a tiny built-in model with random weights (its text is meaningless), for trying the API.
Flags have vLLM's names and meanings; a vLLM flag nibble does not support is refused by name.

  --host HOST                      address to listen on (default 127.0.0.1)
  --port PORT                      port (default 8000; 0 picks a free one and logs it)
  --api-key KEY                    require "Authorization: Bearer KEY" on /v1/*, /tokenize, /detokenize
  --served-model-name NAME...      model name(s) clients use (default: MODEL_DIR)
  --max-model-len N                prompt + generated tokens per sequence (default: the model's maximum)
  --max-num-seqs N                 sequences running at once (default 256)
  --max-num-batched-tokens N       tokens per engine step (default 2048)
  --enable-prefix-caching          reuse KV blocks of shared prompt prefixes (default on)
  --no-enable-prefix-caching
  --kv-cache-dtype DTYPE           auto, bf16, fp8 or nvfp4 (default auto)
  --mamba-ssm-cache-dtype DTYPE    hybrid models' SSM state: auto/float32 or bfloat16 (default float32)
  --mamba-prefix-snapshots N       hybrid models' prefix caching: Mamba states kept at cached blocks, each
                                   as large as one sequence's (default -1: auto, from at most an eighth of
                                   the KV memory; 0: caching off)
  --device auto|cuda|cpu           backend (default auto: CUDA when a GPU is present and the model is one the
                                   CUDA backend runs, the llama family; else the CPU)
  --enforce-eager                  CUDA: run decode steps without CUDA graphs
  --max-cudagraph-capture-size N   CUDA: decode batches up to N sequences replay CUDA graphs (default 256)
  --gpu-memory-utilization F       fraction of device memory to use (default 0.9)
  --kv-cache-memory-bytes N        KV cache size in bytes (suffixes k, m, g / K, M, G)
  --block-size N                   tokens per KV block (default 16)
  --reasoning-parser NAME          qwen3, deepseek_r1 or nemotron_v3
  --tool-call-parser NAME          hermes or qwen3_coder
  --enable-auto-tool-choice        let tool_choice "auto" parse tool calls (needs --tool-call-parser)
  --chat-template FILE             a Jinja chat template replacing the model's
  --generation-config auto|vllm|DIR  sampling defaults from DIR/generation_config.json (auto: MODEL_DIR)
  --trust-remote-code              accepted; nibble runs no code from model folders
  --tune off|cached|full           kernel choices: cached (default) uses the tune cache of this GPU and
                                   built-in heuristics elsewhere; full tunes the model's shapes first
                                   (as nibble tune does); off uses the heuristics only
  --tensor-parallel-size, -tp N    GPUs to split the model over (default 1; llama family, CUDA backend): serve
                                   starts one process per GPU of this node itself; rank 0 serves HTTP
  --nnodes N                       machines taking part (default 1): start nibble serve on each with the same
                                   flags and its --node-rank
  --node-rank N                    this machine's index (default 0; only node 0 serves HTTP)
  --master-addr ADDR               node 0's address for the NCCL bootstrap (default 127.0.0.1)
  --master-port PORT               node 0's TCP port for the NCCL bootstrap (default 29501); the step channel
                                   that tells every rank what to run uses PORT + 1
)";
}

}  // namespace nibble::server
