// The kernel registry: every tunable op's variants and what each needs from a device, as data. The
// autotuner (tune/tuner.h) only ever times or chooses a variant that tune/eligibility.h has found to fit
// the device's profile (tune/device_profile.h); nothing here launches anything, and the module is plain
// C++ compiled in every build (CPU-only included), so `nibble tune --device-profile gb10 --list` works on
// any machine.
//
// Adding a kernel: add one KernelVariant to the table in registry.cpp (and, for a new op, one OpKind
// value with its name). Its fields say what shapes it serves (VariantApplies) and what a launch needs
// (VariantNeeds); say in the entry's `source` where each number comes from (the kernel's __shared__
// arrays, its __launch_bounds__, ptxas -v of the arch it was read for). tests/tune walks every entry.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <string_view>

#include "ops/attention/kv_cache.h"
#include "tensor/dtype.h"

namespace nibble::tune {

// What a variant computes; the unit the tuner chooses for.
enum class OpKind : uint8_t {
    GemvNvfp4,         // y[m, n] = x[m, k] W^T, W NVFP4, m = 1..16 a launch (ops/linear/linear_cuda.h)
    GemvBf16,          // same, W BF16
    GemmNvfp4,         // NVFP4 prefill GEMM, m > 16 (no kernel registered yet)
    AttentionDecode,   // paged attention, one query token per sequence (ops/attention/attention_cuda.h)
    AttentionPrefill,  // paged attention, several query tokens per sequence
};
inline constexpr OpKind kAllOps[] = {OpKind::GemvNvfp4, OpKind::GemvBf16, OpKind::GemmNvfp4,
                                     OpKind::AttentionDecode, OpKind::AttentionPrefill};

// "gemv_nvfp4", "gemv_bf16", "gemm_nvfp4", "attention_decode", "attention_prefill".
std::string_view op_name(OpKind op);

// Architecture-specific instructions a variant's machine code uses, beyond what its minimum compute
// capability implies. An `a` target's code (sm_90a, sm_120a, ...) runs only on exactly that compute
// capability, so such a variant also needs the build to hold code for that target (see eligibility.h).
enum class ArchIsa : uint8_t {
    None,            // portable PTX features of its minimum compute capability (mma.sync m16n8k16 at 8.0)
    WgmmaSm90a,      // wgmma / setmaxnreg: sm_90a only
    Tcgen05Sm100a,   // tcgen05.mma / TMEM: sm_100a (B200, GB200)
    Fp4MmaSm120a,    // mma.sync ... kind::mxf4nvf4.block_scale: sm_120a / sm_121a (RTX 50xx, GB10)
};
std::string_view isa_name(ArchIsa isa);

// What one launch needs. Static shared memory is the kernel's __shared__ arrays; dynamic is what the
// launcher passes (and opts into with cudaFuncAttributeMaxDynamicSharedMemorySize when above 48 KiB).
struct VariantNeeds {
    int threads_per_block = 0;
    int64_t static_smem_bytes = 0;
    int64_t dynamic_smem_bytes = 0;
    int regs_per_thread = 0;     // ptxas -v; the larger of the F32 / BF16 activation instantiations
    int min_blocks_per_sm = 0;   // __launch_bounds__'s second argument (0: none)
    int min_cc = 80;             // minimum compute capability, major * 10 + minor
    ArchIsa isa = ArchIsa::None;
    int64_t smem_per_block() const { return static_smem_bytes + dynamic_smem_bytes; }
};

struct OpShape;

// Which shapes a variant serves. A field left at its zero value does not restrict.
struct VariantApplies {
    int m_min = 0, m_max = 0;        // GEMV/GEMM activation rows of one launch (0, 0: any)
    int head_dim = 0;                // attention head_dim (0: any)
    int group_min = 0, group_max = 0;  // attention query heads per KV head
    bool any_kv_dtype = true;        // attention: false restricts to kv_dtype
    KvDtype kv_dtype = KvDtype::Bf16;
    // A dispatch rule the fields above cannot say (the op's launcher decides by it), or null. Mirrors the
    // launcher's condition so that a shape's applicable variant is the one the launcher runs.
    bool (*also)(const OpShape&) = nullptr;
};

// A shape the model will run, in the tuner's terms. `m` is the launch's rows (GEMV: 1..16, the tile the
// launcher splits m into); attention uses head_dim, group, kv_dtype, q_len (1 for decode) and kv_len.
struct OpShape {
    OpKind op = OpKind::GemvNvfp4;
    DType activation = DType::BF16;  // x / y (GEMV) or q / out (attention): F32 or BF16
    int64_t m = 1, n = 0, k = 0;
    int head_dim = 0, group = 0;
    KvDtype kv_dtype = KvDtype::Bf16;
    int64_t n_seqs = 1, n_kv_heads = 0, q_len = 1, kv_len = 0;
};

// Whether a variant's measurement on real hardware exists, and where it is written down.
enum class Measured : uint8_t {
    OnHopper,       // timed on H100/H200 (docs/perf.md)
    PendingHopper,  // runs on the H100/H200 here; no timing of it in docs/perf.md yet
    NotMeasured,    // compiles; no device of its kind was available to time it
};

struct KernelVariant {
    OpKind op;
    std::string_view name;     // unique within the op: "mma.nt1", "cuda_core.mt4", "decode_mma.bf16.hd128"
    std::string_view kernel;   // the __global__ function (template arguments as in the source)
    VariantNeeds needs;
    VariantApplies applies;
    std::span<const int> splits;  // key-range split counts the tuner may try (attention); empty: one launch
    Measured measured;
    std::string_view source;   // where `needs` comes from
};

// Every registered variant, in a fixed order (the order the built-in heuristics prefer within an op).
std::span<const KernelVariant> kernel_registry();

// The variant of `op` named `name`, or null.
const KernelVariant* find_variant(OpKind op, std::string_view name);

// Whether `v` serves `shape` (op, m range, head_dim, group, KV dtype); says nothing of the device.
bool variant_applies(const KernelVariant& v, const OpShape& shape);

// The shape bucket the tuner keys its choices by: "m4.n4096.k4096", "hd128.g4.kv2048.seqs8", ...
// GEMV m is the launch tile (1, 2, 4, 8, 16); attention kv_len and n_seqs round up to powers of two.
std::string shape_bucket(const OpShape& shape);

// The dtype part of the tuner's key: the activation dtype for GEMV ("bf16", "f32"), the KV cache dtype
// and the activation dtype for attention ("nvfp4/bf16").
std::string shape_dtype(const OpShape& shape);

}  // namespace nibble::tune
