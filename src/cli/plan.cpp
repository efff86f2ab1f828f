// `nibble plan MODEL_DIR [serve flags] [--device-memory BYTES] [--json]`: where memory will go when serving
// the model, from config.json and the quantization config alone (engine/memory_plan.h; no weight and no
// safetensors header is read). Device memory defaults to the first CUDA device's when this build has CUDA
// and one is present, else the machine's physical memory. Prints an aligned table, or with --json one object
// (byte counts as integers). With --tensor-parallel-size N every figure is per GPU (rank 0's share: weights,
// workspace and KV heads of one rank); --nnodes etc. are accepted as on serve and checked.
// With --device-profile NAME (tune/device_profile.h) the plan is for that GPU's memory and adds its roofline:
// decode and prefill tok/s bounds and where each decoded token's bytes go (cli/plan_roofline.h).
// `nibble plan --synthetic NAME [--weights nvfp4|bf16] [--lm-head-nvfp4]` plans for a published architecture's
// shape instead of a folder (model/real_shapes.h: the same names as `nibble bench --synthetic`), with the
// quantization a ModelOpt NVFP4 export of it carries (or BF16), so nothing has to be downloaded.
#include <CLI/CLI.hpp>
#include <unistd.h>

#include <cstdio>
#include <fstream>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>

#include "base/error.h"
#include "checkpoint/model_config.h"
#include "checkpoint/quant_config.h"
#include "cli/commands.h"
#include "cli/plan_roofline.h"
#include "engine/memory_plan.h"
#include "model/real_shapes.h"
#include "parallel/parallel_options.h"
#include "parallel/tensor_parallel.h"
#if defined(NIBBLE_HAVE_CUDA)
#include "cuda/device_info.h"
#endif

