#include <cstdlib>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "cuda/pdl.cuh"

namespace nibble::cuda {
namespace {

std::vector<std::string> split_commas(const char* s) {
    std::vector<std::string> out;
    if (s == nullptr) return out;
    std::string cur;
    for (const char* p = s;; ++p) {
        if (*p == ',' || *p == '\0') {
            if (!cur.empty()) out.push_back(cur);
            cur.clear();
            if (*p == '\0') break;
        } else {
            cur.push_back(*p);
        }
    }
    return out;
}

bool contains_any(const std::string& name, const std::vector<std::string>& parts) {
    for (const std::string& p : parts)
        if (name.find(p) != std::string::npos) return true;
    return false;
}

// The environment's selection, read once; immutable afterwards.
struct Selection {
    std::vector<std::string> only = split_commas(std::getenv("NIBBLE_PDL_ONLY"));
    std::vector<std::string> skip = split_commas(std::getenv("NIBBLE_PDL_SKIP"));
};

}  // namespace

bool programmatic_launch_selected(const void* kernel) {
    static const Selection sel;
    if (sel.only.empty() && sel.skip.empty()) return true;
    // Kernel names are looked up once per kernel and thread (launches of a step are thousands a second).
    thread_local std::unordered_map<const void*, bool> decided;
    const auto it = decided.find(kernel);
    if (it != decided.end()) return it->second;
    const char* raw = nullptr;
    std::string name = cudaFuncGetName(&raw, kernel) == cudaSuccess && raw != nullptr ? raw : "";
    const bool on = (sel.only.empty() || contains_any(name, sel.only)) && !contains_any(name, sel.skip);
    decided.emplace(kernel, on);
    return on;
}

}  // namespace nibble::cuda
