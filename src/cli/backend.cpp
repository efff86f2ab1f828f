#include "cli/backend.h"

#include <algorithm>

#include "base/error.h"
#include "base/log.h"
#if defined(NIBBLE_HAVE_CUDA)
#include "cuda/device_info.h"
#include "gpu/cuda_model_runner.h"
#include "gpu/device_hybrid.h"
#include "gpu/weight_upload.h"
#endif

namespace nibble::cli {

bool use_cuda_backend(const std::string& device, const Model& model) {
    NIBBLE_CHECK(device == "auto" || device == "cuda" || device == "cpu", "--device must be auto, cuda or cpu, got '{}'",
                 device);
    if (device == "cpu") return false;
    DecoderView view;
    HybridView hybrid;
    const bool is_hybrid = model.hybrid_view(hybrid);
    const bool runs = is_hybrid || model.decoder_view(view);
#if defined(NIBBLE_HAVE_CUDA)
    const bool gpu = cuda::device_count() > 0;
    auto check = [&] {
        if (is_hybrid)
            gpu::check_hybrid_supported(model.config(), hybrid);
        else
            gpu::check_decoder_supported(model.config(), view);
    };
    if (device == "cuda") {
        NIBBLE_CHECK(gpu, "--device cuda: no CUDA device is present");
        NIBBLE_CHECK(runs, "--device cuda: the CUDA backend runs the llama family, Qwen3-MoE, Qwen2-MoE and NemotronH so far, not {} (use --device cpu)",
                     model.config().arch_name);
        check();
        return true;
    }
    if (!gpu) return false;
    if (!runs) {
        log::warn("{} runs on the CPU backend: the CUDA backend runs the llama family, Qwen3-MoE, Qwen2-MoE and NemotronH so far",
                  model.config().arch_name);
        return false;
    }
    try {
        check();
    } catch (const Error& e) {
        log::warn("{} runs on the CPU backend: {}", model.config().arch_name, e.what());
        return false;
    }
    return true;
#else
    NIBBLE_CHECK(device != "cuda", "--device cuda: this build has no CUDA backend");
    (void)runs;
    return false;
#endif
}

std::unique_ptr<ModelRunner> make_runner(Model& model, bool cuda, int64_t n_blocks, int64_t block_size,
                                         int64_t max_model_len) {
#if defined(NIBBLE_HAVE_CUDA)
    if (cuda) {
        const gpu::CudaRunnerOptions options{.kv_dtype = KvDtype::Bf16,
                                             .num_blocks = n_blocks,
                                             .block_size = block_size,
                                             .max_model_len = max_model_len,
                                             .max_num_batched_tokens = kMaxStepTokens,
                                             .max_num_seqs = 1,
                                             .act_dtype = DType::BF16,
                                             .max_cudagraph_capture_size = 1,
                                             .num_state_slots = 1};
        HybridView hybrid;
        if (model.hybrid_view(hybrid))
            return std::make_unique<gpu::CudaModelRunner>(
                std::make_shared<gpu::DeviceHybrid>(gpu::upload_hybrid(model.config(), hybrid)), options);
        DecoderView view;
        NIBBLE_CHECK(model.decoder_view(view), "the CUDA backend does not run {}", model.config().arch_name);
        return std::make_unique<gpu::CudaModelRunner>(
            std::make_shared<gpu::DeviceDecoder>(gpu::upload_decoder(model.config(), view)), options);
    }
#else
    NIBBLE_CHECK(!cuda, "this build has no CUDA backend");
#endif
    // Hybrid models get the one recurrent-state slot the single sequence uses (slot 0).
    const bool hybrid = !model.mamba_state_shape(SsmStateDtype::F32).empty();
    return std::make_unique<CpuModelRunner>(model, n_blocks, block_size, KvDtype::F32, hybrid ? 1 : 0);
}

}  // namespace nibble::cli