namespace nibble::cli {

namespace {

struct PlanCliOptions {
    std::string model_dir;
    std::string synthetic;          // a real_shapes name instead of MODEL_DIR
    std::string weights = "nvfp4";  // synthetic: nvfp4 or bf16
    bool lm_head_nvfp4 = false;     // synthetic: lm_head in NVFP4 too
    PlanOptions plan;
    ParallelOptions parallel;
    int64_t device_memory = 0;  // 0: detect
    std::string mamba_ssm_cache_dtype = "float32";  // hybrid models
    bool json = false;
    std::string device_profile;  // a built-in profile: its memory, and the roofline on it
    int64_t context_depth = 0;   // roofline KV depth; 0: min(4096, max_model_len)
};

struct Device {
    int64_t memory = 0;
    std::string name;
    bool cuda = false;
};

Device detect_device() {
#if defined(NIBBLE_HAVE_CUDA)
    try {
        if (cuda::device_count() > 0) {
            const cuda::DeviceInfo info = cuda::query_device(0);
            return {info.total_memory, info.name, true};
        }
    } catch (const Error&) {
        // a broken driver: plan for the host instead, as if no GPU were present
    }
#endif
    const long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGE_SIZE);
    NIBBLE_CHECK(pages > 0 && page > 0, "cannot read the machine's physical memory; pass --device-memory BYTES");
    return {static_cast<int64_t>(pages) * page, "host memory", false};
}

std::string bytes_text(double b) {
    const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
    int u = 0;
    while (b >= 1024.0 && u < 4) {
        b /= 1024.0;
        ++u;
    }
    return u == 0 ? fmt::format("{:.0f} B", b) : fmt::format("{:.2f} {}", b, units[u]);
}

// The model to plan for: MODEL_DIR's config files, or a --synthetic shape.
struct PlannedModel {
    std::string label;  // the folder, or "NAME nvfp4 (lm_head bf16)"
    ModelConfig config;
    QuantConfig quant;
};

PlannedModel planned_model(const PlanCliOptions& opt) {
    NIBBLE_CHECK(opt.model_dir.empty() != opt.synthetic.empty(), "nibble plan: give exactly one of MODEL_DIR and --synthetic NAME");
    if (!opt.synthetic.empty()) {
        NIBBLE_CHECK(opt.weights == "nvfp4" || opt.weights == "bf16", "--weights '{}': use nvfp4 or bf16", opt.weights);
        NIBBLE_CHECK(!opt.lm_head_nvfp4 || opt.weights == "nvfp4", "--lm-head-nvfp4 needs --weights nvfp4");
        RealShape s = real_shape(opt.synthetic, {opt.weights == "nvfp4", opt.lm_head_nvfp4});
        std::string label = opt.synthetic + " " + opt.weights;
        if (opt.weights == "nvfp4") label += opt.lm_head_nvfp4 ? " (lm_head nvfp4)" : " (lm_head bf16)";
        return {label, std::move(s.config), std::move(s.quant)};
    }
    const std::string config_path = opt.model_dir + "/config.json";
    std::ifstream in(config_path);
    NIBBLE_CHECK(in.good(), "{}: cannot open (is {} a Hugging Face model folder?)", config_path, opt.model_dir);
    nlohmann::json json;
    try {
        json = nlohmann::json::parse(in);
    } catch (const nlohmann::json::exception& e) {
        fail("{}: not valid JSON: {}", config_path, e.what());
    }
    ModelConfig config = parse_model_config(json, config_path);
    QuantConfig quant = load_quant_config(opt.model_dir, json);
    return {opt.model_dir, std::move(config), std::move(quant)};
}

void run_plan(const PlanCliOptions& opt) {
    const PlannedModel model = planned_model(opt);
    const ModelConfig& config = model.config;
    const QuantConfig& quant = model.quant;
    check_parallel_options(opt.parallel);

    Device device;
    std::optional<tune::DeviceProfile> profile;
    if (!opt.device_profile.empty()) profile = tune::builtin_profile(opt.device_profile);
    if (opt.device_memory > 0) {
        device = {opt.device_memory, "--device-memory", profile.has_value()};
    } else if (profile) {
        device = {profile->memory_bytes, profile->name, true};
    } else {
        NIBBLE_CHECK(opt.device_memory == 0, "--device-memory must be positive, got {}", opt.device_memory);
        device = detect_device();
    }
    PlanOptions po = opt.plan;
    po.mamba_ssm_cache_dtype = parse_ssm_state_dtype(opt.mamba_ssm_cache_dtype);
    po.device_memory = device.memory;
    po.tensor_parallel_size = opt.parallel.tensor_parallel_size;
    // "auto" means what serving on this machine would store: bf16 on a GPU, the CPU reference's f32 otherwise.
    po.auto_kv_dtype = device.cuda ? KvDtype::Bf16 : KvDtype::F32;
    po.cuda_forward = device.cuda;  // the CUDA forward's MoE workspace and GEMM scratch
    const MemoryPlan p = plan_memory(config, quant, po);
    tune::RooflineOptions roofline;
    roofline.kv_bytes_per_token = p.kv_bytes_per_token;
    roofline.recurrent_state_bytes = p.mamba_state_bytes_per_seq;
    roofline.context_depth = opt.context_depth > 0 ? opt.context_depth : std::min<int64_t>(4096, p.max_model_len);
    roofline.prefill_tokens = std::min(p.max_num_batched_tokens, p.max_model_len);

    if (opt.json) {
        nlohmann::json weights_by_format = nlohmann::json::object();
        for (const auto& [name, bytes] : p.weights_by_format) weights_by_format[name] = bytes;
        nlohmann::json out = {
            {"model", model.label},
            {"architecture", config.arch_name},
            {"weights_quantization", quant.method == QuantMethod::None ? "none" : quant_method_name(quant.method)},
            {"device", device.name},
            {"device_memory", p.device_memory},
            {"gpu_memory_utilization", opt.plan.gpu_memory_utilization},
            {"usable_memory", p.usable_memory},
            {"tensor_parallel_size", p.tensor_parallel_size},
            {"nnodes", opt.parallel.nnodes},
            {"kv_heads_per_gpu", p.tensor_parallel_size == 1 ? config.n_kv_heads
                                                              : tensor_parallel_layout(config, p.tensor_parallel_size, 0)
                                                                    .kv_heads.size()},
            {"weights_bytes", p.weights_bytes},
            {"model_weights_bytes", p.model_weights_bytes},
            {"weights_bytes_by_format", weights_by_format},
            {"workspace_bytes", p.workspace_bytes()},
            {"activation_bytes", p.activation_bytes},
            {"logits_bytes", p.logits_bytes},
            {"attention_scratch_bytes", p.attention_scratch_bytes},
            {"moe_workspace_bytes", p.moe_workspace_bytes},
            {"gemm_scratch_bytes", p.gemm_scratch_bytes},
            {"ssm_scratch_bytes", p.ssm_scratch_bytes},
            {"kv_cache_dtype", kv_dtype_name(p.kv_dtype)},
            {"kv_bytes_per_token", p.kv_bytes_per_token},
            {"kv_cache_bytes", p.kv_cache_bytes},
            {"block_size", p.block_size},
            {"kv_blocks", p.kv_blocks},
            {"kv_tokens", p.kv_tokens},
            {"max_model_len", p.max_model_len},
            {"max_num_seqs", p.max_num_seqs},
            {"max_num_batched_tokens", p.max_num_batched_tokens},
            {"max_concurrency", p.max_concurrency},
            {"mamba_state_bytes_per_seq", p.mamba_state_bytes_per_seq},
            {"mamba_state_bytes", p.mamba_state_bytes},
            {"mamba_snapshots", p.mamba_snapshots},
            {"mamba_snapshot_bytes", p.mamba_snapshot_bytes},
        };
        if (profile) out["roofline"] = roofline_json(tune::compute_roofline(config, quant, *profile, roofline), *profile, roofline);
        std::printf("%s\n", out.dump(2).c_str());
        return;
    }
    std::string weights_detail;
    for (const auto& [name, bytes] : p.weights_by_format)
        weights_detail += fmt::format("{}{} {}", weights_detail.empty() ? "" : ", ", name, bytes_text(static_cast<double>(bytes)));
    auto row = [](const std::string& what, const std::string& value, const std::string& detail) {
        std::printf("%s\n", fmt::format("{:<17} {:>12}  {}", what, value, detail).c_str());
    };
    std::printf("%s\n", fmt::format("{} ({}, {} layers, weights {})", model.label, config.arch_name, config.n_layers,
                                    quant.method == QuantMethod::None ? "unquantized" : quant_method_name(quant.method))
                            .c_str());
    if (p.tensor_parallel_size > 1)
        std::printf("%s\n", fmt::format("tensor-parallel size {} ({} node{}): every figure below is per GPU",
                                        p.tensor_parallel_size, opt.parallel.nnodes, opt.parallel.nnodes == 1 ? "" : "s")
                                .c_str());
    row("device memory", bytes_text(static_cast<double>(p.device_memory)), device.name);
    row("usable", bytes_text(static_cast<double>(p.usable_memory)),
        fmt::format("x {} --gpu-memory-utilization", opt.plan.gpu_memory_utilization));
    if (p.tensor_parallel_size > 1)
        weights_detail += fmt::format(" (the whole model: {})", bytes_text(static_cast<double>(p.model_weights_bytes)));
    row("weights", bytes_text(static_cast<double>(p.weights_bytes)), weights_detail);
    row("workspace", bytes_text(static_cast<double>(p.workspace_bytes())),
        fmt::format("activations {}, logits {}, attention {}{}{} ({} batched tokens)",
                    bytes_text(static_cast<double>(p.activation_bytes)), bytes_text(static_cast<double>(p.logits_bytes)),
                    bytes_text(static_cast<double>(p.attention_scratch_bytes)),
                    p.moe_workspace_bytes > 0 ? ", MoE " + bytes_text(static_cast<double>(p.moe_workspace_bytes)) : "",
                    (p.gemm_scratch_bytes > 0 ? ", GEMM scratch " + bytes_text(static_cast<double>(p.gemm_scratch_bytes))
                                              : std::string()) +
                        (p.ssm_scratch_bytes > 0
                             ? ", SSM scan scratch " + bytes_text(static_cast<double>(p.ssm_scratch_bytes))
                             : std::string()),
                    p.max_num_batched_tokens));
    if (p.moe_workspace_bytes > 0)
        row("MoE workspace", bytes_text(static_cast<double>(p.moe_workspace_bytes)),
            fmt::format("expert permutation and each (token, expert) pair's hidden and output rows, {} tokens x "
                        "top-{} (in the workspace above)",
                        p.max_num_batched_tokens, config.moe.top_k));
    if (p.mamba_state_bytes > 0) {
        row("Mamba state", bytes_text(static_cast<double>(p.mamba_state_bytes)),
            fmt::format("{} per sequence x {} (--max-num-seqs; SSM {})",
                        bytes_text(static_cast<double>(p.mamba_state_bytes_per_seq)), p.max_num_seqs,
                        ssm_state_dtype_name(po.mamba_ssm_cache_dtype)));
        row("state snapshots", bytes_text(static_cast<double>(p.mamba_snapshot_bytes)),
            fmt::format("{} x {} (--mamba-prefix-snapshots; prefix caching resumes from them; one weighs as much "
                        "as the KV of {} tokens)",
                        p.mamba_snapshots, bytes_text(static_cast<double>(p.mamba_state_bytes_per_seq)),
                        p.kv_bytes_per_token > 0 ? p.mamba_state_bytes_per_seq / p.kv_bytes_per_token : 0));
    }
    row("KV per token", bytes_text(static_cast<double>(p.kv_bytes_per_token)),
        fmt::format("{} ({} bytes{})", kv_dtype_name(p.kv_dtype), p.kv_bytes_per_token,
                    p.tensor_parallel_size == 1
                        ? std::string()
                        : fmt::format(", {} KV heads per GPU",
                                      tensor_parallel_layout(config, p.tensor_parallel_size, 0).kv_heads.size())));
    row("KV cache", bytes_text(static_cast<double>(p.kv_cache_bytes)),
        fmt::format("{} blocks of {} tokens, {} per block", p.kv_blocks, p.block_size,
                    bytes_text(static_cast<double>(p.kv_block_bytes))));
    row("KV tokens", fmt::format("{}", p.kv_tokens), "");
    row("max concurrency", fmt::format("{:.2f}x", p.max_concurrency),
        fmt::format("sequences of --max-model-len {} (--max-num-seqs {})", p.max_model_len, p.max_num_seqs));
    if (profile) print_roofline(tune::compute_roofline(config, quant, *profile, roofline), *profile, roofline);
}

}  // namespace

