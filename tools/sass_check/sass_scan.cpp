#include "sass_check/sass_scan.h"

namespace nibble::sass {
namespace {

// The opcode field of an instruction line ("/*0e20*/  @!P4 LDG.E.128.CONSTANT R164, ..."): the first word after
// the address comment and an optional predicate.
std::string_view opcode_of(std::string_view line) {
    const size_t addr_end = line.find("*/");
    if (addr_end == std::string_view::npos || line.find("/*") > addr_end) return {};
    std::string_view rest = line.substr(addr_end + 2);
    auto skip_spaces = [&] {
        while (!rest.empty() && (rest.front() == ' ' || rest.front() == '\t')) rest.remove_prefix(1);
    };
    auto take_word = [&] {
        size_t n = 0;
        while (n < rest.size() && rest[n] != ' ' && rest[n] != '\t' && rest[n] != ';') ++n;
        std::string_view w = rest.substr(0, n);
        rest.remove_prefix(n);
        return w;
    };
    skip_spaces();
    std::string_view word = take_word();
    if (word.starts_with("@")) {
        skip_spaces();
        word = take_word();
    }
    return word;
}

}  // namespace

std::vector<FunctionScan> scan_functions(std::string_view sass) {
    std::vector<FunctionScan> out;
    constexpr std::string_view kFunction = "Function : ";
    while (!sass.empty()) {
        const size_t eol = sass.find('\n');
        const std::string_view line = sass.substr(0, eol);
        sass.remove_prefix(eol == std::string_view::npos ? sass.size() : eol + 1);
        if (const size_t f = line.find(kFunction); f != std::string_view::npos) {
            std::string_view name = line.substr(f + kFunction.size());
            while (!name.empty() && (name.back() == ' ' || name.back() == '\r')) name.remove_suffix(1);
            out.push_back({.name = std::string(name)});
            continue;
        }
        if (out.empty()) continue;
        const std::string_view op = opcode_of(line);
        if (op.empty()) continue;
        FunctionScan& fn = out.back();
        if (op == "ACQBULK") {
            ++fn.waits;
        } else if (fn.waits == 0 && op.starts_with("LDG") && op.find(".CONSTANT") != std::string_view::npos) {
            ++fn.non_coherent_before_wait;
        }
    }
    return out;
}

}  // namespace nibble::sass
