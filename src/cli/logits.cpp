#include <CLI/CLI.hpp>

#include "base/error.h"
#include "cli/commands.h"

namespace nibble::cli {

void add_logits_command(CLI::App& app) {
    auto* cmd = app.add_subcommand("logits", "Write the float32 logits of every position of a token sequence");
    (void)cmd;
}

}  // namespace nibble::cli
