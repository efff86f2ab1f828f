// The roofline section of `nibble plan --device-profile NAME` (tune/roofline.h computes it): printed under
// the memory table, or as the "roofline" object of --json.
#pragma once

#include <cstdint>
#include <nlohmann/json.hpp>

#include "tune/device_profile.h"
#include "tune/roofline.h"

namespace nibble::cli {

void print_roofline(const tune::Roofline& r, const tune::DeviceProfile& device, const tune::RooflineOptions& options);

// {"device_profile", "memory_bandwidth", "fp4_flops", "bf16_flops", "context_depth", "decode_bytes_per_token",
//  "decode_tokens_per_s", "decode_bytes" {share: bytes}, "prefill_tokens", "prefill_fp4_flops_per_token",
//  "prefill_bf16_flops_per_token", "prefill_tokens_per_s", "fp4_on_bf16"}
nlohmann::json roofline_json(const tune::Roofline& r, const tune::DeviceProfile& device,
                             const tune::RooflineOptions& options);

}  // namespace nibble::cli
