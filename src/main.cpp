// nibble: load, quantize, run and serve LLM checkpoints. Errors end here as one line and exit code 1.
#include <CLI/CLI.hpp>

#include <cstdio>
#include <cstring>
#include <exception>

#include "base/error.h"
#include "base/log.h"

#include <spdlog/sinks/stdout_color_sinks.h>
#include "cli/commands.h"

int main(int argc, char** argv) {
    CLI::App app{"nibble: an LLM inference server built around NVFP4"};
    app.require_subcommand(1);
    std::string log_level = "info";
    app.add_option("--log-level", log_level, "trace, debug, info, warn, error")
        ->check(CLI::IsMember({"trace", "debug", "info", "warn", "error"}));
    app.parse_complete_callback([&] { spdlog::set_level(spdlog::level::from_str(log_level)); });
    // Logs go to stderr so that stdout carries only a command's output.
    spdlog::set_default_logger(spdlog::stderr_color_mt("nibble"));
    spdlog::set_pattern("[%H:%M:%S.%e] [%^%l%$] %v");
    nibble::cli::add_logits_command(app);
    nibble::cli::add_quantize_command(app);
    nibble::cli::add_tokenize_command(app);
    nibble::cli::add_serve_command(app);
    nibble::cli::add_plan_command(app);
    nibble::cli::add_run_command(app);
    nibble::cli::add_tune_command(app);
    nibble::cli::add_bench_command(app);
    // vLLM's -tp is a two-letter short flag, which CLI11 cannot declare: spell it out before parsing.
    char tp_long[] = "--tensor-parallel-size";
    for (int i = 1; i < argc; ++i)
        if (std::strcmp(argv[i], "-tp") == 0) argv[i] = tp_long;
    try {
        app.parse(argc, argv);
    } catch (const CLI::ParseError& e) {
        return app.exit(e);
    } catch (const nibble::Error& e) {
        std::fprintf(stderr, "error: %s\n", e.what());
        return 1;
    } catch (const std::exception& e) {
        std::fprintf(stderr, "error: %s\n", e.what());
        return 1;
    }
    return 0;
}
