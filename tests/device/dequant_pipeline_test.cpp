// Device tests of the prefill dequantization pipeline (gpu/dequant_pipeline.h) with groups: a group's BF16
// copy is its weights' dequantize_nvfp4_to_bf16 / dequantize_fp8_to_bf16 outputs stacked in order, byte for
// byte, for every entry of an order that mixes groups and single weights (so both scratch buffers are used
// and each is reused); the scratch is filled by an earlier forward's weights first (the poison: stale values,
// not the ones expected). Misuse is refused naming the weight: a group past the scratch, a group mixing
// scales or widths, an out-of-order acquire.
#include <gtest/gtest.h>

#include <cstdint>
#include <string>
#include <vector>

#include "base/error.h"
#include "cuda/cuda_check.h"
#include "device_test_util.h"
#include "gpu/dequant_pipeline.h"
#include "gpu/device_decoder.h"
#include "ops/linear/gemm_cuda.h"

namespace nibble {
namespace {

// A random FP8 linear: E4M3 codes without NaN (exponent field at most 0b1110), per-tensor scale 0.5.
gpu::DeviceLinear random_fp8_linear(const std::string& name, int64_t n_out, int64_t n_in, uint64_t& seed) {
    gpu::DeviceLinear w;
    w.name = name;
    w.format = WeightFormat::Fp8;
    w.n_out = n_out;
    w.n_in = n_in;
    w.storage = gpu::random_buffer(static_cast<size_t>(n_out * n_in), ++seed, 0xf7f7f7f7u, 0u);
    w.data = w.storage.get();
    w.scale = 0.5f;
    return w;
}

// w dequantized on its own, as BF16 bits [n_out, n_in].
std::vector<uint16_t> dequantized_alone(const gpu::DeviceLinear& w) {
    cuda::DeviceBuffer out(static_cast<size_t>(w.n_out * w.n_in) * 2);
    out.fill_bytes(0xff);
    if (w.format == WeightFormat::Nvfp4)
        cuda::dequantize_nvfp4_to_bf16(w.nvfp4(), out.as<uint16_t>(), nullptr);
    else
        cuda::dequantize_fp8_to_bf16(static_cast<const uint8_t*>(w.data), w.n_out, w.n_in, out.as<uint16_t>(), nullptr);
    NIBBLE_CUDA_CHECK(cudaDeviceSynchronize());
    return test::download_vec<uint16_t>(out, static_cast<size_t>(w.n_out * w.n_in));
}

// Runs `order` through the pipeline (acquire, read, release each) and checks every copy.
void expect_copies(gpu::DequantPipeline& pipe, const std::vector<gpu::DequantGroup>& order, cudaStream_t stream,
                   const std::string& what) {
    pipe.begin(order);
    for (size_t i = 0; i < order.size(); ++i) {
        const gpu::DequantGroup& g = order[i];
        const uint16_t* copy = pipe.acquire(g, stream);
        std::vector<uint16_t> got(static_cast<size_t>(g.elems()));
        NIBBLE_CUDA_CHECK(cudaMemcpyAsync(got.data(), copy, got.size() * 2, cudaMemcpyDeviceToHost, stream));
        NIBBLE_CUDA_CHECK(cudaStreamSynchronize(stream));
        pipe.release(stream);
        size_t at = 0, bad = 0;
        for (int j = 0; j < g.count; ++j) {
            const gpu::DeviceLinear& w = *g.parts[static_cast<size_t>(j)];
            const std::vector<uint16_t> want = dequantized_alone(w);
            for (size_t e = 0; e < want.size(); ++e)
                if (got[at + e] != want[e] && ++bad <= 5)
                    ADD_FAILURE() << what << ": entry " << i << " (" << w.name << ") element " << e << " is 0x"
                                  << std::hex << got[at + e] << ", alone 0x" << want[e] << std::dec;
            at += want.size();
        }
        EXPECT_EQ(bad, 0u) << what << ": entry " << i << " has " << bad << " of " << got.size() << " values wrong";
    }
    EXPECT_FALSE(pipe.active()) << what;
}

TEST(DequantPipelineCuda, GroupsStackTheirWeights) {
    NIBBLE_REQUIRE_GPU();
    uint64_t seed = test::fresh_seed();
    cudaStream_t stream = nullptr;
    NIBBLE_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    for (const bool fp8 : {false, true}) {
        const std::string what = fp8 ? "fp8" : "nvfp4";
        // Two layers' q [128, 256], k and v [32, 256], o [256, 128]; a layer's o is a single entry.
        struct Shape {
            const char* name;
            int64_t n_out, n_in;
        };
        const Shape shapes[] = {{"q", 128, 256}, {"k", 32, 256}, {"v", 32, 256}, {"o", 256, 128}};
        std::vector<gpu::DeviceLinear> w;
        for (int layer = 0; layer < 2; ++layer)
            for (const Shape& s : shapes) {
                const std::string full = "layers." + std::to_string(layer) + "." + s.name;
                w.push_back(fp8 ? random_fp8_linear(full, s.n_out, s.n_in, seed)
                                : gpu::random_linear(full, s.n_out, s.n_in, true, seed));
            }
        const int64_t stacked = (128 + 32 + 32) * 256;
        gpu::DequantPipeline pipe(stacked);
        // An earlier forward's weights fill both scratch buffers first.
        expect_copies(pipe, {gpu::DequantGroup::one(w[3]), gpu::DequantGroup::one(w[7]), gpu::DequantGroup::one(w[0])},
                      stream, what + " (filling the scratch)");
        const std::vector<gpu::DequantGroup> order = {
            {{&w[0], &w[1], &w[2]}, 3}, gpu::DequantGroup::one(w[3]),
            {{&w[4], &w[5], &w[6]}, 3}, gpu::DequantGroup::one(w[7]),
            {{&w[5], &w[6], nullptr}, 2}};
        expect_copies(pipe, order, stream, what + " groups");

        // Misuse.
        gpu::DequantPipeline small(stacked - 1);
        EXPECT_THROW(small.begin(std::vector<gpu::DequantGroup>{{{&w[0], &w[1], &w[2]}, 3}}), Error) << what;
        EXPECT_THROW(pipe.begin(std::vector<gpu::DequantGroup>{{{&w[0], &w[3], nullptr}, 2}}), Error)
            << what << ": n_in 256 and 128 in one group";
        gpu::DeviceLinear other_scale = fp8 ? random_fp8_linear("other", 32, 256, seed)
                                            : gpu::random_linear("other", 32, 256, true, seed);
        other_scale.scale = 2.0f;
        EXPECT_THROW(pipe.begin(std::vector<gpu::DequantGroup>{{{&w[0], &other_scale, nullptr}, 2}}), Error)
            << what << ": two scales in one group";
        pipe.begin(order);
        EXPECT_THROW(pipe.acquire(w[0], stream), Error) << what << ": q alone where its group is next";
        (void)pipe.acquire(order[0], stream);
        pipe.release(stream);
        EXPECT_THROW(pipe.acquire(w[4], stream), Error) << what << ": another layer's q before o";
        NIBBLE_CUDA_CHECK(cudaStreamSynchronize(stream));
    }
    NIBBLE_CUDA_CHECK(cudaStreamDestroy(stream));
}

}  // namespace
}  // namespace nibble
