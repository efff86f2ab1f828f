// `nibble tune MODEL_DIR [--device-profile NAME] [--list] [serve flags]`: the kernel variants for the shapes
// MODEL_DIR runs under those flags (tune/model_shapes.h).
//   --list            which variants are eligible on the device (or the named profile) and why the others
//                     are not; launches nothing, works in CPU-only builds.
//   (no --list)       on a CUDA device: times every eligible variant per shape (tune/tuner.h) and writes
//                     the fastest to the tune cache (tune/tune_cache.h), which `nibble serve` reads.
// A built-in profile describes a GPU that is not here, so it can only be listed.
#include <CLI/CLI.hpp>

#include <cstdio>
#include <fstream>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <set>
#include <string>

#include "base/error.h"
#include "base/log.h"
#include "checkpoint/model_config.h"
#include "checkpoint/quant_config.h"
#include "cli/commands.h"
#include "cli/tune_session.h"
#include "engine/memory_plan.h"
#include "tune/device_profile.h"
#include "tune/eligibility.h"
#include "tune/model_shapes.h"
#include "tune/tuner.h"
#include "tune/tune_cache.h"
#if defined(NIBBLE_HAVE_CUDA)
#include <cuda_runtime.h>

#include "cuda/cuda_check.h"
#include "cuda/device_info.h"
#include "tune/timer_cuda.h"
#include "tune/variant_runner_cuda.h"
#endif

