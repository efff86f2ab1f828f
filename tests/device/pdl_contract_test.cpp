// The programmatic-launch contract of cuda/pdl.cuh, checked on the machine code of this very binary: no kernel
// that waits on its grid dependency (griddepcontrol.wait, SASS ACQBULK) issues a non-coherent global load
// before that wait. ptxas may hoist such loads (it did in gemv_nvfp4_pipe_kernel, which then read the previous
// layer's activations whenever it was launched programmatically); nothing at the source level prevents it, so
// the check reads what ptxas produced. Needs cuobjdump (the CUDA toolkit's; on PATH or /usr/local/cuda/bin).
#include <cxxabi.h>
#include <gtest/gtest.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <memory>
#include <string>

#include "sass_check/sass_scan.h"

namespace nibble {
namespace {

std::string demangled(const std::string& name) {
    int status = 0;
    std::unique_ptr<char, void (*)(void*)> d(abi::__cxa_demangle(name.c_str(), nullptr, nullptr, &status), std::free);
    return status == 0 && d ? std::string(d.get()) : name;
}

std::string cuobjdump_path() {
    if (std::system("command -v cuobjdump > /dev/null 2>&1") == 0) return "cuobjdump";
    for (const char* p : {"/usr/local/cuda/bin/cuobjdump"})
        if (std::filesystem::exists(p)) return p;
    return {};
}

TEST(PdlContract, NoNonCoherentLoadAboveGridDependencyWait) {
    const std::string tool = cuobjdump_path();
    if (tool.empty()) GTEST_SKIP() << "cuobjdump not found (CUDA toolkit): the SASS of this binary cannot be read";
    const std::string self = std::filesystem::read_symlink("/proc/self/exe").string();
    std::unique_ptr<FILE, int (*)(FILE*)> pipe(popen((tool + " -sass '" + self + "' 2>&1").c_str(), "r"), pclose);
    ASSERT_TRUE(pipe) << "could not run " << tool;
    std::string listing;
    char buf[1 << 16];
    for (size_t n; (n = std::fread(buf, 1, sizeof buf, pipe.get())) > 0;) listing.append(buf, n);
    const std::vector<sass::FunctionScan> fns = sass::scan_functions(listing);
    int waiting = 0, bad = 0;
    for (const sass::FunctionScan& f : fns) {
        if (f.waits == 0) continue;
        ++waiting;
        if (f.non_coherent_before_wait > 0) {
            ++bad;
            ADD_FAILURE() << demangled(f.name) << ": " << f.non_coherent_before_wait
                          << " non-coherent load(s) (LDG ... CONSTANT) before its griddepcontrol.wait";
        }
    }
    // Every forward kernel waits (cuda/pdl.cuh); far fewer means the listing was not read.
    EXPECT_GE(waiting, 100) << "kernels with a grid-dependency wait in " << self << " (" << fns.size()
                            << " functions read)";
    std::printf("[  detail  ] %zu functions, %d with a grid-dependency wait, %d loading non-coherently before it\n",
                fns.size(), waiting, bad);
}

}  // namespace
}  // namespace nibble
