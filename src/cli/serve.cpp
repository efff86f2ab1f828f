// `nibble serve [MODEL_DIR] [vLLM-named flags]`: loads the model, plans memory, starts the engine loop and
// the OpenAI-compatible HTTP server, and runs until SIGINT/SIGTERM. Without MODEL_DIR it serves the
// built-in tiny model (default_model.h). Flags are parsed by server/serve_args (vLLM's names; unsupported
// vLLM flags refused by name), so CLI11 hands this subcommand its arguments untouched.
#include <CLI/CLI.hpp>

#include <csignal>
#include <chrono>
#include <fstream>
#include <pthread.h>
#include <set>
#include <thread>
#include <unistd.h>

#include "base/error.h"
#include "base/log.h"
#include "base/thread_pool.h"
#include "cli/backend.h"
#include "cli/commands.h"
#include "cli/default_model.h"
#include "cli/serve_tensor_parallel.h"
#include "cli/tune_session.h"
#include "engine/engine.h"
#include "engine/memory_plan.h"
#if defined(NIBBLE_HAVE_CUDA)
#include "cuda/device_info.h"
#include "gpu/cuda_model_runner.h"
#include "gpu/device_hybrid.h"
#include "gpu/weight_upload.h"
#include "tune/device_profile.h"
#include "tune/kernel_choices.h"
#endif
#include "model/model.h"
#include "server/http_server.h"
#include "server/serve_args.h"
#include "tokenizer/chat_template.h"
#include "tokenizer/tokenizer.h"

