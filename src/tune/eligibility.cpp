#include "tune/eligibility.h"

#include <fmt/format.h>

#include <charconv>

#include "base/error.h"
#include "base/log.h"

#ifndef NIBBLE_CUDA_ARCHS_LIST
#define NIBBLE_CUDA_ARCHS_LIST ""
#endif

namespace nibble::tune {

namespace {

struct Target {
    int cc = 0;        // major * 10 + minor
    char suffix = 0;   // 'a', 'f' or 0
};

Target parse_target(std::string_view t) {
    Target out;
    std::string_view digits = t;
    if (!t.empty() && (t.back() == 'a' || t.back() == 'f')) {
        out.suffix = t.back();
        digits = t.substr(0, t.size() - 1);
    }
    // CMake also accepts "-real" / "-virtual" suffixes: the compute capability is what matters here.
    if (const size_t dash = digits.find('-'); dash != std::string_view::npos) digits = digits.substr(0, dash);
    int v = 0;
    const auto [end, ec] = std::from_chars(digits.data(), digits.data() + digits.size(), v);
    NIBBLE_CHECK(ec == std::errc() && end == digits.data() + digits.size() && v >= 10,
                 "CUDA architecture '{}' is not of the form 90, 90a or 120f", t);
    out.cc = v;
    return out;
}

// Whether a target's code runs on compute capability `cc`, and whether it may hold arch-specific code.
bool runs_on(const Target& t, int cc) {
    if (t.suffix == 'a') return t.cc == cc;
    if (t.suffix == 'f') return t.cc / 10 == cc / 10 && cc >= t.cc;
    return cc >= t.cc;  // PTX, JIT-compiled for a later device
}

// Compute capabilities on which each arch-specific instruction set exists (PTX ISA: wgmma sm_90a;
// tcgen05 sm_100a/sm_103a; mma.sync kind::mxf4nvf4 block_scale sm_120a/sm_121a).
bool isa_available(ArchIsa isa, int cc) {
    switch (isa) {
        case ArchIsa::None: return true;
        case ArchIsa::WgmmaSm90a: return cc == 90;
        case ArchIsa::Tcgen05Sm100a: return cc == 100 || cc == 103;
        case ArchIsa::Fp4MmaSm120a: return cc == 120 || cc == 121;
    }
    return false;
}

int64_t round_up(int64_t v, int64_t to) { return (v + to - 1) / to * to; }

std::string cc_text(int cc) { return fmt::format("{}.{}", cc / 10, cc % 10); }

}  // namespace

BuildTargets BuildTargets::parse(std::string_view list) {
    BuildTargets b;
    size_t start = 0;
    while (start <= list.size()) {
        size_t end = list.find_first_of(";,", start);
        if (end == std::string_view::npos) end = list.size();
        const std::string_view item = list.substr(start, end - start);
        if (!item.empty()) {
            parse_target(item);  // validates
            b.archs.emplace_back(item);
        }
        start = end + 1;
    }
    return b;
}

BuildTargets BuildTargets::configured() { return parse(NIBBLE_CUDA_ARCHS_LIST); }

std::optional<std::string> exclusion_reason(const KernelVariant& v, const DeviceProfile& d, const BuildTargets& build) {
    const VariantNeeds& n = v.needs;
    const int cc = d.cc();
    if (cc < n.min_cc) return fmt::format("needs compute capability {}, the device has {}", cc_text(n.min_cc), cc_text(cc));
    if (!isa_available(n.isa, cc))
        return fmt::format("uses {} instructions, which compute capability {} lacks", isa_name(n.isa), cc_text(cc));
    bool code = false, arch_code = false;
    for (const std::string& a : build.archs) {
        const Target t = parse_target(a);
        if (!runs_on(t, cc)) continue;
        code = true;
        if (t.suffix != 0) arch_code = true;
    }
    if (!code)
        return fmt::format("this build holds no code for compute capability {} (NIBBLE_CUDA_ARCHS: {})", cc_text(cc),
                           build.archs.empty() ? std::string("none") : fmt::format("{}", fmt::join(build.archs, ";")));
    if (n.isa != ArchIsa::None && !arch_code)
        return fmt::format("uses {} instructions, but this build has no sm_{}a or sm_{}f target", isa_name(n.isa), cc,
                           cc);
    if (n.threads_per_block > d.max_threads_per_block)
        return fmt::format("needs {} threads per block, the device allows {}", n.threads_per_block,
                           d.max_threads_per_block);
    if (n.threads_per_block > d.max_threads_per_sm)
        return fmt::format("needs {} threads per block, one SM holds {}", n.threads_per_block, d.max_threads_per_sm);
    if (n.static_smem_bytes > d.smem_per_block)
        return fmt::format("needs {} B of static shared memory, the limit without opting in is {} B",
                           n.static_smem_bytes, d.smem_per_block);
    if (n.smem_per_block() > d.smem_per_block_optin)
        return fmt::format("needs {} B of shared memory per block ({} static + {} dynamic), the device allows {} B",
                           n.smem_per_block(), n.static_smem_bytes, n.dynamic_smem_bytes, d.smem_per_block_optin);
    if (d.smem_per_sm > 0 && n.smem_per_block() + d.smem_reserved_per_block > d.smem_per_sm)
        return fmt::format("needs {} B of shared memory per block plus {} B reserved, one SM has {} B",
                           n.smem_per_block(), d.smem_reserved_per_block, d.smem_per_sm);
    if (n.regs_per_thread > d.max_regs_per_thread)
        return fmt::format("needs {} registers per thread, the device allows {}", n.regs_per_thread,
                           d.max_regs_per_thread);
    // Registers are allocated per warp in units of 256 (CUDA occupancy calculator).
    const int64_t warps = (n.threads_per_block + 31) / 32;
    const int64_t block_regs = warps * round_up(static_cast<int64_t>(n.regs_per_thread) * 32, 256);
    if (block_regs > d.regs_per_block)
        return fmt::format("needs {} registers per block ({} per thread x {} threads), the device allows {}",
                           block_regs, n.regs_per_thread, n.threads_per_block, d.regs_per_block);
    if (block_regs > d.regs_per_sm)
        return fmt::format("needs {} registers per block, one SM has {}", block_regs, d.regs_per_sm);
    return std::nullopt;
}

std::vector<VariantVerdict> judge_variants(const OpShape& shape, const DeviceProfile& device, const BuildTargets& build) {
    std::vector<VariantVerdict> out;
    for (const KernelVariant& v : kernel_registry()) {
        if (!variant_applies(v, shape)) continue;
        VariantVerdict verdict{&v, exclusion_reason(v, device, build)};
        if (verdict.excluded)
            log::debug("tune: {} {} excluded on {} ({}): {}", op_name(v.op), v.name, device.key, device.name,
                       *verdict.excluded);
        out.push_back(std::move(verdict));
    }
    return out;
}

std::vector<const KernelVariant*> eligible_variants(const OpShape& shape, const DeviceProfile& device,
                                                    const BuildTargets& build) {
    std::vector<const KernelVariant*> out;
    for (const VariantVerdict& v : judge_variants(shape, device, build))
        if (!v.excluded) out.push_back(v.variant);
    return out;
}

}  // namespace nibble::tune
