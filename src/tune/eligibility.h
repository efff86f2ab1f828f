// Which registered variants can launch on a device, decided before anything is launched. A variant is
// excluded when the build has no machine code for the device, its compute capability or architecture-
// specific instructions are missing, or one block needs more threads, shared memory or registers than the
// device gives a block (or than one SM holds: such a block could never become resident). Every exclusion
// is one debug log line naming the variant and the reason.
#pragma once

#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "tune/device_profile.h"
#include "tune/registry.h"

namespace nibble::tune {

// The CUDA targets the build holds machine code for, as NIBBLE_CUDA_ARCHS spells them ("90a", "121a",
// "120f", "90"). An `a` target runs only on its exact compute capability; an `f` target (family) on the
// same major version at that minor or above; a plain target's PTX is JIT-compiled for any later device,
// but arch-specific instructions (VariantNeeds::isa) need an `a` or `f` target of the device.
struct BuildTargets {
    std::vector<std::string> archs;
    // The targets this build was configured with (CMake's NIBBLE_CUDA_ARCHS, also in CPU-only builds,
    // where they say what the CUDA build of the same configuration would hold).
    static BuildTargets configured();
    // "90a;100a;121a" (or comma-separated) -> {"90a", "100a", "121a"}; a malformed entry is a nibble::Error.
    static BuildTargets parse(std::string_view list);
};

// Why `v` cannot run on `device` with `build`, or nothing when it fits.
std::optional<std::string> exclusion_reason(const KernelVariant& v, const DeviceProfile& device,
                                            const BuildTargets& build);

struct VariantVerdict {
    const KernelVariant* variant = nullptr;
    std::optional<std::string> excluded;  // the reason, or nothing when eligible
};

// Every variant of shape.op that serves `shape`, with its verdict, in registry order. Each exclusion is
// logged at debug level.
std::vector<VariantVerdict> judge_variants(const OpShape& shape, const DeviceProfile& device, const BuildTargets& build);

// The eligible ones of judge_variants, in registry order.
std::vector<const KernelVariant*> eligible_variants(const OpShape& shape, const DeviceProfile& device,
                                                    const BuildTargets& build);

}  // namespace nibble::tune