namespace nibble::cli {

namespace {

namespace fs = std::filesystem;
using ojson = nlohmann::ordered_json;
using server::ServeOptions;

// generation_config.json as vLLM's --generation-config reads it: sampling defaults for requests that leave
// them out, and extra end-of-sequence ids.
void read_generation_config(const ServeOptions& o, const fs::path& model_dir, ojson& defaults,
                            std::set<int32_t>& eos) {
    if (o.generation_config == "vllm") return;
    const fs::path dir = o.generation_config == "auto" ? model_dir : fs::path(o.generation_config);
    const fs::path path = dir / "generation_config.json";
    if (!fs::exists(path)) {
        NIBBLE_CHECK(o.generation_config == "auto", "--generation-config {}: {} does not exist", o.generation_config,
                     path.string());
        return;
    }
    std::ifstream in(path);
    ojson j;
    try {
        j = ojson::parse(in);
    } catch (const nlohmann::json::exception& e) {
        fail("{}: not valid JSON: {}", path.string(), e.what());
    }
    for (const char* key : {"temperature", "top_p", "top_k", "min_p", "repetition_penalty"}) {
        if (!j.contains(key) || j[key].is_null()) continue;
        NIBBLE_CHECK(j[key].is_number(), "{}: {} must be a number", path.string(), key);
        defaults[key] = j[key];
    }
    // top_k 0 means "off" in transformers; leave the request's default alone then.
    if (defaults.contains("top_k") && defaults["top_k"].get<double>() <= 0) defaults.erase("top_k");
    if (j.contains("do_sample") && j["do_sample"].is_boolean() && !j["do_sample"].get<bool>()) defaults["temperature"] = 0.0;
    if (j.contains("eos_token_id")) {
        const auto& e = j["eos_token_id"];
        if (e.is_number_integer()) eos.insert(e.get<int32_t>());
        for (const auto& v : e)
            if (e.is_array() && v.is_number_integer()) eos.insert(v.get<int32_t>());
    }
}

int64_t host_memory() {
    const long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGE_SIZE);
    NIBBLE_CHECK(pages > 0 && page > 0, "cannot read the machine's physical memory; pass --kv-cache-memory-bytes");
    return static_cast<int64_t>(pages) * page;
}

std::string gib(int64_t bytes) { return fmt::format("{:.2f} GiB", static_cast<double>(bytes) / (1 << 30)); }

#if defined(NIBBLE_HAVE_CUDA)
// The CUDA backend plans against the GPU's memory (weights, workspace, then KV from what
// --gpu-memory-utilization leaves), with a bf16 cache for "auto".
MemoryPlan make_cuda_plan(const ServeOptions& o, const Model& model, int64_t max_model_len, int64_t device_memory) {
    PlanOptions po;
    po.max_model_len = max_model_len;
    po.max_num_seqs = o.max_num_seqs;
    po.max_num_batched_tokens = o.max_num_batched_tokens.value_or(2048);
    po.block_size = o.block_size;
    po.kv_cache_dtype = o.kv_cache_dtype;
    po.auto_kv_dtype = KvDtype::Bf16;
    po.mamba_ssm_cache_dtype = o.mamba_ssm_cache_dtype;
    po.mamba_prefix_snapshots = o.enable_prefix_caching ? o.mamba_prefix_snapshots : 0;  // hybrids: on the device
    po.gpu_memory_utilization = o.gpu_memory_utilization;
    po.device_memory = device_memory;
    po.tensor_parallel_size = o.parallel.tensor_parallel_size;  // per GPU: rank 0's shard, KV heads and workspace
    po.cuda_forward = true;  // its MoE workspace and GEMM scratch
    if (o.kv_cache_memory_bytes) po.kv_cache_memory_bytes = *o.kv_cache_memory_bytes;
    return plan_memory(model.config(), model.quant_config(), po);
}
#endif

// The CPU backend keeps the KV cache in host memory. Unless --kv-cache-memory-bytes says otherwise it takes
// what max_num_seqs full-length sequences need, but at most a quarter of the machine's memory.
MemoryPlan make_plan(const ServeOptions& o, const Model& model, int64_t max_model_len) {
    PlanOptions po;
    po.max_model_len = max_model_len;
    po.max_num_seqs = o.max_num_seqs;
    po.max_num_batched_tokens = o.max_num_batched_tokens.value_or(2048);
    po.block_size = o.block_size;
    po.kv_cache_dtype = o.kv_cache_dtype;
    po.auto_kv_dtype = KvDtype::F32;
    po.mamba_ssm_cache_dtype = o.mamba_ssm_cache_dtype;
    po.mamba_prefix_snapshots = o.enable_prefix_caching ? o.mamba_prefix_snapshots : 0;
    po.gpu_memory_utilization = o.gpu_memory_utilization;
    po.device_memory = host_memory();
    if (o.kv_cache_memory_bytes) {
        po.kv_cache_memory_bytes = *o.kv_cache_memory_bytes;
        return plan_memory(model.config(), model.quant_config(), po);
    }
    po.kv_cache_memory_bytes = po.device_memory / 4;
    const MemoryPlan probe = plan_memory(model.config(), model.quant_config(), po);
    const int64_t blocks_per_seq = (max_model_len + o.block_size - 1) / o.block_size;
    const int64_t wanted = probe.kv_block_bytes * blocks_per_seq * o.max_num_seqs;
    po.kv_cache_memory_bytes = std::min(po.kv_cache_memory_bytes, wanted);
    return plan_memory(model.config(), model.quant_config(), po);
}

void log_plan(const MemoryPlan& p) {
    log::info("memory plan: weights {} + workspace {} + KV cache {} ({} blocks of {} tokens, {} bytes/token)",
              gib(p.weights_bytes), gib(p.workspace_bytes()), gib(p.kv_blocks * p.kv_block_bytes), p.kv_blocks,
              p.block_size, p.kv_bytes_per_token);
    log::info("memory plan: {} KV tokens, max concurrency {:.2f} at max_model_len {}", p.kv_tokens,
              p.max_concurrency, p.max_model_len);
    if (p.mamba_state_bytes > 0)
        log::info("memory plan: Mamba state {} ({} per sequence) + {} prefix-caching state snapshots {}",
                  gib(p.mamba_state_bytes), gib(p.mamba_state_bytes_per_seq), p.mamba_snapshots,
                  gib(p.mamba_snapshot_bytes));
}

void run_serve(const std::vector<std::string>& args) {
    const ServeOptions o = server::parse_serve_args(args);
    if (o.help) {
        std::fputs(server::serve_usage().c_str(), stdout);
        return;
    }
    check_tensor_parallel_serving(o);  // before any loading: a TP > 1 request must never run as TP 1
    if (is_tensor_parallel_follower(o)) {  // a GPU of a tensor-parallel group other than rank 0: no HTTP
        run_tensor_parallel_follower_process(o, args);
        return;
    }
    // Rank 0 of a tensor-parallel group starts this node's other GPUs' processes and binds the step channel
    // now, so that they load the model while this process does.
    std::unique_ptr<TensorParallelRank0> tp_rank0;
    if (o.parallel.tensor_parallel_size > 1) tp_rank0 = std::make_unique<TensorParallelRank0>(o, args);
    // Signals go to a waiting thread only (threads started below inherit the mask); writes to a closed
    // socket report EPIPE instead of killing the process.
    std::signal(SIGPIPE, SIG_IGN);
    sigset_t stop_signals;
    sigemptyset(&stop_signals);
    sigaddset(&stop_signals, SIGINT);
    sigaddset(&stop_signals, SIGTERM);
    pthread_sigmask(SIG_BLOCK, &stop_signals, nullptr);

    fs::path model_dir = o.model_dir;
    if (model_dir.empty()) {
        model_dir = ensure_default_model(default_model_dir());
        log::warn("no MODEL_DIR given: serving nibble's built-in tiny model ({}). Its weights are random, so its "
                  "text is MEANINGLESS; it is here to try the API. Serve a real checkpoint with "
                  "`nibble serve /path/to/model`.",
                  model_dir.string());
    }
    // --tune: load (or, with full, first build) this GPU's kernel choices; the CUDA runner consumes them
    // (gpu::CudaRunnerOptions::kernel_choices). --tune off, or no cache: the ops' built-in dispatch.
    const std::optional<tune::TuneCache> tune_cache = serve_tune_cache(o.tune, model_dir.string(),
                           {.max_num_seqs = o.max_num_seqs,
                            .max_num_batched_tokens = o.max_num_batched_tokens.value_or(2048),
                            .max_model_len = o.max_model_len.value_or(0),
                            .kv_cache_dtype = o.kv_cache_dtype});
    ThreadPool pool(0);
    std::unique_ptr<Model> model = load_model(model_dir.string(), pool);
    const ModelConfig& mc = model->config();
    tokenizer::Tokenizer tok = tokenizer::Tokenizer::load(model_dir);

    int64_t max_model_len = o.max_model_len.value_or(mc.max_position_embeddings);
    NIBBLE_CHECK(max_model_len > 0, "--max-model-len: the model's config.json gives no max_position_embeddings");
    NIBBLE_CHECK(mc.max_position_embeddings <= 0 || max_model_len <= mc.max_position_embeddings,
                 "--max-model-len {} is more than the model's max_position_embeddings ({})", max_model_len,
                 mc.max_position_embeddings);

    const bool use_cuda = use_cuda_backend(o.device, *model);
    NIBBLE_CHECK(use_cuda || !tp_rank0,
                 "--tensor-parallel-size {}: {} would run on the CPU backend (see above), which has no tensor "
                 "parallelism; --device cuda says why the CUDA backend cannot run it",
                 o.parallel.tensor_parallel_size, mc.arch_name);
    std::unique_ptr<ModelRunner> backend;
#if defined(NIBBLE_HAVE_CUDA)
    const MemoryPlan plan = use_cuda ? make_cuda_plan(o, *model, max_model_len, cuda::query_device(0).total_memory)
                                     : make_plan(o, *model, max_model_len);
    log_plan(plan);
    if (use_cuda && tp_rank0) {
        backend = tp_rank0->make_runner(*model, plan, max_model_len, tune_cache ? &*tune_cache : nullptr);
    } else if (use_cuda) {
        NIBBLE_CHECK(plan.kv_dtype != KvDtype::F32, "--kv-cache-dtype: the CUDA backend's cache is bf16, fp8 or nvfp4");
        const auto t0 = std::chrono::steady_clock::now();
        std::shared_ptr<tune::KernelChoices> kernel_choices;
        if (tune_cache)
            kernel_choices = std::make_shared<tune::KernelChoices>(
                &*tune_cache, tune::profile_from_device(cuda::query_device(0)), tune::BuildTargets::configured());
        gpu::CudaRunnerOptions options{.kv_dtype = plan.kv_dtype,
                                       .num_blocks = plan.kv_blocks,
                                       .block_size = o.block_size,
                                       .max_model_len = max_model_len,
                                       .max_num_batched_tokens = plan.max_num_batched_tokens,
                                       .max_num_seqs = o.max_num_seqs,
                                       .act_dtype = DType::BF16,
                                       .max_cudagraph_capture_size = o.enforce_eager ? 0 : o.max_cudagraph_capture_size,
                                       .kernel_choices = kernel_choices};
        int64_t weight_bytes = 0;
        HybridView hybrid;
        if (model->hybrid_view(hybrid)) {  // NemotronH: a recurrent-state slot per sequence, snapshots as planned
            options.num_state_slots = o.max_num_seqs;
            options.ssm_dtype = o.mamba_ssm_cache_dtype;
            options.num_state_snapshots = plan.mamba_snapshots;
            auto weights = std::make_shared<gpu::DeviceHybrid>(gpu::upload_hybrid(mc, hybrid));
            weight_bytes = weights->device_bytes();
            backend = std::make_unique<gpu::CudaModelRunner>(weights, options);
        } else {
            DecoderView view;
            model->decoder_view(view);
            auto weights = std::make_shared<gpu::DeviceDecoder>(gpu::upload_decoder(mc, view));
            weight_bytes = weights->device_bytes();
            backend = std::make_unique<gpu::CudaModelRunner>(weights, options);
        }
        log::info("CUDA backend on {}: {:.2f} GB of weights uploaded in {:.1f} s, KV cache {} ({} blocks)",
                  cuda::query_device(0).name, static_cast<double>(weight_bytes) / 1e9,
                  std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(),
                  kv_dtype_name(plan.kv_dtype), plan.kv_blocks);
    }
#else
    (void)tune_cache;  // a CPU-only build has no CUDA runner to take kernel choices
    const MemoryPlan plan = make_plan(o, *model, max_model_len);
    log_plan(plan);
#endif
    if (!use_cuda) log::info("CPU backend ({} KV cache)", kv_dtype_name(plan.kv_dtype));

    std::set<int32_t> eos;
    for (int64_t id : mc.eos_token_ids) eos.insert(static_cast<int32_t>(id));
    if (tok.eos_id()) eos.insert(static_cast<int32_t>(*tok.eos_id()));
    server::ServerConfig sc;
    read_generation_config(o, model_dir, sc.sampling_defaults, eos);

    EngineConfig ec;
    ec.max_model_len = max_model_len;
    ec.max_num_seqs = o.max_num_seqs;
    ec.max_num_batched_tokens = plan.max_num_batched_tokens;
    ec.block_size = o.block_size;
    ec.num_blocks = plan.kv_blocks;
    ec.enable_prefix_caching = o.enable_prefix_caching;
    ec.mamba_ssm_cache_dtype = o.mamba_ssm_cache_dtype;
    ec.mamba_prefix_snapshots = plan.mamba_snapshots;  // what the plan counted
    ec.kv_cache_dtype = plan.kv_dtype;
    for (int32_t id : eos)
        if (id >= 0 && id < mc.vocab_size) ec.eos_token_ids.push_back(id);

    sc.host = o.host;
    sc.port = o.port;
    sc.api_key = o.api_key;
    sc.model_names = o.served_model_names.empty() ? std::vector<std::string>{o.model_dir.empty() ? "nibble-tiny-random"
                                                                                                 : o.model_dir}
                                                  : o.served_model_names;
    sc.model_root = model_dir.string();
    sc.max_model_len = max_model_len;
    sc.http_threads = static_cast<int>(std::clamp<int64_t>(2 * o.max_num_seqs, 64, 1024));
    if (!o.reasoning_parser.empty()) sc.reasoning_parser = server::reasoning_parser_kind(o.reasoning_parser);
    if (!o.tool_call_parser.empty()) sc.tool_call_parser = server::tool_parser_kind(o.tool_call_parser);
    sc.enable_auto_tool_choice = o.enable_auto_tool_choice;
    std::optional<fs::path> template_file;
    if (!o.chat_template.empty()) {
        NIBBLE_CHECK(fs::exists(o.chat_template), "--chat-template {}: no such file", o.chat_template);
        template_file = o.chat_template;
    }
    sc.chat_template = load_chat_template(model_dir, false, template_file);
    sc.chat_template_with_tools = load_chat_template(model_dir, true, template_file);
    if (!sc.chat_template) log::warn("{} has no chat template: /v1/chat/completions answers 400 (use --chat-template)",
                                     model_dir.string());
    {
        std::ifstream in(model_dir / "tokenizer_config.json");
        if (in.good()) sc.special_tokens = special_tokens_from_config(ojson::parse(in));
    }

    Engine engine(*model, ec, std::move(backend));
    engine.start();
    server::HttpServer http(engine, tok, sc);
    const int port = http.bind();
    log::info("serving {} as \"{}\" on http://{}:{} (max_model_len {}, max_num_seqs {}, prefix caching {})",
              model_dir.string(), sc.model_names[0], o.host, port, max_model_len, o.max_num_seqs,
              o.enable_prefix_caching ? "on" : "off");
    std::thread waiter([&] {
        int sig = 0;
        sigwait(&stop_signals, &sig);
        log::info("signal {}: shutting down", sig);
        http.stop();
    });
    http.run();
    // run() also returns when listening fails; wake the waiter so it can be joined.
    pthread_kill(waiter.native_handle(), SIGTERM);
    waiter.join();
    engine.stop();
}

}  // namespace

void add_serve_command(CLI::App& app) {
    CLI::App* cmd = app.add_subcommand("serve", "serve a model over an OpenAI-compatible HTTP API (vLLM's flags)");
    // Every argument goes to serve_args, which knows vLLM's flags; CLI11 only routes.
    cmd->set_help_flag();
    cmd->allow_extras();
    cmd->prefix_command();
    cmd->callback([cmd] { run_serve(cmd->remaining()); });
}

}  // namespace nibble::cli
