// Built-in device profiles. Sources of the figures:
//   [CG]   CUDA C++ Programming Guide, "Compute Capabilities" / technical specifications table: per compute
//          capability, shared memory per SM and per block (opt-in), registers, threads and blocks per SM.
//          9.0 and 10.0: 228 KiB per SM, 227 KiB (232,448 B) per block; 12.x: 100 KiB per SM, 99 KiB
//          (101,376 B) per block, 1,536 threads per SM. Every listed one: 64 Ki registers per SM and per
//          block, 255 per thread, 1,024 threads per block, 32 resident blocks per SM, 1 KiB reserved per block.
//   [H100] NVIDIA H100 Tensor Core GPU datasheet (SXM5): 132 SMs, 80 GB HBM3, 3.35 TB/s, BF16 1,979
//          TFLOPS with sparsity (989 dense); L2 50 MB (Hopper architecture whitepaper).
//   [H200] NVIDIA H200 Tensor Core GPU datasheet (SXM): 141 GB HBM3e, 4.8 TB/s, BF16 as H100 (same GH100
//          die, 132 SMs).
//   [B200] NVIDIA DGX B200 / HGX B200 datasheets: per GPU 180 GB HBM3e, 8 TB/s (64 TB/s over 8 GPUs), FP4
//          18 PFLOPS and BF16 4.5 PFLOPS with sparsity (dense: half); 148 SMs as the driver reports a B200.
//   [5090] NVIDIA RTX Blackwell GPU architecture whitepaper (GeForce RTX 5090): 170 SMs, 32 GB GDDR7 on a
//          512-bit bus at 28 Gbps (1,792 GB/s), 96 MB L2, FP4 1,676 TFLOPS dense (3,352 sparse), FP16/BF16
//          with FP32 accumulation 209.5 TFLOPS dense.
//   [GB10] NVIDIA DGX Spark datasheet and GB10 announcements: Blackwell GPU of compute capability 12.1 with
//          6,144 CUDA cores (48 SMs of 128), 128 GB LPDDR5x unified with the Grace CPU, 273 GB/s, "up to
//          1 PFLOP" FP4 with sparsity (500 TFLOPS dense). BF16 is not published: estimated here as FP4 / 8,
//          the ratio of the RTX Blackwell whitepaper's dense FP4 to dense BF16-with-FP32-accumulation rates
//          (an estimate, used only by the roofline). L2 not published (0).
#include "tune/device_profile.h"

#include <cctype>
#include <cmath>
#include <string>
#include <vector>

#include <fmt/format.h>

#include "base/error.h"

