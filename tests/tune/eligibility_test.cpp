// The registry's entries are consistent, and no variant that exceeds a profile's limits is ever eligible on
// it: checked over every registry entry and every built-in profile (the fit recomputed here from first
// principles), over profiles shrunk around each variant's needs, and on hand-made edge cases.
#include <gtest/gtest.h>

#include <algorithm>
#include <functional>
#include <set>
#include <string>

#include "tune/eligibility.h"
#include "tune/registry.h"

namespace nibble::tune {
namespace {

const BuildTargets kAllTargets = BuildTargets::parse("90a;100a;120a;121a");

// Shapes a variant applies to: its applicability corners, over both activation dtypes and a short and a
// long prefill (a variant's dispatch rule picks which of them it serves). At least one, checked below.
std::vector<OpShape> shapes_for(const KernelVariant& v) {
    std::vector<OpShape> out;
    for (DType act : {DType::BF16, DType::F32})
        for (int64_t q_len : {2, 512})
            for (bool low : {false, true}) {
                OpShape s;
                s.op = v.op;
                s.activation = act;
                s.n = 4096, s.k = 4096;
                s.m = low ? std::max(v.applies.m_min, 1) : (v.applies.m_max > 0 ? std::min(v.applies.m_max, 4096) : 1);
                s.head_dim = v.applies.head_dim > 0 ? v.applies.head_dim : 128;
                s.group = low ? std::max(v.applies.group_min, 1) : (v.applies.group_max > 0 ? v.applies.group_max : 4);
                s.kv_dtype = v.applies.any_kv_dtype ? KvDtype::Bf16 : v.applies.kv_dtype;
                s.n_kv_heads = 8, s.kv_len = 4096, s.q_len = v.op == OpKind::AttentionPrefill ? q_len : 1;
                if (variant_applies(v, s)) out.push_back(s);
            }
    return out;
}

// The limits, restated independently of eligibility.cpp.
bool fits(const KernelVariant& v, const DeviceProfile& d) {
    const VariantNeeds& n = v.needs;
    const int64_t smem = n.static_smem_bytes + n.dynamic_smem_bytes;
    const int64_t regs_per_warp = (static_cast<int64_t>(n.regs_per_thread) * 32 + 255) / 256 * 256;
    const int64_t regs = regs_per_warp * ((n.threads_per_block + 31) / 32);
    return d.cc() >= n.min_cc && n.threads_per_block <= d.max_threads_per_block &&
           n.static_smem_bytes <= d.smem_per_block && smem <= d.smem_per_block_optin &&
           smem + d.smem_reserved_per_block <= d.smem_per_sm && n.regs_per_thread <= d.max_regs_per_thread &&
           regs <= d.regs_per_block && regs <= d.regs_per_sm;
}

TEST(Registry, EntriesAreWellFormed) {
    std::set<std::string> names;
    for (const KernelVariant& v : kernel_registry()) {
        SCOPED_TRACE(std::string(op_name(v.op)) + " " + std::string(v.name));
        EXPECT_TRUE(names.insert(std::string(op_name(v.op)) + "/" + std::string(v.name)).second) << "duplicate name";
        EXPECT_FALSE(v.kernel.empty());
        EXPECT_FALSE(v.source.empty());
        EXPECT_GT(v.needs.threads_per_block, 0);
        EXPECT_EQ(v.needs.threads_per_block % 32, 0);
        EXPECT_GT(v.needs.regs_per_thread, 0);
        EXPECT_LE(v.needs.regs_per_thread, 255);
        EXPECT_GE(v.needs.min_cc, 80);
        EXPECT_EQ(find_variant(v.op, v.name), &v);
        EXPECT_FALSE(shapes_for(v).empty()) << "applies to no shape";
        for (int splits : v.splits) EXPECT_GE(splits, 1);
    }
}

// The shared-memory figures are those of the kernels: the CUDA-core attention tile for HD 128 / NJ 8
// (attention_cuda.cu attn_smem_bytes: 4 * (32*128 + 32*132 + 32*128 + 32*32 + 3*32)), the tensor-core
// decode's static arrays with the warp merge's (ptxas -v: 16800 bytes at HD 128, 8608 at HD 64), and the
// NVFP4 GEMV's reduction buffer (4096 / 8192 bytes).
TEST(Registry, SharedMemoryMatchesTheKernels) {
    EXPECT_EQ(find_variant(OpKind::AttentionPrefill, "cuda_core.bf16.hd128.nj8")->needs.dynamic_smem_bytes, 54144);
    EXPECT_EQ(find_variant(OpKind::AttentionDecode, "cuda_core.fp8.hd64.nj4")->needs.dynamic_smem_bytes,
              4 * (16 * 64 + 32 * 68 + 32 * 64 + 16 * 32 + 3 * 16));
    EXPECT_EQ(find_variant(OpKind::AttentionDecode, "decode_mma.nvfp4.hd128")->needs.static_smem_bytes,
              16800);
    EXPECT_EQ(find_variant(OpKind::AttentionDecode, "decode_mma.bf16.hd64")->needs.static_smem_bytes, 8608);
    EXPECT_EQ(find_variant(OpKind::GemvNvfp4, "mma.nt1")->needs.static_smem_bytes, 4096);
    EXPECT_EQ(find_variant(OpKind::GemvNvfp4, "mma.nt2")->needs.static_smem_bytes, 8192);
    // prefill_smem_bytes<HD>: 2 stages x (K, V) x [64 keys][HD] x 2 bytes.
    EXPECT_EQ(find_variant(OpKind::AttentionPrefill, "prefill_mma.nvfp4.hd128")->needs.dynamic_smem_bytes, 65536);
    EXPECT_EQ(find_variant(OpKind::AttentionPrefill, "prefill_mma.bf16.hd64")->needs.dynamic_smem_bytes, 32768);
    EXPECT_EQ(find_variant(OpKind::AttentionPrefill, "prefill_wide.fp8.hd128")->needs.dynamic_smem_bytes,
              98304);
    EXPECT_EQ(find_variant(OpKind::AttentionPrefill, "prefill_wide.nvfp4.hd128")->needs.dynamic_smem_bytes,
              83968);
}

// Each attention shape has exactly the kernels paged_attention can run for it: the two tensor-core prefill
// kernels for a BF16 q with >= 16 rows (Wide first: AttentionArgs::prefill_kernel's Auto); for decode with
// group <= 8 the tensor-core decode kernel, and for FP8/NVFP4 caches also the pipelined ones
// (AttentionArgs::decode_kernel chooses); CUDA cores otherwise. Every GEMV tile has one CUDA-core variant.
TEST(Registry, DispatchCoverage) {
    for (KvDtype kv : {KvDtype::Bf16, KvDtype::Fp8, KvDtype::Nvfp4})
        for (int hd : {64, 128})
            for (int group = 1; group <= 32; ++group)
                for (DType act : {DType::BF16, DType::F32})
                    for (int64_t q_len : {1, 2, 3, 8, 64}) {
                        const OpKind op = q_len == 1 ? OpKind::AttentionDecode : OpKind::AttentionPrefill;
                        const OpShape s{.op = op, .activation = act, .head_dim = hd, .group = group, .kv_dtype = kv,
                                        .n_kv_heads = 8, .q_len = q_len, .kv_len = 1024};
                        std::vector<std::string> names;
                        for (const KernelVariant& v : kernel_registry())
                            if (variant_applies(v, s)) names.emplace_back(v.name);
                        const bool tc_prefill = act == DType::BF16 && q_len > 1 && q_len * group >= 16;
                        const bool tc_decode = q_len == 1 && group <= 8;
                        // FP8 / NVFP4 decode on the tensor cores: Mma or Pipelined, and for NVFP4 Pipelined16
                        // (AttentionArgs::decode_kernel).
                        const bool two = (tc_decode && kv != KvDtype::Bf16) || tc_prefill;
                        const size_t expected = !two ? 1u : kv == KvDtype::Nvfp4 && tc_decode ? 3u : 2u;
                        ASSERT_EQ(names.size(), expected) << op_name(op) << " hd " << hd << " group " << group
                                                               << " q_len " << q_len << " " << kv_dtype_name(kv) << " "
                                                               << dtype_name(act);
                        const std::string expect = tc_prefill  ? "prefill_wide."
                                                   : tc_decode ? "decode_mma."
                                                               : "cuda_core.";
                        EXPECT_EQ(names[0].rfind(expect, 0), 0u) << names[0] << " for group " << group << " q_len " << q_len;
                        if (two) {
                            EXPECT_EQ(names[1].rfind(tc_prefill ? "prefill_mma." : "decode_pipe.", 0), 0u)
                                << names[1];
                        }
                        if (expected == 3) {
                            EXPECT_EQ(names[2].rfind("decode_pipe16.", 0), 0u) << names[2];
                        }
                    }
    for (OpKind op : {OpKind::GemvNvfp4, OpKind::GemvBf16})
        for (int m = 1; m <= 40; ++m) {
            const OpShape s{.op = op, .m = m, .n = 4096, .k = 4096};
            int cuda_core = 0;
            for (const KernelVariant& v : kernel_registry())
                cuda_core += variant_applies(v, s) && v.name.substr(0, 10) == "cuda_core.";
            EXPECT_EQ(cuda_core, 1) << op_name(op) << " m " << m;
        }
    // The NVFP4 prefill GEMM: BF16 activations, more rows than a GEMV tile.
    const KernelVariant& gemm = *find_variant(OpKind::GemmNvfp4, "dequant_bf16.cublaslt");
    EXPECT_TRUE(variant_applies(gemm, {.op = OpKind::GemmNvfp4, .m = 2048, .n = 4096, .k = 4096}));
    EXPECT_FALSE(variant_applies(gemm, {.op = OpKind::GemmNvfp4, .m = 16, .n = 4096, .k = 4096}));
    EXPECT_FALSE(variant_applies(gemm, {.op = OpKind::GemmNvfp4, .activation = DType::F32, .m = 2048, .n = 4096, .k = 4096}));
}

// Property: over every variant and every built-in profile, eligible implies fits, and for the registry's
// portable variants on a build with code for the device, fits implies eligible.
TEST(Eligibility, NothingBeyondABuiltinProfileIsEligible) {
    for (const DeviceProfile& d : builtin_profiles()) {
        for (const KernelVariant& v : kernel_registry()) {
            SCOPED_TRACE(d.key + " " + std::string(v.name));
            const auto reason = exclusion_reason(v, d, kAllTargets);
            if (!reason) {
                EXPECT_TRUE(fits(v, d));
            }
            if (fits(v, d) && v.needs.isa == ArchIsa::None) {
                EXPECT_FALSE(reason) << *reason;
            }
            for (const OpShape& s : shapes_for(v))
                for (const KernelVariant* e : eligible_variants(s, d, kAllTargets)) EXPECT_TRUE(fits(*e, d));
        }
    }
}

// Property: shrink a profile's limits to just below each variant's needs, one limit at a time; the variant
// must then be excluded, and with the limit at exactly its needs it must be eligible again.
TEST(Eligibility, EachLimitExcludesAtOneBelowTheNeed) {
    const DeviceProfile base = builtin_profile("gb10");
    for (const KernelVariant& v : kernel_registry()) {
        SCOPED_TRACE(std::string(v.name));
        const VariantNeeds& n = v.needs;
        const int64_t regs_per_block =
            ((static_cast<int64_t>(n.regs_per_thread) * 32 + 255) / 256 * 256) * (n.threads_per_block / 32);
        struct Limit {
            const char* what;
            std::function<void(DeviceProfile&, int64_t)> set;
            int64_t need;
        };
        const Limit limits[] = {
            {"optin smem", [](DeviceProfile& d, int64_t x) { d.smem_per_block_optin = x; }, n.smem_per_block()},
            {"smem per SM", [&](DeviceProfile& d, int64_t x) { d.smem_per_sm = x + d.smem_reserved_per_block; },
             n.smem_per_block()},
            {"static smem", [](DeviceProfile& d, int64_t x) { d.smem_per_block = x; }, n.static_smem_bytes},
            {"threads", [](DeviceProfile& d, int64_t x) { d.max_threads_per_block = static_cast<int>(x); },
             n.threads_per_block},
            {"regs per thread", [](DeviceProfile& d, int64_t x) { d.max_regs_per_thread = static_cast<int>(x); },
             n.regs_per_thread},
            {"regs per block", [](DeviceProfile& d, int64_t x) { d.regs_per_block = static_cast<int>(x); },
             regs_per_block},
            {"cc", [](DeviceProfile& d, int64_t x) { d.cc_major = static_cast<int>(x / 10), d.cc_minor = static_cast<int>(x % 10); },
             n.min_cc},
        };
        for (const Limit& l : limits) {
            if (l.need <= 0) continue;  // e.g. no static shared memory: nothing to undercut
            SCOPED_TRACE(l.what);
            DeviceProfile at = base, below = base;
            l.set(at, l.need);
            l.set(below, l.need - 1);
            // A lowered compute capability needs code for it: give the build a PTX target old enough.
            const BuildTargets build = BuildTargets::parse("80;90a;100a;120a;121a");
            EXPECT_TRUE(exclusion_reason(v, below, build).has_value());
            EXPECT_FALSE(exclusion_reason(v, at, build).has_value()) << *exclusion_reason(v, at, build);
        }
    }
}

TEST(Eligibility, HandMadeEdgeCases) {
    const KernelVariant& big = *find_variant(OpKind::AttentionPrefill, "cuda_core.bf16.hd128.nj8");  // 54144 B dynamic
    DeviceProfile d = builtin_profile("gb10");
    EXPECT_FALSE(exclusion_reason(big, d, kAllTargets));
    // A device with the 48 KiB default and no opt-in: the 53 KiB tile cannot launch.
    d.smem_per_block_optin = 48 * 1024;
    const auto r = exclusion_reason(big, d, kAllTargets);
    ASSERT_TRUE(r);
    EXPECT_NE(r->find("54144 B of shared memory per block"), std::string::npos) << *r;
    EXPECT_NE(r->find("49152 B"), std::string::npos) << *r;

    // Exactly at the limit fits; one byte less does not (per SM: the block plus the 1 KiB reservation).
    d = builtin_profile("gb10");
    d.smem_per_sm = 54144 + 1024;
    EXPECT_FALSE(exclusion_reason(big, d, kAllTargets));
    d.smem_per_sm -= 1;
    EXPECT_TRUE(exclusion_reason(big, d, kAllTargets));

    // Registers: 164 per thread x 256 threads rounds to 168 x 256 = 43008 per block.
    const KernelVariant& nt2 = *find_variant(OpKind::GemvNvfp4, "mma.nt2");
    d = builtin_profile("h100");
    d.regs_per_block = 43008;
    EXPECT_FALSE(exclusion_reason(nt2, d, kAllTargets));
    d.regs_per_block = 43007;
    ASSERT_TRUE(exclusion_reason(nt2, d, kAllTargets));
    EXPECT_NE(exclusion_reason(nt2, d, kAllTargets)->find("registers per block"), std::string::npos);

    // Compute capability below mma.sync's 8.0.
    d = builtin_profile("h100");
    d.cc_major = 7, d.cc_minor = 5;
    ASSERT_TRUE(exclusion_reason(nt2, d, BuildTargets::parse("75")));
    EXPECT_NE(exclusion_reason(nt2, d, BuildTargets::parse("75"))->find("compute capability 8.0"), std::string::npos);
}

TEST(Eligibility, BuildTargets) {
    const KernelVariant& v = *find_variant(OpKind::GemvNvfp4, "mma.nt1");
    const DeviceProfile gb10 = builtin_profile("gb10");
    // sm_120a code does not load on sm_121 (the failure): only 121a, the 120f family or PTX does.
    EXPECT_TRUE(exclusion_reason(v, gb10, BuildTargets::parse("90a;120a")));
    EXPECT_NE(exclusion_reason(v, gb10, BuildTargets::parse("90a;120a"))->find("no code for compute capability 12.1"),
              std::string::npos);
    EXPECT_FALSE(exclusion_reason(v, gb10, BuildTargets::parse("90a;121a")));
    EXPECT_FALSE(exclusion_reason(v, gb10, BuildTargets::parse("120f")));
    EXPECT_FALSE(exclusion_reason(v, gb10, BuildTargets::parse("90")));   // PTX, JIT-compiled
    EXPECT_TRUE(exclusion_reason(v, builtin_profile("h100"), BuildTargets::parse("100a,120a")));
    EXPECT_TRUE(exclusion_reason(v, gb10, BuildTargets::parse("")));
    EXPECT_THROW(BuildTargets::parse("sm_90a"), std::exception);
}

TEST(Eligibility, ArchSpecificInstructions) {
    // A variant using sm_120a's FP4 MMA: eligible on SM120/SM121 with a matching `a` target, never on Hopper
    // or B200, and not from PTX alone.
    static constexpr KernelVariant fp4{OpKind::GemvNvfp4, "fp4mma.test", "test_kernel",
                                       {.threads_per_block = 128, .regs_per_thread = 64, .min_cc = 120,
                                        .isa = ArchIsa::Fp4MmaSm120a},
                                       {.m_min = 1, .m_max = 8}, {}, Measured::NotMeasured, "test"};
    EXPECT_FALSE(exclusion_reason(fp4, builtin_profile("gb10"), kAllTargets));
    EXPECT_FALSE(exclusion_reason(fp4, builtin_profile("rtx5090"), kAllTargets));
    EXPECT_TRUE(exclusion_reason(fp4, builtin_profile("b200"), kAllTargets));
    EXPECT_TRUE(exclusion_reason(fp4, builtin_profile("h100"), kAllTargets));
    const auto ptx_only = exclusion_reason(fp4, builtin_profile("gb10"), BuildTargets::parse("90"));
    ASSERT_TRUE(ptx_only);
    EXPECT_NE(ptx_only->find("no sm_121a"), std::string::npos) << *ptx_only;
}

TEST(Eligibility, ConfiguredTargetsParse) { EXPECT_NO_THROW(BuildTargets::configured()); }

}  // namespace
}  // namespace nibble::tune
