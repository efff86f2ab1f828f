// `nibble logits`: the float32 logits of every position of a token sequence, from the CPU reference
// forward, written as one safetensors tensor `logits` [n_tokens, vocab_size]. The golden tests compare
// it with Hugging Face transformers.
#include <CLI/CLI.hpp>

#include <charconv>
#include <string>
#include <vector>

#include "base/error.h"
#include "base/log.h"
#include "base/thread_pool.h"
#include "checkpoint/safetensors.h"
#include "cli/commands.h"
#include "engine/memory_plan.h"
#include "model/model.h"

namespace nibble::cli {

namespace {

struct LogitsOptions {
    std::string model_dir;
    std::string tokens;
    std::string out;
    size_t threads = 0;
    int64_t block_size = 16;
    int64_t chunk = 0;  // tokens per forward; 0 = the whole sequence in one prefill
    std::string kv_cache_dtype = "auto";  // auto: the checkpoint's KV scheme, else f32 (exact)
    std::string mamba_ssm_cache_dtype = "float32";  // hybrid models' SSM state between forwards
};

std::vector<int32_t> parse_token_list(const std::string& text) {
    std::vector<int32_t> ids;
    size_t pos = 0;
    while (pos <= text.size()) {
        size_t comma = text.find(',', pos);
        if (comma == std::string::npos) comma = text.size();
        const std::string item = text.substr(pos, comma - pos);
        int32_t id = 0;
        auto [end, ec] = std::from_chars(item.data(), item.data() + item.size(), id);
        NIBBLE_CHECK(!item.empty() && ec == std::errc() && end == item.data() + item.size(),
                     "--tokens: item {} ('{}') is not a 32-bit integer", ids.size(), item);
        ids.push_back(id);
        pos = comma + 1;
    }
    return ids;
}

void run_logits(const LogitsOptions& opt) {
    const std::vector<int32_t> tokens = parse_token_list(opt.tokens);
    NIBBLE_CHECK(opt.block_size > 0, "--block-size must be positive");
    NIBBLE_CHECK(opt.chunk >= 0, "--chunk must be 0 or positive");
    ThreadPool pool(opt.threads);
    auto model = load_model(opt.model_dir, pool);
    const int64_t vocab = model->config().vocab_size;
    const int64_t n = static_cast<int64_t>(tokens.size());
    for (int64_t i = 0; i < n; ++i)
        NIBBLE_CHECK(tokens[static_cast<size_t>(i)] >= 0 && tokens[static_cast<size_t>(i)] < vocab,
                     "--tokens: item {} ({}) is outside the vocabulary [0, {})", i, tokens[static_cast<size_t>(i)],
                     vocab);

    // One sequence owning blocks 0 .. n_blocks-1 of a cache just large enough for it.
    const int64_t n_blocks = (n + opt.block_size - 1) / opt.block_size;
    const KvDtype kv_dtype = resolve_kv_cache_dtype(opt.kv_cache_dtype, model->quant_config(), KvDtype::F32);
    KvCache cache(model->kv_cache_shape(n_blocks, opt.block_size, kv_dtype));
    std::vector<int32_t> block_table(static_cast<size_t>(n_blocks));
    for (int64_t b = 0; b < n_blocks; ++b) block_table[static_cast<size_t>(b)] = static_cast<int32_t>(b);

    // Hybrid models (Mamba layers) carry the sequence's conv/SSM state from one chunk to the next.
    MambaState state(model->mamba_state_shape(parse_ssm_state_dtype(opt.mamba_ssm_cache_dtype)));

    const int64_t chunk = opt.chunk == 0 ? n : opt.chunk;
    std::vector<float> all(static_cast<size_t>(n * vocab)), step;
    for (int64_t start = 0; start < n; start += chunk) {
        const int64_t len = std::min(chunk, n - start);
        ForwardSequence seq{.tokens = std::span<const int32_t>(tokens).subspan(static_cast<size_t>(start),
                                                                                static_cast<size_t>(len)),
                            .kv = {.block_table = block_table.data(), .n_table = n_blocks, .start_pos = start},
                            .all_logits = true,
                            .state = state.shape().empty() ? nullptr : &state};
        model->forward(std::span(&seq, 1), cache, step);
        std::copy(step.begin(), step.end(), all.begin() + start * vocab);
    }

    SafetensorsWriter writer(opt.out);
    writer.set_metadata("model", opt.model_dir);
    writer.declare("logits", DType::F32, Shape{n, vocab});
    writer.write("logits", all.data(), all.size() * sizeof(float));
    writer.finish();
    log::info("wrote logits [{}, {}] to {}", n, vocab, opt.out);
}

}  // namespace

void add_logits_command(CLI::App& app) {
    auto opt = std::make_shared<LogitsOptions>();
    auto* cmd = app.add_subcommand("logits", "Write the float32 logits of every position of a token sequence");
    cmd->add_option("--model", opt->model_dir, "Hugging Face model folder")->required();
    cmd->add_option("--tokens", opt->tokens, "comma-separated token ids, e.g. 1,2,3")->required();
    cmd->add_option("--out", opt->out, "output .safetensors file (tensor 'logits' [n_tokens, vocab])")->required();
    cmd->add_option("--threads", opt->threads, "CPU threads (0: all cores)");
    cmd->add_option("--block-size", opt->block_size, "KV cache block size in tokens");
    cmd->add_option("--chunk", opt->chunk, "tokens per forward step (0: all at once); exercises the KV cache");
    cmd->add_option("--kv-cache-dtype", opt->kv_cache_dtype,
                    "KV cache format: auto (the checkpoint's KV scheme, else f32), f32, bf16, fp8, nvfp4");
    cmd->add_option("--mamba-ssm-cache-dtype", opt->mamba_ssm_cache_dtype,
                    "hybrid models' SSM state between chunks: float32 (default) or bfloat16");
    cmd->callback([opt] { run_logits(*opt); });
}

}  // namespace nibble::cli
