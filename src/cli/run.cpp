// `nibble run --model DIR --prompt TEXT [--chat] [--max-tokens N] [--temperature T] [--top-p P]
//  [--top-k K] [--min-p P] [--seed S]`: generates on the CPU backend, streaming text as it is produced.
// Sampling defaults come from the model's generation_config.json, then the flags.
#include <CLI/CLI.hpp>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>

#include "base/error.h"
#include "base/log.h"
#include "base/thread_pool.h"
#include "cli/backend.h"
#include "cli/commands.h"
#include "engine/sampler.h"
#include "model/model.h"
#include "tokenizer/chat_template.h"
#include "tokenizer/tokenizer.h"

namespace nibble::cli {

namespace {

namespace fs = std::filesystem;

struct RunOptions {
    std::string model_dir, prompt, chat_template;
    bool chat = false;
    int64_t max_tokens = 256;
    std::optional<float> temperature, top_p, min_p;
    std::optional<int32_t> top_k;
    std::optional<uint64_t> seed;
    size_t threads = 0;
    bool ignore_eos = false;
    std::string device = "auto";
};

// generation_config.json: sampling defaults and extra end-of-sequence ids.
void apply_generation_config(const fs::path& dir, SamplingParams& params, std::set<int32_t>& eos) {
    const fs::path path = dir / "generation_config.json";
    if (!fs::exists(path)) return;
    std::ifstream in(path);
    nlohmann::json j;
    try {
        j = nlohmann::json::parse(in);
    } catch (const nlohmann::json::exception& e) {
        fail("{}: not valid JSON: {}", path.string(), e.what());
    }
    auto number = [&](const char* key, auto& out) {
        if (!j.contains(key) || j[key].is_null()) return;
        NIBBLE_CHECK(j[key].is_number(), "{}: field {} must be a number", path.string(), key);
        out = j[key].get<std::remove_reference_t<decltype(out)>>();
    };
    if (j.value("do_sample", true) == false) params.temperature = 0.0f;
    else number("temperature", params.temperature);
    number("top_p", params.top_p);
    number("top_k", params.top_k);
    number("min_p", params.min_p);
    if (j.contains("eos_token_id")) {
        const auto& e = j["eos_token_id"];
        if (e.is_number_integer()) eos.insert(e.get<int32_t>());
        else if (e.is_array())
            for (const auto& v : e)
                if (v.is_number_integer()) eos.insert(v.get<int32_t>());
    }
}

// Text may hold NUL bytes (a byte-level token can decode to one): write by size, not as a C string.
void write_text(const std::string& text) {
    std::fwrite(text.data(), 1, text.size(), stdout);
    std::fflush(stdout);
}

void run_generate(const RunOptions& opt) {
    ThreadPool pool(opt.threads);
    auto tok = tokenizer::Tokenizer::load(opt.model_dir);
    auto model = load_model(opt.model_dir, pool);
    const ModelConfig& cfg = model->config();

    SamplingParams params;
    std::set<int32_t> eos(cfg.eos_token_ids.begin(), cfg.eos_token_ids.end());
    if (tok.eos_id()) eos.insert(static_cast<int32_t>(*tok.eos_id()));
    apply_generation_config(opt.model_dir, params, eos);
    if (opt.temperature) params.temperature = *opt.temperature;
    if (opt.top_p) params.top_p = *opt.top_p;
    if (opt.top_k) params.top_k = *opt.top_k;
    if (opt.min_p) params.min_p = *opt.min_p;
    params.seed = opt.seed;
    const std::string invalid = params.validate();
    NIBBLE_CHECK(invalid.empty(), "{}", invalid);

    // Prompt -> ids: through the chat template (which writes its own BOS) or plain with special tokens.
    std::vector<uint32_t> ids;
    if (opt.chat) {
        std::optional<fs::path> override_file;
        if (!opt.chat_template.empty()) override_file = opt.chat_template;
        auto tmpl = load_chat_template(opt.model_dir, false, override_file);
        NIBBLE_CHECK(tmpl.has_value(), "{} has no chat template; pass --chat-template FILE or drop --chat",
                     opt.model_dir);
        ChatInputs inputs;
        inputs.messages.push_back({{"role", "user"}, {"content", opt.prompt}});
        inputs.add_generation_prompt = true;
        inputs.special_tokens = special_tokens_from_config(nlohmann::ordered_json(tok.config()));
        ids = tok.encode(render_chat(*tmpl, inputs), false);
    } else {
        ids = tok.encode(opt.prompt, true);
    }
    NIBBLE_CHECK(!ids.empty(), "the prompt encodes to no tokens");
    std::vector<int32_t> tokens(ids.begin(), ids.end());
    for (int32_t t : tokens)
        NIBBLE_CHECK(t >= 0 && t < cfg.vocab_size, "prompt token {} is outside the model's vocabulary [0, {})", t,
                     cfg.vocab_size);
    const int64_t n_prompt = static_cast<int64_t>(tokens.size());
    NIBBLE_CHECK(opt.max_tokens >= 0, "--max-tokens must be 0 or positive");
    const int64_t max_len = std::min<int64_t>(n_prompt + opt.max_tokens, cfg.max_position_embeddings);
    NIBBLE_CHECK(n_prompt < cfg.max_position_embeddings,
                 "the prompt has {} tokens; the model's context is {} (max_position_embeddings)", n_prompt,
                 cfg.max_position_embeddings);

    constexpr int64_t kBlock = 16;
    const int64_t n_blocks = (max_len + kBlock - 1) / kBlock;
    const bool cuda = use_cuda_backend(opt.device, *model);
    std::unique_ptr<ModelRunner> runner = make_runner(*model, cuda, n_blocks, kBlock, max_len);
    log::info("{} backend", cuda ? "CUDA" : "CPU");
    std::vector<int32_t> table(static_cast<size_t>(n_blocks));
    for (int64_t b = 0; b < n_blocks; ++b) table[static_cast<size_t>(b)] = static_cast<int32_t>(b);

    auto rng = make_sampling_rng(params);
    tokenizer::Detokenizer detok(tok, true);
    std::vector<float> logits;
    using clock = std::chrono::steady_clock;
    const auto t0 = clock::now();
    auto t_first = t0;
    int64_t generated = 0, pos = 0;
    std::vector<int32_t> step = tokens;  // prefill first, then one token at a time
    while (pos + static_cast<int64_t>(step.size()) <= max_len && generated < opt.max_tokens) {
        // The prompt goes in steps of at most kMaxStepTokens; only the last one's logits are sampled.
        for (size_t at = 0; at < step.size(); at += static_cast<size_t>(kMaxStepTokens)) {
            const size_t n = std::min(step.size() - at, static_cast<size_t>(kMaxStepTokens));
            const RunnerSequence seq{.tokens = std::span(step).subspan(at, n),
                                     .block_table = table,
                                     .start_pos = pos,
                                     .needs_logits = at + n == step.size(),
                                     .state_slot = 0};  // a hybrid model's one state slot (make_runner)
            runner->execute(std::span(&seq, 1), logits);
            pos += static_cast<int64_t>(n);
        }
        const int32_t next = sample_token(logits, params, rng);
        if (generated == 0) t_first = clock::now();
        ++generated;
        if (!opt.ignore_eos && eos.count(next)) break;
        write_text(detok.push(static_cast<uint32_t>(next)));
        step.assign(1, next);
        if (pos >= max_len) break;
    }
    write_text(detok.finish() + "\n");
    const auto t1 = clock::now();
    const double prefill_s = std::chrono::duration<double>(t_first - t0).count();
    const double decode_s = std::chrono::duration<double>(t1 - t_first).count();
    log::info("prompt {} tokens in {:.2f} s ({:.1f} tok/s); generated {} tokens, {:.1f} tok/s", n_prompt, prefill_s,
              n_prompt / std::max(prefill_s, 1e-9), generated,
              generated > 1 ? (generated - 1) / std::max(decode_s, 1e-9) : 0.0);
}

}  // namespace

void add_run_command(CLI::App& app) {
    auto opt = std::make_shared<RunOptions>();
    auto* cmd = app.add_subcommand("run", "Generate text from a prompt on the CPU backend, streaming it");
    cmd->add_option("--model", opt->model_dir, "Hugging Face model folder")->required();
    cmd->add_option("--prompt", opt->prompt, "prompt text")->required();
    cmd->add_flag("--chat", opt->chat, "wrap the prompt as a user message in the model's chat template");
    cmd->add_option("--chat-template", opt->chat_template, "Jinja chat template file overriding the model's");
    cmd->add_option("--max-tokens", opt->max_tokens, "tokens to generate at most");
    cmd->add_option("--temperature", opt->temperature, "0: greedy");
    cmd->add_option("--top-p", opt->top_p);
    cmd->add_option("--top-k", opt->top_k);
    cmd->add_option("--min-p", opt->min_p);
    cmd->add_option("--seed", opt->seed, "random seed: the same seed gives the same text");
    cmd->add_flag("--ignore-eos", opt->ignore_eos, "keep generating past end-of-sequence tokens");
    cmd->add_option("--device", opt->device, "auto (CUDA when a GPU is present and runs the model), cuda or cpu");
    cmd->add_option("--threads", opt->threads, "CPU threads (0: all cores)");
    cmd->callback([opt] { run_generate(*opt); });
}

}  // namespace nibble::cli
