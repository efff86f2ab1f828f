// The registry's resource figures against what ptxas reports for the kernels it names
// (tests/tune/ptxas_resources.txt, written by scripts/ptxas_resources.py from `nvcc -Xptxas -v` for sm_90a
// and sm_120a): every entry claims at least as many registers and as much static shared memory as the largest
// of the kernels it names (an entry naming a kernel's k-split instantiations too, "1 or 4", claims theirs).
// So eligibility, which trusts these figures, never admits a variant the device cannot hold. Entries whose
// kernels the file does not list yet are reported, not failed.
#include <gtest/gtest.h>

#include <cstdio>
#include <fstream>
#include <map>
#include <regex>
#include <sstream>
#include <string>
#include <vector>

#include "tune/registry.h"

namespace nibble::tune {
namespace {

struct Resource {
    std::string arch, kernel;
    int regs = 0;
    int64_t static_smem = 0;
};

std::vector<Resource> load_resources() {
    std::ifstream in(std::string(NIBBLE_SOURCE_DIR) + "/tests/tune/ptxas_resources.txt");
    std::vector<Resource> out;
    std::string line;
    while (std::getline(in, line)) {
        std::istringstream s(line);
        Resource r;
        if (s >> r.arch >> r.kernel >> r.regs >> r.static_smem) out.push_back(r);
    }
    return out;
}

// The registry's kernel field as a pattern over ptxas names: spaces dropped, XT standing for either
// activation type, "A or B" for either number, anything after " + " (a library call such as cuBLASLt) not a
// kernel of ours.
std::regex kernel_pattern(std::string_view kernel) {
    std::string k(kernel.substr(0, kernel.find(" + ")));
    std::string out;
    for (char c : k) {
        if (c == ' ') continue;
        if (std::string("<>(),.*+?[]{}|^$\\").find(c) != std::string::npos) out += '\\';
        out += c;
    }
    out = std::regex_replace(out, std::regex("XT"), "(float|__nv_bfloat16)");
    out = std::regex_replace(out, std::regex("(\\d+)or(\\d+)"), "($1|$2)");  // "1 or 4": either value
    return std::regex(out);
}

TEST(RegistryPtxas, FiguresCoverTheCompiledKernels) {
    const std::vector<Resource> resources = load_resources();
    ASSERT_FALSE(resources.empty()) << "tests/tune/ptxas_resources.txt is missing or empty";
    int unchecked = 0;
    for (const KernelVariant& v : kernel_registry()) {
        SCOPED_TRACE(std::string(op_name(v.op)) + " " + std::string(v.name) + " (" + std::string(v.kernel) + ")");
        const std::regex pattern = kernel_pattern(v.kernel);
        std::map<std::string, int> matches;
        for (const Resource& r : resources) {
            if (!std::regex_match(r.kernel, pattern)) continue;
            ++matches[r.arch];
            EXPECT_GE(v.needs.regs_per_thread, r.regs) << r.arch << " " << r.kernel;
            EXPECT_GE(v.needs.static_smem_bytes, r.static_smem) << r.arch << " " << r.kernel;
        }
        // A kernel registered after the file was last written is not checked (yet): say so, don't fail, so
        // that a new kernel's commit is not blocked on regenerating the file (`--check` in CI catches it).
        if (matches["sm_90a"] == 0 || matches["sm_120a"] == 0) {
            std::printf("[ note ] %s %s: %s is not in tests/tune/ptxas_resources.txt for both sm_90a and sm_120a; "
                        "regenerate it with scripts/ptxas_resources.py\n",
                        std::string(op_name(v.op)).c_str(), std::string(v.name).c_str(), std::string(v.kernel).c_str());
            ++unchecked;
        }
    }
    // Most of the registry must be covered, or the file is stale altogether.
    EXPECT_LE(unchecked * 4, static_cast<int>(kernel_registry().size())) << unchecked << " variants unchecked";
}

}  // namespace
}  // namespace nibble::tune
