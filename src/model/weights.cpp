#include "model/weights.h"

#include <cmath>

#include "base/error.h"
#include "base/log.h"
#include "tensor/convert.h"
#include "tensor/nvfp4.h"

namespace nibble {

namespace {

bool is_dense_float(DType d) { return d == DType::F32 || d == DType::F16 || d == DType::BF16; }

const TensorInfo& get_float_tensor(const Checkpoint& ckpt, const std::string& name, const Shape& shape) {
    const TensorInfo& t = ckpt.get(name);
    NIBBLE_CHECK(is_dense_float(t.dtype) && t.shape == shape,
                 "tensor {} in {}: expected F32, F16 or BF16 {}, got {} {}", name, t.file, shape.str(),
                 dtype_name(t.dtype), t.shape.str());
    return t;
}

LinearWeight load_dense(const Checkpoint& ckpt, const LinearSpec& spec) {
    const TensorInfo& t = get_float_tensor(ckpt, spec.module + ".weight", Shape{spec.n_out, spec.n_in});
    LinearWeight w;
    w.format = WeightFormat::Dense;
    w.dtype = t.dtype;
    w.data = t.data;
    return w;
}

LinearWeight load_nvfp4(const Checkpoint& ckpt, const LinearSpec& spec, bool compressed_tensors) {
    NIBBLE_CHECK(spec.n_in % kNvfp4BlockSize == 0,
                 "{}: input dimension {} is not a multiple of the NVFP4 block size {}", spec.module, spec.n_in,
                 kNvfp4BlockSize);
    const std::string& m = spec.module;
    const std::string packed_name = m + (compressed_tensors ? ".weight_packed" : ".weight");
    const TensorInfo& packed = ckpt.get(packed_name, DType::U8, Shape{spec.n_out, spec.n_in / 2});
    const TensorInfo& scales =
        ckpt.get(m + ".weight_scale", DType::F8_E4M3, Shape{spec.n_out, spec.n_in / kNvfp4BlockSize});
    LinearWeight w;
    w.format = WeightFormat::Nvfp4;
    w.dtype = DType::U8;
    w.data = packed.data;
    w.block_scales = scales.data;
    if (compressed_tensors) {
        // compressed-tensors stores the divisor 2688 / amax; the dequantization multiplier is its inverse.
        const std::string gname = m + ".weight_global_scale";
        const float divisor = load_scalar(ckpt, gname);
        NIBBLE_CHECK(divisor > 0.0f && std::isfinite(divisor), "tensor {}: global scale {} must be positive",
                     gname, divisor);
        w.scale = 1.0f / divisor;
        if (ckpt.has(m + ".input_global_scale")) w.input_scale = 1.0f / load_scalar(ckpt, m + ".input_global_scale");
    } else {
        const std::string gname = m + ".weight_scale_2";
        w.scale = load_scalar(ckpt, gname);
        NIBBLE_CHECK(w.scale > 0.0f && std::isfinite(w.scale), "tensor {}: global scale {} must be positive", gname,
                     w.scale);
        if (ckpt.has(m + ".input_scale")) w.input_scale = load_scalar(ckpt, m + ".input_scale");
    }
    return w;
}

LinearWeight load_fp8(const Checkpoint& ckpt, const LinearSpec& spec) {
    const std::string& m = spec.module;
    const TensorInfo& t = ckpt.get(m + ".weight", DType::F8_E4M3, Shape{spec.n_out, spec.n_in});
    const TensorInfo& s = ckpt.get(m + ".weight_scale");
    NIBBLE_CHECK(s.shape.numel() == 1,
                 "tensor {}.weight_scale in {}: only a per-tensor scale (one value) is supported, got shape {}", m,
                 s.file, s.shape.str());
    LinearWeight w;
    w.format = WeightFormat::Fp8;
    w.dtype = DType::F8_E4M3;
    w.data = t.data;
    w.scale = load_scalar(ckpt, m + ".weight_scale");
    if (ckpt.has(m + ".input_scale")) w.input_scale = load_scalar(ckpt, m + ".input_scale");
    return w;
}

}  // namespace

float load_scalar(const Checkpoint& ckpt, const std::string& name) {
    const TensorInfo& t = ckpt.get(name);
    NIBBLE_CHECK(t.shape.numel() == 1 && dtype_is_float(t.dtype) && t.shape.ndim <= 1,
                 "tensor {} in {}: expected a float scalar, got {} {}", name, t.file, dtype_name(t.dtype),
                 t.shape.str());
    float v = 0.0f;
    decode_to_float(t.data, t.dtype, 1, &v);
    return v;
}

std::vector<float> load_vector(const Checkpoint& ckpt, const std::string& name, int64_t n) {
    return tensor_to_floats(get_float_tensor(ckpt, name, Shape{n}).view());
}

LinearWeight load_linear(const Checkpoint& ckpt, const QuantConfig& quant, const LinearSpec& spec) {
    LinearWeight w;
    const bool quantized = quant.method != QuantMethod::None && !quant.is_excluded(spec.module);
    // A quantized checkpoint may still store a module densely without listing it as excluded; the
    // stored dtype says so unambiguously.
    const TensorInfo* main = ckpt.has(spec.module + ".weight") ? &ckpt.get(spec.module + ".weight") : nullptr;
    const bool stored_dense = main != nullptr && is_dense_float(main->dtype) && !ckpt.has(spec.module + ".weight_scale");
    if (!quantized || stored_dense) {
        if (quantized) log::debug("{}: stored unquantized ({}) in a {} checkpoint", spec.module,
                                  dtype_name(main->dtype), quant_method_name(quant.method));
        w = load_dense(ckpt, spec);
    } else {
        switch (quant.method) {
            case QuantMethod::ModelOptNvfp4: w = load_nvfp4(ckpt, spec, false); break;
            case QuantMethod::CompressedTensorsNvfp4: w = load_nvfp4(ckpt, spec, true); break;
            case QuantMethod::ModelOptFp8: w = load_fp8(ckpt, spec); break;
            case QuantMethod::None: break;
        }
    }
    w.name = spec.module;
    w.n_out = spec.n_out;
    w.n_in = spec.n_in;
    if (spec.bias) w.bias = load_vector(ckpt, spec.module + ".bias", spec.n_out);
    return w;
}

}  // namespace nibble
