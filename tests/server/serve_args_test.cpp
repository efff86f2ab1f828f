// `nibble serve` flags: vLLM's names and defaults (from vLLM's documented `vllm serve` options), refusals
// that name each unsupported vLLM flag, and the recipe from the issue, which must parse up to its
// unsupported parts and name each of them.
#include <gtest/gtest.h>

#include "base/error.h"
#include "server/serve_args.h"

namespace nibble::server {
namespace {

std::string error_of(const std::vector<std::string>& args) {
    try {
        parse_serve_args(args);
    } catch (const Error& e) {
        return e.what();
    }
    return "";
}

TEST(ServeArgs, DefaultsAreVllms) {
    const ServeOptions o = parse_serve_args({});
    EXPECT_EQ(o.model_dir, "");
    EXPECT_EQ(o.host, "127.0.0.1");
    EXPECT_EQ(o.port, 8000);
    EXPECT_TRUE(o.enable_prefix_caching);
    EXPECT_EQ(o.kv_cache_dtype, "auto");
    EXPECT_DOUBLE_EQ(o.gpu_memory_utilization, 0.9);
    EXPECT_EQ(o.max_num_seqs, 256);
    EXPECT_EQ(o.block_size, 16);
}

TEST(ServeArgs, SupportedFlagsBothSpellings) {
    const ServeOptions o = parse_serve_args(
        {"/models/qwen3", "--host", "0.0.0.0", "--port=9000", "--api-key", "sk-x", "--served-model-name", "a", "b",
         "--max-model-len", "32k", "--max-num-seqs", "512", "--max-num-batched-tokens=8192", "--no-enable-prefix-caching",
         "--kv-cache-dtype", "fp8", "--gpu-memory-utilization", "0.85", "--kv-cache-memory-bytes", "4G",
         "--reasoning-parser", "qwen3", "--tool-call-parser", "hermes", "--enable-auto-tool-choice", "--chat-template",
         "t.jinja", "--generation-config", "vllm", "--trust-remote-code"});
    EXPECT_EQ(o.model_dir, "/models/qwen3");
    EXPECT_EQ(o.host, "0.0.0.0");
    EXPECT_EQ(o.port, 9000);
    EXPECT_EQ(o.api_key, "sk-x");
    EXPECT_EQ(o.served_model_names, (std::vector<std::string>{"a", "b"}));
    EXPECT_EQ(o.max_model_len, 32000);  // vLLM: lower-case k is 1000
    EXPECT_EQ(o.max_num_seqs, 512);
    EXPECT_EQ(o.max_num_batched_tokens, 8192);
    EXPECT_FALSE(o.enable_prefix_caching);
    EXPECT_EQ(o.kv_cache_dtype, "fp8");
    EXPECT_DOUBLE_EQ(o.gpu_memory_utilization, 0.85);
    EXPECT_EQ(o.kv_cache_memory_bytes, int64_t{4} << 30);
    EXPECT_EQ(o.reasoning_parser, "qwen3");
    EXPECT_EQ(o.tool_call_parser, "hermes");
    EXPECT_TRUE(o.enable_auto_tool_choice);
    EXPECT_EQ(o.chat_template, "t.jinja");
    EXPECT_EQ(o.generation_config, "vllm");
}

TEST(ServeArgs, HumanReadableSizes) {
    EXPECT_EQ(parse_size("1k", "--x"), 1000);
    EXPECT_EQ(parse_size("1K", "--x"), 1024);
    EXPECT_EQ(parse_size("1.5k", "--x"), 1500);
    EXPECT_EQ(parse_size("2M", "--x"), 2 * 1024 * 1024);
    EXPECT_EQ(parse_size("128000", "--x"), 128000);
    EXPECT_THROW(parse_size("12q", "--x"), Error);
    EXPECT_THROW(parse_size("abc", "--x"), Error);
    EXPECT_THROW(parse_size("1.5", "--x"), Error);
}

TEST(ServeArgs, BadValuesNamed) {
    EXPECT_NE(error_of({"--kv-cache-dtype", "int4"}).find("--kv-cache-dtype"), std::string::npos);
    EXPECT_NE(error_of({"--gpu-memory-utilization", "1.5"}).find("--gpu-memory-utilization"), std::string::npos);
    EXPECT_NE(error_of({"--port", "70000"}).find("--port"), std::string::npos);
    EXPECT_NE(error_of({"--max-num-seqs", "0"}).find("--max-num-seqs"), std::string::npos);
    EXPECT_NE(error_of({"--reasoning-parser", "granite"}).find("granite"), std::string::npos);
    EXPECT_NE(error_of({"--tool-call-parser", "llama3_json"}).find("llama3_json"), std::string::npos);
    EXPECT_NE(error_of({"--enable-auto-tool-choice"}).find("--tool-call-parser"), std::string::npos);
    EXPECT_NE(error_of({"--port"}).find("needs a value"), std::string::npos);
    EXPECT_NE(error_of({"a", "b"}).find("one MODEL_DIR"), std::string::npos);
    EXPECT_NE(error_of({"--frobnicate"}).find("--frobnicate is not a flag of nibble serve"), std::string::npos);
}

TEST(ServeArgs, VllmFlagsRefusedByName) {
    EXPECT_NE(error_of({"m", "--enable-lora"}).find("--enable-lora is a vLLM flag nibble does not support"),
              std::string::npos);
    EXPECT_NE(error_of({"m", "--pipeline-parallel-size", "2"}).find("--pipeline-parallel-size is a vLLM flag"),
              std::string::npos);
    EXPECT_NE(error_of({"m", "--no-enable-chunked-prefill"}).find("--no-enable-chunked-prefill is a vLLM flag"),
              std::string::npos);
}

TEST(ServeArgs, CudaBackendFlags) {
    const ServeOptions d = parse_serve_args({"m"});
    EXPECT_EQ(d.device, "auto");
    EXPECT_FALSE(d.enforce_eager);
    EXPECT_EQ(d.max_cudagraph_capture_size, 256);
    const ServeOptions o =
        parse_serve_args({"m", "--device", "cuda", "--enforce-eager", "--max-cudagraph-capture-size", "64"});
    EXPECT_EQ(o.device, "cuda");
    EXPECT_TRUE(o.enforce_eager);
    EXPECT_EQ(o.max_cudagraph_capture_size, 64);
    EXPECT_NE(error_of({"m", "--device", "tpu"}).find("--device must be auto, cuda or cpu, got 'tpu'"), std::string::npos);
    EXPECT_NE(error_of({"m", "--enforce-eager=1"}).find("--enforce-eager takes no value"), std::string::npos);
    EXPECT_NE(error_of({"m", "--max-cudagraph-capture-size", "-1"}).find("--max-cudagraph-capture-size"),
              std::string::npos);
}

// The multi-GPU flags (vLLM's names) parse into ParallelOptions; whether this build and machine can serve the
// split is nibble serve's check (cli/serve_tensor_parallel.h), never here.
TEST(ServeArgs, ParallelFlags) {
    const ServeOptions d = parse_serve_args({"m"});
    EXPECT_EQ(d.parallel.tensor_parallel_size, 1);
    EXPECT_EQ(d.parallel.nnodes, 1);
    EXPECT_EQ(d.parallel.node_rank, 0);
    EXPECT_EQ(d.parallel.master_addr, "127.0.0.1");
    EXPECT_EQ(d.parallel.master_port, 29501);
    const ServeOptions o = parse_serve_args({"m", "--tensor-parallel-size", "8", "--nnodes", "2", "--node-rank=1",
                                             "--master-addr", "10.0.0.1", "--master-port", "29600"});
    EXPECT_EQ(o.parallel.tensor_parallel_size, 8);
    EXPECT_EQ(o.parallel.nnodes, 2);
    EXPECT_EQ(o.parallel.node_rank, 1);
    EXPECT_EQ(o.parallel.master_addr, "10.0.0.1");
    EXPECT_EQ(o.parallel.master_port, 29600);
    EXPECT_EQ(parse_serve_args({"m", "-tp", "4"}).parallel.tensor_parallel_size, 4);
    EXPECT_NE(error_of({"m", "-tp", "0"}).find("-tp must be at least 1"), std::string::npos);
    EXPECT_NE(error_of({"m", "-tp", "3", "--nnodes", "2"}).find("multiple of --nnodes 2"), std::string::npos);
    EXPECT_NE(error_of({"m", "--nnodes", "2", "-tp", "2", "--node-rank", "2"}).find("--node-rank must be in [0, 2)"),
              std::string::npos);
    EXPECT_NE(error_of({"m", "--master-port", "70000"}).find("--master-port"), std::string::npos);
    // The hidden flag nibble serve gives the processes it starts for a node's other GPUs.
    EXPECT_EQ(d.tp_local_rank, -1);
    EXPECT_EQ(parse_serve_args({"m", "-tp", "4", "--tp-local-rank", "3"}).tp_local_rank, 3);
    EXPECT_NE(error_of({"m", "-tp", "4", "--nnodes", "2", "--tp-local-rank", "2"}).find("not below the 2 GPUs per node"),
              std::string::npos);
    EXPECT_NE(error_of({"m", "-tp", "2", "--tp-local-rank", "0"}).find("--tp-local-rank must be at least 1"),
              std::string::npos);
    EXPECT_EQ(serve_usage().find("--tp-local-rank"), std::string::npos);
}

// The recipe users run today (NVIDIA's Nemotron 3 vLLM recipe shape): every supported part parses and
// every unsupported part is named, in one message.
TEST(ServeArgs, SeedRecipeParsesAndNamesEachUnsupportedPart) {
    const std::vector<std::string> recipe = {
        "nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B-FP8", "--served-model-name", "model", "--max-num-seqs", "512",
        "--tensor-parallel-size", "1", "--max-model-len", "262144", "--port", "8000", "--trust-remote-code",
        "--kv-cache-dtype", "fp8", "--enable-prefix-caching", "--reasoning-parser-plugin", "nano_v3_reasoning_parser.py",
        "--reasoning-parser", "nemotron_v3", "--tool-call-parser", "qwen3_coder", "--enable-auto-tool-choice",
        "--mamba-ssm-cache-dtype", "float32", "--async-scheduling"};
    const std::string err = error_of(recipe);
    for (const char* flag : {"--reasoning-parser-plugin", "--async-scheduling"})
        EXPECT_NE(err.find(std::string(flag) + " is a vLLM flag nibble does not support"), std::string::npos) << flag;
    // Nothing else is complained about: the supported flags and their values parsed.
    for (const char* ok : {"--tensor-parallel-size", "--max-num-seqs", "--kv-cache-dtype", "--enable-prefix-caching", "--reasoning-parser ",
                           "--tool-call-parser", "--enable-auto-tool-choice", "--trust-remote-code",
                           "--mamba-ssm-cache-dtype", "MODEL_DIR"})
        EXPECT_EQ(err.find(ok), std::string::npos) << ok;

    // The same recipe without its unsupported parts is accepted.
    const ServeOptions o = parse_serve_args(
        {"nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B-FP8", "--served-model-name", "model", "--max-num-seqs", "512",
         "--max-model-len", "262144", "--port", "8000", "--trust-remote-code", "--kv-cache-dtype", "fp8",
         "--enable-prefix-caching", "--reasoning-parser", "nemotron_v3", "--tool-call-parser", "qwen3_coder",
         "--enable-auto-tool-choice", "--mamba-ssm-cache-dtype", "bfloat16"});
    EXPECT_EQ(o.max_num_seqs, 512);
    EXPECT_EQ(o.mamba_ssm_cache_dtype, SsmStateDtype::Bf16);
    EXPECT_EQ(o.mamba_prefix_snapshots, -1);
    EXPECT_EQ(parse_serve_args({"m", "--mamba-prefix-snapshots", "12"}).mamba_prefix_snapshots, 12);
    EXPECT_EQ(parse_serve_args({"m", "--mamba-prefix-snapshots=0"}).mamba_prefix_snapshots, 0);
    EXPECT_NE(error_of({"m", "--mamba-prefix-snapshots", "-2"}).find("--mamba-prefix-snapshots"), std::string::npos);
    EXPECT_NE(error_of({"m", "--mamba-ssm-cache-dtype", "float16"}).find("--mamba-ssm-cache-dtype 'float16'"),
              std::string::npos);
    EXPECT_EQ(o.max_model_len, 262144);
    EXPECT_EQ(o.kv_cache_dtype, "fp8");
    EXPECT_EQ(o.reasoning_parser, "nemotron_v3");
    EXPECT_EQ(o.tool_call_parser, "qwen3_coder");
}

TEST(ServeArgs, TuneMode) {
    EXPECT_EQ(parse_serve_args({}).tune, TuneMode::Cached);  // the default: the tune cache, heuristics elsewhere
    EXPECT_EQ(parse_serve_args({"m", "--tune", "off"}).tune, TuneMode::Off);
    EXPECT_EQ(parse_serve_args({"m", "--tune=full"}).tune, TuneMode::Full);
    EXPECT_EQ(parse_serve_args({"m", "--tune", "cached"}).tune, TuneMode::Cached);
    EXPECT_NE(error_of({"m", "--tune", "fast"}).find("--tune must be off, cached or full, got 'fast'"), std::string::npos);
    EXPECT_NE(error_of({"m", "--tune"}).find("--tune needs a value"), std::string::npos);
    EXPECT_NE(serve_usage().find("--tune off|cached|full"), std::string::npos);
}

}  // namespace
}  // namespace nibble::server
