#include "cli/plan_roofline.h"

#include <fmt/format.h>

#include <cstdio>

namespace nibble::cli {

namespace {

std::string bytes_text(double b) {
    const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
    int u = 0;
    while (b >= 1024.0 && u < 4) {
        b /= 1024.0;
        ++u;
    }
    return u == 0 ? fmt::format("{:.0f} B", b) : fmt::format("{:.2f} {}", b, units[u]);
}

std::string rate_text(double flops) { return flops > 0 ? fmt::format("{:.1f} TFLOP/s", flops / 1e12) : "none"; }

}  // namespace

void print_roofline(const tune::Roofline& r, const tune::DeviceProfile& d, const tune::RooflineOptions& o) {
    std::printf("\n%s\n", fmt::format("roofline on {} [{}]: {:.0f} GB/s, FP4 {}, BF16 {} (upper bounds, not predictions)",
                                      d.name, d.key, d.memory_bandwidth / 1e9, rate_text(d.fp4_flops),
                                      rate_text(d.bf16_flops))
                              .c_str());
    std::printf("%s\n", fmt::format("{:<17} {:>12}  {} read per token at {} tokens of context", "decode, batch 1",
                                    fmt::format("{:.1f} tok/s", r.decode_tokens_per_s),
                                    bytes_text(static_cast<double>(r.decode_bytes_total)), o.context_depth)
                            .c_str());
    for (const tune::ByteShare& s : r.decode_bytes)
        std::printf("%s\n", fmt::format("  {:<31} {:>12}  {:5.1f}%", s.what, bytes_text(static_cast<double>(s.bytes)),
                                        100.0 * static_cast<double>(s.bytes) / static_cast<double>(r.decode_bytes_total))
                                .c_str());
    std::printf("%s\n", fmt::format("{:<17} {:>12}  {:.2f} GFLOP per token (FP4 {:.2f}, BF16 {:.2f}; chunks of {}){}",
                                    "prefill", fmt::format("{:.0f} tok/s", r.prefill_tokens_per_s),
                                    (r.prefill_fp4_flops + r.prefill_bf16_flops) / 1e9, r.prefill_fp4_flops / 1e9,
                                    r.prefill_bf16_flops / 1e9, o.prefill_tokens,
                                    r.fp4_on_bf16 ? "; no FP4 tensor cores: NVFP4 at the BF16 rate" : "")
                            .c_str());
}

nlohmann::json roofline_json(const tune::Roofline& r, const tune::DeviceProfile& d, const tune::RooflineOptions& o) {
    nlohmann::json shares = nlohmann::json::object();
    for (const tune::ByteShare& s : r.decode_bytes) shares[s.what] = s.bytes;
    return {{"device_profile", d.key},
            {"memory_bandwidth", d.memory_bandwidth},
            {"fp4_flops", d.fp4_flops},
            {"bf16_flops", d.bf16_flops},
            {"context_depth", o.context_depth},
            {"decode_bytes_per_token", r.decode_bytes_total},
            {"decode_tokens_per_s", r.decode_tokens_per_s},
            {"decode_bytes", shares},
            {"prefill_tokens", o.prefill_tokens},
            {"prefill_fp4_flops_per_token", r.prefill_fp4_flops},
            {"prefill_bf16_flops_per_token", r.prefill_bf16_flops},
            {"prefill_tokens_per_s", r.prefill_tokens_per_s},
            {"fp4_on_bf16", r.fp4_on_bf16}};
}

}  // namespace nibble::cli
