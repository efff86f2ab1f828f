// Helpers of the fused q/k/v prefill GEMM's forward tests (decoder_forward_qkv_test.cpp,
// decoder_forward_fp8_test.cpp): a BF16 checkpoint whose q, k and v projections share their largest magnitude,
// so that a per-tensor quantizer (the FP8 tests' amax / 448; quantize_checkpoint with per-tensor global
// scales, whose default already shares q/k/v's) gives the three one scale, as ModelOpt's NVFP4 exports do;
// and the check that the uploaded layers do (or do not) take the fused GEMM.
#pragma once

#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>
#include <filesystem>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "base/thread_pool.h"
#include "checkpoint/safetensors.h"
#include "device_test_util.h"
#include "gpu/decoder_forward.h"
#include "gpu/weight_upload.h"
#include "model/model.h"
#include "tensor/float_formats.h"

namespace nibble::test {

// src's BF16 checkpoint (write_checkpoint's: Normal(0, 0.05) projections) with one element at a random place
// of every q_proj, k_proj and v_proj weight set to +-amax; amax above every random weight (0.5: 10 sigma).
inline std::filesystem::path with_shared_qkv_amax(const std::filesystem::path& src, const std::filesystem::path& dst,
                                                  float amax, uint64_t seed) {
    namespace fs = std::filesystem;
    fs::create_directories(dst);
    fs::copy_file(src / "config.json", dst / "config.json", fs::copy_options::overwrite_existing);
    const Checkpoint ck(src.string());
    std::mt19937_64 rng(seed);
    SafetensorsWriter w((dst / "model.safetensors").string());
    const std::vector<std::string> names = ck.names();
    for (const std::string& name : names) w.declare(name, ck.get(name).dtype, ck.get(name).shape);
    int pinned = 0;
    for (const std::string& name : names) {
        const TensorInfo& t = ck.get(name);
        const bool qkv = name.ends_with("self_attn.q_proj.weight") || name.ends_with("self_attn.k_proj.weight") ||
                         name.ends_with("self_attn.v_proj.weight");
        if (!qkv) {
            w.write(name, t.data, t.nbytes);
            continue;
        }
        EXPECT_EQ(t.dtype, DType::BF16) << name;
        std::vector<uint16_t> bits(t.nbytes / 2);
        std::memcpy(bits.data(), t.data, t.nbytes);
        const size_t at = std::uniform_int_distribution<size_t>(0, bits.size() - 1)(rng);
        bits[at] = bf16_from_float(pinned % 2 == 0 ? amax : -amax);
        w.write(name, bits.data(), t.nbytes);
        ++pinned;
    }
    w.finish();
    EXPECT_GT(pinned, 0) << "no q/k/v projection in " << src;
    return dst;
}

// Every layer of the checkpoint in dir, uploaded, takes the fused q/k/v prefill GEMM (fused) or three
// GEMMs (!fused), as gpu::qkv_prefill_gemm_fusable decides for DecoderForward.
inline void expect_qkv_prefill_fusion(const std::filesystem::path& dir, bool fused, const std::string& what) {
    ThreadPool pool(0);
    std::unique_ptr<Model> model = load_model(dir.string(), pool);
    DecoderView view;
    ASSERT_TRUE(model->decoder_view(view));
    const gpu::DeviceDecoder weights = gpu::upload_decoder(model->config(), view);
    for (size_t il = 0; il < weights.layers.size(); ++il) {
        const gpu::DeviceDecoderLayer& L = weights.layers[il];
        EXPECT_EQ(gpu::qkv_prefill_gemm_fusable(weights, L), fused)
            << what << ": layer " << il << " (scales q " << L.q.scale << ", k " << L.k.scale << ", v " << L.v.scale
            << ")";
    }
}

}  // namespace nibble::test