namespace nibble::tune {

namespace {

constexpr int64_t kKiB = 1024, kMiB = 1024 * kKiB, kGiB = 1024 * kMiB;

DeviceProfile make_gb10() {
    DeviceProfile p;
    p.key = "gb10";
    p.name = "NVIDIA GB10 (DGX Spark)";
    p.cc_major = 12, p.cc_minor = 1;
    p.sm_count = 48;
    p.smem_per_block_optin = 101376;  // [CG] 12.x: 99 KiB
    p.smem_per_sm = 100 * kKiB;       // [CG] 12.x
    p.max_threads_per_sm = 1536;      // [CG] 12.x
    p.memory_bytes = 128LL * 1000 * 1000 * 1000;  // [GB10] 128 GB LPDDR5x, shared with the CPU
    p.memory_bandwidth = 273e9;       // [GB10]
    p.unified_memory = true;
    p.fp4_flops = 500e12;             // [GB10] 1 PFLOP sparse
    p.bf16_flops = 500e12 / 8;        // estimate, see [GB10]
    p.source = "DGX Spark datasheet; CUDA Programming Guide 12.x limits; BF16 rate estimated";
    return p;
}

DeviceProfile make_rtx5090() {
    DeviceProfile p;
    p.key = "rtx5090";
    p.name = "NVIDIA GeForce RTX 5090";
    p.cc_major = 12, p.cc_minor = 0;
    p.sm_count = 170;
    p.smem_per_block_optin = 101376;  // [CG] 12.x
    p.smem_per_sm = 100 * kKiB;
    p.max_threads_per_sm = 1536;
    p.l2_bytes = 96 * kMiB;           // [5090]
    p.memory_bytes = 32 * kGiB;       // [5090]
    p.memory_bandwidth = 1792e9;      // [5090] 512 bit x 28 Gbps / 8
    p.fp4_flops = 1676e12;            // [5090] dense
    p.bf16_flops = 209.5e12;          // [5090] dense, FP32 accumulation
    p.source = "RTX Blackwell architecture whitepaper; CUDA Programming Guide 12.x limits";
    return p;
}

DeviceProfile make_b200() {
    DeviceProfile p;
    p.key = "b200";
    p.name = "NVIDIA B200";
    p.cc_major = 10, p.cc_minor = 0;
    p.sm_count = 148;
    p.smem_per_block_optin = 227 * kKiB;  // [CG] 10.0
    p.smem_per_sm = 228 * kKiB;
    p.memory_bytes = 180LL * 1000 * 1000 * 1000;  // [B200]
    p.memory_bandwidth = 8e12;        // [B200]
    p.fp4_flops = 9e15;               // [B200] 18 PFLOPS sparse
    p.bf16_flops = 2.25e15;           // [B200] 4.5 PFLOPS sparse
    p.source = "DGX/HGX B200 datasheets; CUDA Programming Guide 10.0 limits";
    return p;
}

DeviceProfile make_h100() {
    DeviceProfile p;
    p.key = "h100";
    p.name = "NVIDIA H100 80GB HBM3";
    p.cc_major = 9, p.cc_minor = 0;
    p.sm_count = 132;
    p.smem_per_block_optin = 227 * kKiB;  // [CG] 9.0
    p.smem_per_sm = 228 * kKiB;
    p.l2_bytes = 50 * kMiB;           // [H100]
    p.memory_bytes = 80 * kGiB;       // [H100]
    p.memory_bandwidth = 3.35e12;     // [H100]
    p.fp4_flops = 0;                  // no FP4 tensor cores: NVFP4 runs dequantized to BF16
    p.bf16_flops = 989e12;            // [H100] dense
    p.source = "H100 datasheet (SXM5); CUDA Programming Guide 9.0 limits";
    return p;
}

DeviceProfile make_h200() {
    DeviceProfile p = make_h100();
    p.key = "h200";
    p.name = "NVIDIA H200";
    p.memory_bytes = 141LL * 1000 * 1000 * 1000;  // [H200]
    p.memory_bandwidth = 4.8e12;      // [H200]
    p.source = "H200 datasheet (SXM); CUDA Programming Guide 9.0 limits";
    return p;
}

const std::vector<DeviceProfile>& profiles() {
    static const std::vector<DeviceProfile> all = {make_gb10(), make_rtx5090(), make_b200(), make_h100(), make_h200()};
    return all;
}

std::string lower(std::string_view s) {
    std::string out(s);
    for (char& c : out) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
    return out;
}

}  // namespace

std::span<const DeviceProfile> builtin_profiles() { return profiles(); }

std::optional<DeviceProfile> find_builtin_profile(std::string_view key) {
    std::string k = lower(key);
    if (k == "spark" || k == "dgx-spark" || k == "dgx_spark") k = "gb10";
    if (k == "h100-sxm" || k == "h100_sxm") k = "h100";
    if (k == "rtx-5090" || k == "5090") k = "rtx5090";
    for (const DeviceProfile& p : profiles())
        if (p.key == k) return p;
    return std::nullopt;
}

DeviceProfile builtin_profile(std::string_view key) {
    if (auto p = find_builtin_profile(key)) return *p;
    std::string known;
    for (const DeviceProfile& p : profiles()) known += (known.empty() ? "" : ", ") + p.key;
    fail("--device-profile '{}' is not a known profile (known: {})", key, known);
}

DeviceProfile profile_from_device(const cuda::DeviceInfo& info) {
    DeviceProfile p;
    p.key = "device";
    p.name = info.name;
    p.cc_major = info.cc_major, p.cc_minor = info.cc_minor;
    p.sm_count = info.sm_count;
    if (info.smem_per_block > 0) p.smem_per_block = info.smem_per_block;
    p.smem_per_block_optin = info.smem_per_block_optin;
    p.smem_per_sm = info.smem_per_sm;
    p.smem_reserved_per_block = info.smem_reserved_per_block;
    if (info.regs_per_block > 0) p.regs_per_block = info.regs_per_block;
    if (info.regs_per_sm > 0) p.regs_per_sm = info.regs_per_sm;
    if (info.max_threads_per_block > 0) p.max_threads_per_block = info.max_threads_per_block;
    if (info.max_threads_per_sm > 0) p.max_threads_per_sm = info.max_threads_per_sm;
    if (info.max_blocks_per_sm > 0) p.max_blocks_per_sm = info.max_blocks_per_sm;
    p.l2_bytes = info.l2_bytes;
    p.memory_bytes = info.total_memory;
    // Double data rate: two transfers per clock over the whole bus.
    p.memory_bandwidth = 2.0 * info.memory_clock_khz * 1000.0 * info.memory_bus_bits / 8.0;
    p.unified_memory = info.integrated;
    p.driver_version = info.driver_version, p.runtime_version = info.runtime_version;
    p.source = "cudaGetDeviceProperties";
    // Tensor-core rates are not device properties: take them from the built-in profile of the same compute
    // capability, scaled by SM count (clocks differ between SKUs: a roofline figure, not a measurement).
    for (const DeviceProfile& b : profiles()) {
        if (b.cc() != p.cc() || b.sm_count <= 0) continue;
        const double ratio = static_cast<double>(p.sm_count) / b.sm_count;
        p.fp4_flops = b.fp4_flops * ratio;
        p.bf16_flops = b.bf16_flops * ratio;
        if (p.memory_bandwidth <= 0 && b.sm_count == p.sm_count) p.memory_bandwidth = b.memory_bandwidth;
        break;
    }
    return p;
}

}  // namespace nibble::tune