void add_plan_command(CLI::App& app) {
    auto opt = std::make_shared<PlanCliOptions>();
    auto* cmd = app.add_subcommand("plan", "Show where memory goes when serving a model (reads config files only)");
    cmd->add_option("MODEL_DIR", opt->model_dir, "Hugging Face model folder (or --synthetic NAME)");
    std::string names;
    for (const std::string& n : real_shape_names()) names += (names.empty() ? "" : ", ") + n;
    cmd->add_option("--synthetic", opt->synthetic, "plan for a published architecture's shape, no download: " + names);
    cmd->add_option("--weights", opt->weights, "synthetic: nvfp4 (a ModelOpt NVFP4 export's layout) or bf16")
        ->capture_default_str();
    cmd->add_flag("--lm-head-nvfp4", opt->lm_head_nvfp4, "synthetic: lm_head in NVFP4 too (ModelOpt keeps it BF16)");
    cmd->add_option("--max-model-len", opt->plan.max_model_len,
                    "tokens per sequence (default: the model's max_position_embeddings)");
    cmd->add_option("--max-num-seqs", opt->plan.max_num_seqs, "sequences running at once")->capture_default_str();
    cmd->add_option("--max-num-batched-tokens", opt->plan.max_num_batched_tokens, "tokens per step")
        ->capture_default_str();
    cmd->add_option("--kv-cache-dtype", opt->plan.kv_cache_dtype, "auto, bf16, fp8, nvfp4 (f32: the CPU reference)")
        ->capture_default_str();
    cmd->add_option("--gpu-memory-utilization", opt->plan.gpu_memory_utilization,
                    "fraction of device memory to use")
        ->capture_default_str();
    cmd->add_option("--kv-cache-memory-bytes", opt->plan.kv_cache_memory_bytes,
                    "KV cache size in bytes (overrides --gpu-memory-utilization)");
    cmd->add_option("--block-size", opt->plan.block_size, "tokens per KV block")->capture_default_str();
    cmd->add_option("--mamba-ssm-cache-dtype", opt->mamba_ssm_cache_dtype,
                    "hybrid models' SSM state: float32 (auto) or bfloat16")
        ->capture_default_str();
    cmd->add_option("--mamba-prefix-snapshots", opt->plan.mamba_prefix_snapshots,
                    "hybrid models: recurrent-state snapshots kept for prefix caching (-1: auto, whole states from at "
                    "most an eighth of the KV budget, at most --max-num-seqs; 0: none)")
        ->capture_default_str();
    cmd->add_option("--device-memory", opt->device_memory,
                    "device memory in bytes (default: the GPU's, else the machine's physical memory)");
    cmd->add_option("--tensor-parallel-size", opt->parallel.tensor_parallel_size,
                    "GPUs the model is split over (alias -tp); the plan is then per GPU")
        ->capture_default_str();
    cmd->add_option("--nnodes", opt->parallel.nnodes, "machines taking part")->capture_default_str();
    cmd->add_option("--node-rank", opt->parallel.node_rank, "this machine's index")->capture_default_str();
    cmd->add_option("--master-addr", opt->parallel.master_addr, "node 0's address (NCCL bootstrap)")
        ->capture_default_str();
    cmd->add_option("--master-port", opt->parallel.master_port, "node 0's TCP port (NCCL bootstrap)")
        ->capture_default_str();
    cmd->add_flag("--json", opt->json, "print the plan as a JSON object");
    cmd->add_option("--device-profile", opt->device_profile,
                    "plan for a built-in GPU profile (gb10, rtx5090, b200, h100, h200) and add its roofline");
    cmd->add_option("--context-depth", opt->context_depth,
                    "tokens of context whose KV the roofline's decode reads (default: min(4096, max model len))");
    cmd->callback([opt] { run_plan(*opt); });
}

}  // namespace nibble::cli
