#include <CLI/CLI.hpp>

#include "base/error.h"
#include "cli/commands.h"

namespace nibble::cli {

void add_quantize_command(CLI::App& app) {
    auto* cmd = app.add_subcommand("quantize", "Quantize a BF16/FP16/FP32 checkpoint to NVFP4");
    (void)cmd;
}

}  // namespace nibble::cli
