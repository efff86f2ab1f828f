#include "quant/quantize.h"

#include <fnmatch.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <memory>
#include <nlohmann/json.hpp>
#include <set>

#include "base/error.h"
#include "base/log.h"
#include "base/progress.h"
#include "base/version.h"
#include "checkpoint/model_config.h"
#include "checkpoint/quant_config.h"
#include "checkpoint/safetensors.h"
#include "model/model.h"
#include "tensor/convert.h"
#include "tensor/nvfp4.h"

namespace nibble {

namespace fs = std::filesystem;

namespace {

// Linear modules kept unquantized whatever --exclude says, as ModelOpt's default config disables their
// quantizers ("*mlp.gate.*", "*router*", "*block_sparse_moe.gate*" for MoE routers and
// "*mlp.shared_expert_gate.*" for Qwen2-MoE's shared-expert gate) and llm-compressor's MoE recipes ignore
// "re:.*mlp.gate$": a router's few weights decide which experts run. They are listed as excluded modules.
constexpr std::array<const char*, 4> kAlwaysExcluded = {"*.mlp.gate", "*.mlp.shared_expert_gate", "*router*",
                                                        "*.block_sparse_moe.gate"};

bool always_excluded(const std::string& module) {
    for (const char* p : kAlwaysExcluded)
        if (::fnmatch(p, module.c_str(), 0) == 0) return true;
    return false;
}

nlohmann::json read_json(const fs::path& path) {
    std::ifstream in(path);
    NIBBLE_CHECK(in.good(), "cannot open {}", path.string());
    try {
        return nlohmann::json::parse(in);
    } catch (const nlohmann::json::exception& e) {
        fail("{}: not valid JSON: {}", path.string(), e.what());
    }
}

void write_json(const fs::path& path, const nlohmann::json& j) {
    std::ofstream out(path);
    out << j.dump(2) << "\n";
    NIBBLE_CHECK(out.good(), "cannot write {}", path.string());
}

struct QuantizedTensor {
    std::vector<uint8_t> packed;  // [n, k/2]
    std::vector<uint8_t> scales;  // [n, k/16] E4M3
    float global_scale = 1.0f;    // ModelOpt weight_scale_2 (multiplier)
    double rel_rms_error = 0.0;
};

// The largest magnitude in W [n, k] (any float dtype); refuses a tensor holding an infinity.
float tensor_amax(const TensorInfo& t, ThreadPool& pool) {
    const int64_t n = t.shape[0], k = t.shape[1];
    const size_t row_bytes = static_cast<size_t>(k) * dtype_size(t.dtype);
    std::vector<float> row_amax(static_cast<size_t>(n));
    pool.parallel_for(static_cast<size_t>(n), 8, [&](size_t b, size_t e) {
        std::vector<float> row(static_cast<size_t>(k));
        for (size_t r = b; r < e; ++r) {
            decode_to_float(t.data + r * row_bytes, t.dtype, k, row.data());
            float a = 0.0f;
            for (float v : row) a = std::max(a, std::fabs(v));
            row_amax[r] = a;
        }
    });
    float amax = 0.0f;
    for (float a : row_amax) amax = std::max(amax, a);
    NIBBLE_CHECK(std::isfinite(amax), "tensor {} in {}: holds a non-finite value; refusing to quantize it", t.name,
                 t.file);
    return amax;
}

// Quantizes W [n, k] (any float dtype) with ModelOpt's recipe under global_scale (its own amax / 2688, or its
// fusion group's), measuring the round-trip error.
QuantizedTensor quantize_weight(const TensorInfo& t, float global_scale, ThreadPool& pool) {
    const int64_t n = t.shape[0], k = t.shape[1];
    const size_t row_bytes = static_cast<size_t>(k) * dtype_size(t.dtype);
    QuantizedTensor q;
    q.global_scale = global_scale;
    q.packed.resize(static_cast<size_t>(n * k / 2));
    q.scales.resize(static_cast<size_t>(n * k / kNvfp4BlockSize));
    // Quantize rows, and dequantize them again for the error report.
    std::vector<double> err(static_cast<size_t>(n)), ref(static_cast<size_t>(n));
    pool.parallel_for(static_cast<size_t>(n), 8, [&](size_t b, size_t e) {
        std::vector<float> row(static_cast<size_t>(k)), back(static_cast<size_t>(k));
        for (size_t r = b; r < e; ++r) {
            decode_to_float(t.data + r * row_bytes, t.dtype, k, row.data());
            uint8_t* packed = q.packed.data() + r * static_cast<size_t>(k / 2);
            uint8_t* scales = q.scales.data() + r * static_cast<size_t>(k / kNvfp4BlockSize);
            nvfp4_quantize_row(row.data(), k, q.global_scale, packed, scales);
            nvfp4_dequantize_row(packed, scales, k, q.global_scale, back.data());
            double se = 0.0, sr = 0.0;
            for (int64_t i = 0; i < k; ++i) {
                const double d = static_cast<double>(row[static_cast<size_t>(i)]) - back[static_cast<size_t>(i)];
                se += d * d;
                sr += static_cast<double>(row[static_cast<size_t>(i)]) * row[static_cast<size_t>(i)];
            }
            err[r] = se;
            ref[r] = sr;
        }
    });
    double se = 0.0, sr = 0.0;
    for (size_t r = 0; r < err.size(); ++r) {
        se += err[r];
        sr += ref[r];
    }
    q.rel_rms_error = sr > 0.0 ? std::sqrt(se / sr) : 0.0;
    return q;
}

// Names of the tensors a quantized module X becomes, in the chosen layout.
struct LayoutNames {
    std::string weight, scale, global_scale, input_scale;
};
LayoutNames layout_names(QuantLayout layout, const std::string& module) {
    if (layout == QuantLayout::ModelOpt)
        return {module + ".weight", module + ".weight_scale", module + ".weight_scale_2", module + ".input_scale"};
    return {module + ".weight_packed", module + ".weight_scale", module + ".weight_global_scale",
            module + ".input_global_scale"};
}

// One global scale per fusion group, and the input scale the group's members share: ModelOpt's HF export
// (modelopt/torch/export/unified_export_hf.py, requantize_resmooth_fused_llm_layers) gathers the NVFP4
// linears that read the same input tensor (q/k/v, gate/up; every expert's gate/up by the experts.N naming
// rule) and quant_utils.py's preprocess_linear_fusion sets each one's weight amax and input amax to the
// group's maximum. llm-compressor does the same for compressed-tensors (modifiers/utils/helpers.py,
// update_fused_layer_weight_global_scales: q/k/v and gate/up take the smallest weight_global_scale, 2688 /
// the largest amax). vLLM runs each group as one GEMM with one scale: ModelOpt linears keep
// weight_scale_2.max() of the merged layer, and the fused-MoE loader keeps gate's weight_scale_2 for w13,
// warning "w1_weight_scale_2 must match w3_weight_scale_2" otherwise.
class GroupScales {
public:
    GroupScales(const QuantizeOptions& opt, const Checkpoint& ckpt, ThreadPool& pool)
        : opt_(opt), ckpt_(ckpt), pool_(pool) {}