namespace nibble::cli {

namespace {

struct TuneCliOptions {
    std::string model_dir;
    std::string device_profile;  // "": the CUDA device
    bool list = false;
    TuneShapeFlags shape_flags;
    int warmup = 3, repeats = 15;
    std::string cache_dir;       // "": tune_cache_dir()
};

std::string kib(int64_t bytes) { return fmt::format("{} B", bytes); }

std::string profile_line(const tune::DeviceProfile& d) {
    return fmt::format("{} [{}]: compute capability {}.{}, {} SMs, shared memory {} per block (opt-in), {} per SM, "
                       "{} registers per block, {} threads per SM{}",
                       d.name, d.key, d.cc_major, d.cc_minor, d.sm_count, kib(d.smem_per_block_optin),
                       kib(d.smem_per_sm), d.regs_per_block, d.max_threads_per_sm,
                       d.unified_memory ? ", unified memory" : "");
}

std::string applies_text(const tune::KernelVariant& v) {
    const tune::VariantApplies& a = v.applies;
    if (a.m_max >= (1 << 30)) return fmt::format("m >= {}", a.m_min);
    if (a.m_max > 0) return a.m_min == a.m_max ? fmt::format("m {}", a.m_min) : fmt::format("m {}-{}", a.m_min, a.m_max);
    if (a.group_max > 0) return fmt::format("group {}-{}", a.group_min, a.group_max);
    return "any";
}

std::string needs_text(const tune::KernelVariant& v) {
    const tune::VariantNeeds& n = v.needs;
    std::string s = fmt::format("{} threads, {} regs", n.threads_per_block, n.regs_per_thread);
    if (n.static_smem_bytes > 0) s += fmt::format(", {} B static smem", n.static_smem_bytes);
    if (n.dynamic_smem_bytes > 0) s += fmt::format(", {} B dynamic smem", n.dynamic_smem_bytes);
    if (n.isa != tune::ArchIsa::None) s += fmt::format(", {}", tune::isa_name(n.isa));
    return s;
}

// The shapes of each op, summarized: "n x k 4096x4096, 1024x4096; m 1, 2, 4" or "hd 128, group 4, kv bf16".
std::string shapes_text(tune::OpKind op, const std::vector<tune::OpShape>& shapes) {
    std::vector<std::string> parts;
    std::set<std::string> seen;
    for (const tune::OpShape& s : shapes) {
        if (s.op != op) continue;
        const std::string b = tune::shape_bucket(s);
        if (seen.insert(b).second) parts.push_back(b);
    }
    return fmt::format("{}", fmt::join(parts, ", "));
}

void print_listing(const tune::DeviceProfile& device, const tune::BuildTargets& build, const tune::ModelShapes& ms,
                   const std::string& model_dir) {
    std::printf("%s\n", profile_line(device).c_str());
    std::printf("%s\n", fmt::format("build targets: {}{}", fmt::join(build.archs, ";"),
#if defined(NIBBLE_HAVE_CUDA)
                                    ""
#else
                                    " (this build is CPU-only: these are the CUDA build's targets)"
#endif
                                    )
                            .c_str());
    std::printf("%s\n", fmt::format("{}: {} shapes", model_dir, ms.shapes.size()).c_str());
    for (tune::OpKind op : tune::kAllOps) {
        std::vector<tune::OpShape> of_op;
        for (const tune::OpShape& s : ms.shapes)
            if (s.op == op) of_op.push_back(s);
        if (of_op.empty()) continue;
        std::printf("\n%s\n", fmt::format("{} ({} shapes: {})", tune::op_name(op), of_op.size(), shapes_text(op, of_op)).c_str());
        // Each variant that serves at least one of the model's shapes, with its verdict (a device-wide fact).
        std::map<const tune::KernelVariant*, std::optional<std::string>> verdicts;
        std::vector<const tune::KernelVariant*> order;
        for (const tune::OpShape& s : of_op)
            for (const tune::VariantVerdict& v : tune::judge_variants(s, device, build))
                if (verdicts.emplace(v.variant, v.excluded).second) order.push_back(v.variant);
        if (order.empty()) std::printf("  no registered variant serves these shapes\n");
        for (const tune::KernelVariant* v : order) {
            const auto& why = verdicts[v];
            const std::string measured = v->measured == tune::Measured::OnHopper        ? "timed on H100 (docs/perf.md)"
                                         : v->measured == tune::Measured::PendingHopper ? "runs on H100, not yet timed"
                                                                                        : "not measured: no such hardware here";
            std::printf("%s\n", fmt::format("  {:<9} {:<28} {:<12} {}; {}{}", why ? "excluded" : "eligible", v->name,
                                            applies_text(*v), needs_text(*v), measured,
                                            why ? fmt::format("\n            why: {}", *why) : std::string())
                                    .c_str());
        }
    }
    if (!ms.skipped.empty())
        std::printf("\n%s\n", fmt::format("not tuned: {}", fmt::join(ms.skipped, "; ")).c_str());
}

#if defined(NIBBLE_HAVE_CUDA)
tune::TuneCache run_tuning(const tune::DeviceProfile& device, const tune::BuildTargets& build,
                           const tune::ModelShapes& ms, const std::string& cache_dir, const tune::TimingOptions& timing) {
    const tune::CacheKey key = tune::cache_key_for(device);
    const std::string dir = cache_dir.empty() ? tune::tune_cache_dir() : cache_dir;
    const std::string path = tune::tune_cache_path(dir, key);
    tune::TuneCache cache = tune::load_tune_cache(path, key).value_or(tune::TuneCache(key));
    cudaStream_t stream = nullptr;
    NIBBLE_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    struct StreamGuard {
        cudaStream_t s;
        ~StreamGuard() { (void)cudaStreamDestroy(s); }
    } guard{stream};
    auto runner = tune::make_cuda_variant_runner(stream);
    auto timer = tune::make_cuda_event_timer(stream);
    tune::FailedVariants failed;
    int tuned = 0;
    for (const tune::OpShape& shape : ms.shapes) {
        const auto eligible = tune::eligible_variants(shape, device, build);
        if (eligible.empty()) {
            log::warn("tune: {} {}: no variant fits this device", tune::op_name(shape.op), tune::shape_bucket(shape));
            continue;
        }
        const tune::ShapeTuning t = tune::tune_shape(shape, eligible, *runner, *timer, failed, timing);
        for (const std::string& f : t.failures) log::warn("tune: {} {}: {}", tune::op_name(shape.op), tune::shape_bucket(shape), f);
        if (!t.best) continue;
        cache.put(*t.best);
        ++tuned;
        std::string others;
        for (const tune::CandidateTiming& c : t.timed)
            others += fmt::format("{}{}{} {:.2f}", others.empty() ? "" : ", ", c.variant->name,
                                  c.splits > 1 ? fmt::format("/s{}", c.splits) : std::string(), c.timing.median_us);
        std::printf("%s\n", fmt::format("{:<18} {:<36} {:<10} -> {}{} {:.2f} us  ({})", tune::op_name(shape.op),
                                        tune::shape_bucket(shape), tune::shape_dtype(shape), t.best->variant,
                                        t.best->splits > 1 ? fmt::format(" splits {}", t.best->splits) : std::string(),
                                        t.best->median_us, others)
                                .c_str());
    }
    tune::save_tune_cache(cache, path);
    std::printf("%s\n", fmt::format("tuned {} of {} shapes; cache {} ({})", tuned, ms.shapes.size(), path, key.describe()).c_str());
    return cache;
}
#endif

tune::ModelShapes read_model_shapes(const std::string& model_dir, const TuneShapeFlags& flags) {
    const std::string config_path = model_dir + "/config.json";
    std::ifstream in(config_path);
    NIBBLE_CHECK(in.good(), "{}: cannot open (is {} a Hugging Face model folder?)", config_path, model_dir);
    nlohmann::json json;
    try {
        json = nlohmann::json::parse(in);
    } catch (const nlohmann::json::exception& e) {
        fail("{}: not valid JSON: {}", config_path, e.what());
    }
    const ModelConfig config = parse_model_config(json, config_path);
    const QuantConfig quant = load_quant_config(model_dir, json);
    tune::ShapeOptions so;
    so.max_num_seqs = flags.max_num_seqs;
    so.max_num_batched_tokens = flags.max_num_batched_tokens;
    so.max_model_len = flags.max_model_len;
    so.kv_dtype = resolve_kv_cache_dtype(flags.kv_cache_dtype, quant, KvDtype::Bf16);
    NIBBLE_CHECK(so.kv_dtype != KvDtype::F32, "--kv-cache-dtype f32 is the CPU reference's; CUDA caches are bf16, fp8 or nvfp4");
    return tune::model_op_shapes(config, quant, so);
}

void run_tune(const TuneCliOptions& opt) {
    NIBBLE_CHECK(opt.warmup >= 0 && opt.repeats >= 1, "--warmup must be >= 0 and --repeats >= 1");
    const tune::ModelShapes shapes = read_model_shapes(opt.model_dir, opt.shape_flags);
    const tune::BuildTargets build = tune::BuildTargets::configured();

    if (!opt.device_profile.empty()) {
        const tune::DeviceProfile device = tune::builtin_profile(opt.device_profile);
        NIBBLE_CHECK(opt.list, "--device-profile {} describes a GPU that is not here: it can only be listed (add --list)",
                     opt.device_profile);
        print_listing(device, build, shapes, opt.model_dir);
        return;
    }
#if defined(NIBBLE_HAVE_CUDA)
    NIBBLE_CHECK(cuda::device_count() > 0, "no CUDA device is present; pass --device-profile NAME --list to see what "
                                           "would run on one (profiles: gb10, rtx5090, b200, h100, h200)");
    const tune::DeviceProfile device = tune::profile_from_device(cuda::query_device(0));
    if (opt.list) {
        print_listing(device, build, shapes, opt.model_dir);
        return;
    }
    run_tuning(device, build, shapes, opt.cache_dir, {.warmup = opt.warmup, .repeats = opt.repeats});
#else
    fail("this build has no CUDA backend: pass --device-profile NAME --list to see what would run on a GPU "
         "(profiles: gb10, rtx5090, b200, h100, h200)");
#endif
}

}  // namespace

std::optional<tune::TuneCache> serve_tune_cache(server::TuneMode mode, const std::string& model_dir,
                                                const TuneShapeFlags& flags) {
    if (mode == server::TuneMode::Off) {
        log::info("--tune off: kernels use their built-in choices");
        return std::nullopt;
    }
#if defined(NIBBLE_HAVE_CUDA)
    if (cuda::device_count() == 0) {
        log::debug("--tune: no CUDA device, nothing to tune");
        return std::nullopt;
    }
    const tune::DeviceProfile device = tune::profile_from_device(cuda::query_device(0));
    if (mode == server::TuneMode::Full)
        return run_tuning(device, tune::BuildTargets::configured(), read_model_shapes(model_dir, flags), "", {});
    const tune::CacheKey key = tune::cache_key_for(device);
    const std::string path = tune::tune_cache_path(tune::tune_cache_dir(), key);
    auto cache = tune::load_tune_cache(path, key);
    if (cache)
        log::info("tune cache: {} kernel choices for {} ({})", cache->choices().size(), device.name, path);
    else
        log::info("tune cache: none for {} at {}; kernels use their built-in choices (run `nibble tune {}`)",
                  device.name, path, model_dir);
    return cache;
#else
    log::debug("--tune: this build has no CUDA backend, nothing to tune");
    return std::nullopt;
#endif
}

void add_tune_command(CLI::App& app) {
    auto opt = std::make_shared<TuneCliOptions>();
    auto* cmd = app.add_subcommand("tune", "Time the kernel variants for a model's shapes and cache the fastest");
    cmd->add_option("MODEL_DIR", opt->model_dir, "Hugging Face model folder")->required();
    cmd->add_option("--device-profile", opt->device_profile,
                    "a GPU that is not here, to --list: gb10 (DGX Spark), rtx5090, b200, h100, h200");
    cmd->add_flag("--list", opt->list, "list eligible variants and why others are not; launch nothing");
    cmd->add_option("--max-num-seqs", opt->shape_flags.max_num_seqs, "sequences running at once (as on serve)")
        ->capture_default_str();
    cmd->add_option("--max-num-batched-tokens", opt->shape_flags.max_num_batched_tokens, "tokens per step (as on serve)")
        ->capture_default_str();
    cmd->add_option("--max-model-len", opt->shape_flags.max_model_len, "tokens per sequence (default: the model's maximum)");
    cmd->add_option("--kv-cache-dtype", opt->shape_flags.kv_cache_dtype, "auto, bf16, fp8, nvfp4 (as on serve)")
        ->capture_default_str();
    cmd->add_option("--warmup", opt->warmup, "untimed launches per variant")->capture_default_str();
    cmd->add_option("--repeats", opt->repeats, "timed launches per variant (the median is kept)")->capture_default_str();
    cmd->add_option("--cache-dir", opt->cache_dir, "tune cache folder (default: $XDG_CACHE_HOME/nibble/tune)");
    cmd->callback([opt] { run_tune(*opt); });
}

}  // namespace nibble::cli
