// `nibble quantize SRC DST --format nvfp4 [--layout modelopt|compressed-tensors] [--exclude lm_head,...]
//  [--calibration-data FILE] [--per-tensor-global-scales]`: writes an NVFP4 checkpoint and prints each
//  tensor's round-trip error.
#include <CLI/CLI.hpp>

#include <cstdio>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>

#include "base/error.h"
#include "base/log.h"
#include "base/thread_pool.h"
#include "cli/commands.h"
#include "cli/calibration_data.h"
#include "model/model.h"
#include "quant/calibrate.h"
#include "quant/quantize.h"

namespace nibble::cli {

namespace {

struct QuantizeCliOptions {
    std::string src, dst, format = "nvfp4", layout = "modelopt", calibration;
    std::vector<std::string> exclude = {"lm_head"};
    bool no_architecture_exclusions = false, per_tensor_global_scales = false;
    size_t threads = 0;
    int64_t calibration_max_tokens = 512;
};

void run_quantize(const QuantizeCliOptions& cli) {
    NIBBLE_CHECK(cli.format == "nvfp4", "--format {}: only nvfp4 is supported", cli.format);
    ThreadPool pool(cli.threads);
    QuantizeOptions opt;
    opt.src_dir = cli.src;
    opt.dst_dir = cli.dst;
    opt.layout = cli.layout == "modelopt" ? QuantLayout::ModelOpt : QuantLayout::CompressedTensors;
    opt.architecture_exclusions = !cli.no_architecture_exclusions;
    opt.fusion_group_global_scales = !cli.per_tensor_global_scales;
    opt.exclude.clear();
    for (const auto& e : cli.exclude)
        if (!e.empty()) opt.exclude.push_back(e);
    if (!cli.calibration.empty()) {
        auto samples = load_calibration_samples(cli.calibration, cli.src, cli.calibration_max_tokens);
        auto model = load_model(cli.src, pool);
        int64_t n_tokens = 0;
        for (const auto& s : samples) n_tokens += static_cast<int64_t>(s.size());
        log::info("calibrating activation scales on {} samples ({} tokens) from {}", samples.size(), n_tokens,
                  cli.calibration);
        opt.input_amax = calibrate_input_amax(*model, samples);
    } else {
        log::info("no --calibration-data: activation scales (input_scale) default to {}", kDefaultInputScale);
    }
    const auto reports = quantize_checkpoint(opt, pool);

    int64_t in = 0, out = 0, n_quantized = 0;
    double worst = 0.0;
    std::string worst_name;
    std::printf("%-60s %-7s %12s %12s %10s\n", "tensor", "action", "bytes in", "bytes out", "rel rms err");
    for (const auto& r : reports) {
        in += r.bytes_in;
        out += r.bytes_out;
        if (r.action == "nvfp4") {
            ++n_quantized;
            std::printf("%-60s %-7s %12lld %12lld %10.5f\n", r.name.c_str(), r.action.c_str(),
                        static_cast<long long>(r.bytes_in), static_cast<long long>(r.bytes_out), r.rel_rms_error);
            if (r.rel_rms_error > worst) {
                worst = r.rel_rms_error;
                worst_name = r.name;
            }
        }
    }
    std::printf("%lld tensors quantized to NVFP4, %zu copied; %.1f MB -> %.1f MB; worst relative RMS error %.5f (%s)\n",
                static_cast<long long>(n_quantized), reports.size() - static_cast<size_t>(n_quantized), in / 1e6,
                out / 1e6, worst, worst_name.c_str());
}

}  // namespace

void add_quantize_command(CLI::App& app) {
    auto opt = std::make_shared<QuantizeCliOptions>();
    auto* cmd = app.add_subcommand("quantize", "Quantize a BF16/FP16/FP32 checkpoint to NVFP4");
    cmd->add_option("SRC", opt->src, "source model folder (BF16, FP16 or FP32 safetensors)")->required();
    cmd->add_option("DST", opt->dst, "destination folder (created)")->required();
    cmd->add_option("--format", opt->format, "target format")->check(CLI::IsMember({"nvfp4"}));
    cmd->add_option("--layout", opt->layout, "tensor layout: modelopt (NVIDIA ModelOpt) or compressed-tensors "
                                             "(llm-compressor)")
        ->check(CLI::IsMember({"modelopt", "compressed-tensors"}));
    cmd->add_option("--exclude", opt->exclude,
                    "linear modules kept unquantized, fnmatch patterns, comma-separated (default lm_head; "
                    "--exclude '' quantizes every linear)")
        ->delimiter(',');
    cmd->add_flag("--no-architecture-exclusions", opt->no_architecture_exclusions,
                  "quantize also what the architecture's published recipe keeps in BF16 (NemotronH: attention "
                  "layers and the Mamba layer before each)");
    cmd->add_flag("--per-tensor-global-scales", opt->per_tensor_global_scales,
                  "give every tensor its own NVFP4 global scale (amax / 2688); by default a layer's q/k/v and an "
                  "MLP's or expert's gate/up share one, from their joint amax, as ModelOpt exports them and "
                  "engines that run each group as one GEMM (nibble's CUDA prefill, vLLM) expect");
    cmd->add_option("--calibration-data", opt->calibration,
                    "text file (tokenized with the model's tokenizer; samples separated by blank lines) or "
                    ".jsonl of {\"ids\": [...]} lines, run through the model to set activation scales");
    cmd->add_option("--calibration-max-tokens", opt->calibration_max_tokens, "tokens per calibration sample");
    cmd->add_option("--threads", opt->threads, "CPU threads (0: all cores)");
    cmd->callback([opt] { run_quantize(*opt); });
}

}  // namespace nibble::cli