    void add(const LinearWeight& w) { members_[group_of(w.name)].push_back(&w); }

    // The members' largest amax / 2688, measured when a member of the group is first asked for.
    float global_scale(const LinearWeight& w) {
        const std::string group = group_of(w.name);
        auto it = global_.find(group);
        if (it != global_.end()) return it->second;
        float amax = 0.0f;
        for (const LinearWeight* m : members_.at(group))
            amax = std::max(amax, tensor_amax(ckpt_.get(m->name + ".weight"), pool_));
        return global_[group] = nvfp4_global_scale(amax);
    }

    // ModelOpt's input_scale (amax / 2688) from the members' largest calibrated input amax; the default
    // without calibration.
    float input_scale(const LinearWeight& w) const {
        float amax = 0.0f;
        for (const LinearWeight* m : members_.at(group_of(w.name))) {
            auto it = opt_.input_amax.find(m->name);
            if (it != opt_.input_amax.end()) amax = std::max(amax, it->second);
        }
        return amax > 0.0f ? nvfp4_global_scale(amax) : kDefaultInputScale;
    }

    // Groups of more than one member.
    int64_t shared_groups() const {
        int64_t n = 0;
        for (const auto& [group, members] : members_) n += members.size() > 1;
        return n;
    }

private:
    std::string group_of(const std::string& module) const {
        return opt_.fusion_group_global_scales ? global_scale_group(module) : module;
    }
    const QuantizeOptions& opt_;
    const Checkpoint& ckpt_;
    ThreadPool& pool_;
    std::map<std::string, std::vector<const LinearWeight*>> members_;  // group -> its modules to quantize
    std::map<std::string, float> global_;                              // group -> its global scale
};

}  // namespace

std::string global_scale_group(const std::string& module) {
    const size_t dot = module.rfind('.');
    const std::string parent = dot == std::string::npos ? "" : module.substr(0, dot + 1);
    const std::string leaf = dot == std::string::npos ? module : module.substr(dot + 1);
    if (leaf == "q_proj" || leaf == "k_proj" || leaf == "v_proj") return parent + "{q,k,v}_proj";
    if (leaf == "gate_proj" || leaf == "up_proj") return parent + "{gate,up}_proj";
    return module;
}

std::vector<TensorReport> quantize_checkpoint(const QuantizeOptions& opt, ThreadPool& pool) {
    const fs::path src(opt.src_dir), dst(opt.dst_dir);
    const nlohmann::json config_json = read_json(src / "config.json");
    const QuantConfig src_quant = load_quant_config(opt.src_dir, config_json);
    NIBBLE_CHECK(src_quant.method == QuantMethod::None,
                 "{} is already quantized ({}); nibble quantize takes a BF16, FP16 or FP32 checkpoint", opt.src_dir,
                 quant_method_name(src_quant.method));
    NIBBLE_CHECK(fs::absolute(src).lexically_normal() != fs::absolute(dst).lexically_normal(),
                 "the destination {} is the source folder", opt.dst_dir);

    // The architecture knows which tensors are linear weights; binding the model also validates the source.
    auto model = load_model(opt.src_dir, pool);
    Checkpoint ckpt(opt.src_dir);

    std::map<std::string, const LinearWeight*> to_quantize;  // by "<module>.weight"
    std::vector<std::string> excluded_modules;
    std::set<std::string> used_patterns;
    const std::vector<std::string> arch_exclude =
        opt.architecture_exclusions ? model->default_quant_exclusions() : std::vector<std::string>{};
    for (const LinearWeight* w : model->linear_weights()) {
        const auto arch_match = [&](const std::string& p) { return ::fnmatch(p.c_str(), w->name.c_str(), 0) == 0; };
        if (always_excluded(w->name) || std::any_of(arch_exclude.begin(), arch_exclude.end(), arch_match)) {
            excluded_modules.push_back(w->name);
            continue;
        }
        bool excluded = false;
        for (const auto& p : opt.exclude)
            if (::fnmatch(p.c_str(), w->name.c_str(), 0) == 0) {
                excluded = true;
                used_patterns.insert(p);
            }
        if (excluded) {
            excluded_modules.push_back(w->name);
            continue;
        }
        NIBBLE_CHECK(w->n_in % kNvfp4BlockSize == 0,
                     "{}: input dimension {} is not a multiple of {}, so it cannot be NVFP4; keep it unquantized "
                     "with --exclude {}",
                     w->name, w->n_in, kNvfp4BlockSize, w->name);
        // transformers 5's stacked experts ("mixer.experts.up_proj[e]") have no tensor of their own.
        NIBBLE_CHECK(ckpt.has(w->name + ".weight"),
                     "{}: linear module has no tensor {}.weight in {}; nibble quantize needs one tensor per module",
                     w->name, w->name, opt.src_dir);
        to_quantize[w->name + ".weight"] = w;
    }
    GroupScales group_scales(opt, ckpt, pool);
    for (const auto& [name, w] : to_quantize) group_scales.add(*w);
    if (opt.fusion_group_global_scales && group_scales.shared_groups() > 0)
        log::info("{} groups of projections (q/k/v, gate/up) share one global scale each, as ModelOpt "
                  "exports them",
                  group_scales.shared_groups());
    for (const auto& p : opt.exclude)
        NIBBLE_CHECK(used_patterns.count(p) != 0 || p == "lm_head",
                     "--exclude pattern '{}' matches no linear module of {}", p, opt.src_dir);

    // Declare every output tensor (this fixes the shards' headers), then stream them out.
    ShardedCheckpointWriter writer(dst.string(), opt.max_shard_bytes);
    writer.set_metadata("format", "pt");
    const std::vector<std::string> names = ckpt.names();
    uint64_t total_bytes = 0;
    const Shape scalar_shape = opt.layout == QuantLayout::ModelOpt ? Shape{} : Shape{1};
    for (const auto& name : names) {
        const TensorInfo& t = ckpt.get(name);
        total_bytes += t.nbytes;
        auto it = to_quantize.find(name);
        if (it == to_quantize.end()) {
            writer.declare(name, t.dtype, t.shape);
            continue;
        }
        const LinearWeight& w = *it->second;
        const LayoutNames ln = layout_names(opt.layout, w.name);
        writer.declare(ln.weight, DType::U8, Shape{w.n_out, w.n_in / 2});
        writer.declare(ln.scale, DType::F8_E4M3, Shape{w.n_out, w.n_in / kNvfp4BlockSize});
        writer.declare(ln.global_scale, DType::F32, scalar_shape);
        writer.declare(ln.input_scale, DType::F32, scalar_shape);
    }

    std::vector<TensorReport> reports;
    ProgressBar progress("quantizing", total_bytes);
    for (const auto& name : names) {
        const TensorInfo& t = ckpt.get(name);
        TensorReport rep{.name = name, .action = "copied", .bytes_in = static_cast<int64_t>(t.nbytes)};
        auto it = to_quantize.find(name);
        if (it == to_quantize.end()) {
            writer.write(name, t.data, t.nbytes);
            rep.bytes_out = rep.bytes_in;
        } else {
            const LinearWeight& w = *it->second;
            const LayoutNames ln = layout_names(opt.layout, w.name);
            QuantizedTensor q = quantize_weight(t, group_scales.global_scale(w), pool);
            // ModelOpt: input_scale = amax / 2688; compressed-tensors stores its reciprocal.
            const float input_scale = group_scales.input_scale(w);
            float global = q.global_scale, input = input_scale;
            if (opt.layout == QuantLayout::CompressedTensors) {
                global = 1.0f / q.global_scale;
                input = 1.0f / input_scale;
            }
            writer.write(ln.weight, q.packed.data(), q.packed.size());
            writer.write(ln.scale, q.scales.data(), q.scales.size());
            writer.write(ln.global_scale, &global, sizeof global);
            writer.write(ln.input_scale, &input, sizeof input);
            rep.action = "nvfp4";
            rep.rel_rms_error = q.rel_rms_error;
            rep.bytes_out = static_cast<int64_t>(q.packed.size() + q.scales.size() + 8);
        }
        reports.push_back(rep);
        if (opt.progress) progress.advance(t.nbytes);
    }
    writer.finish();
    if (opt.progress) progress.finish();

    // Config entries as the exporters write them.
    QuantExportOptions exp{.exclude_modules = excluded_modules, .producer_version = kNibbleVersion};
    nlohmann::json out_config = config_json;
    if (opt.layout == QuantLayout::ModelOpt) {
        write_json(dst / "hf_quant_config.json", modelopt_hf_quant_config_json(exp));
        out_config["quantization_config"] = modelopt_quantization_config_json(exp);
    } else {
        out_config["quantization_config"] = compressed_tensors_quantization_config_json(exp);
    }
    write_json(dst / "config.json", out_config);

    // Tokenizer, generation config, chat template and the rest travel unchanged.
    for (const auto& entry : fs::directory_iterator(src)) {
        if (!entry.is_regular_file()) continue;
        const std::string fname = entry.path().filename().string();
        if (fname == "config.json" || fname == "hf_quant_config.json" || fname == "model.safetensors.index.json" ||
            entry.path().extension() == ".safetensors")
            continue;
        fs::copy_file(entry.path(), dst / fname, fs::copy_options::overwrite_existing);
    }
    return reports;
}

}  // namespace nibble
