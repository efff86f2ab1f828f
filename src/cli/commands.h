// One function per subcommand, each in its own file under cli/; main() registers them all.
#pragma once

namespace CLI {
class App;
}

namespace nibble::cli {

void add_logits_command(CLI::App& app);
void add_quantize_command(CLI::App& app);
void add_tokenize_command(CLI::App& app);
void add_serve_command(CLI::App& app);
void add_plan_command(CLI::App& app);
void add_run_command(CLI::App& app);
void add_tune_command(CLI::App& app);
void add_bench_command(CLI::App& app);

}  // namespace nibble::cli
