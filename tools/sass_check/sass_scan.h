// Scans `cuobjdump -sass` text for kernels that break the programmatic-launch contract of cuda/pdl.cuh: a
// non-coherent global load (LDG ... .CONSTANT, from __ldg or a const __restrict__ pointer) placed before the
// grid-dependency wait (ACQBULK, griddepcontrol.wait). Such a load may read the predecessor's output before
// the predecessor wrote it. Plain C++, tested on the CPU; the device tests run it on their own binary.
#pragma once

#include <string>
#include <string_view>
#include <vector>

namespace nibble::sass {

struct FunctionScan {
    std::string name;                // as cuobjdump prints it (mangled)
    int waits = 0;                   // ACQBULK instructions
    int non_coherent_before_wait = 0;  // LDG ... CONSTANT before the first ACQBULK, in text order
};

// Every function of the listing, in order. Text order approximates issue order: a load in a branch before the
// wait counts even if that branch is not taken, which errs on the side of reporting.
std::vector<FunctionScan> scan_functions(std::string_view sass);

}  // namespace nibble::sass
