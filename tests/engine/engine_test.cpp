// Engine end to end on the golden fixture models (tests/golden/fixtures/*/model: tiny random-weight
// checkpoints made by transformers). References nobody here wrote or that take an independent path:
//  - greedy tokens from recomputing the whole sequence with Model::forward each step (no paging, no
//    batching, no prefix cache), compared with the engine alone, among 16 concurrent requests, without
//    prefix caching and with a pool small enough to force preemption;
//  - logprobs against log_softmax of transformers' logits (expected.safetensors), tolerance as in
//    tests/golden/golden_test.cpp: max(8 * fp64_gap, 1e-5 * max(1, max|logit|)), doubled for log-softmax
//    (the log-normaliser adds at most one more logit error);
//  - cached_prompt_tokens by vLLM's rule: full blocks of 16 found, leaving at least one token to compute.
// The invariant checker runs after every step.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <condition_variable>
#include <cstring>
#include <filesystem>
#include <map>
#include <mutex>
#include <thread>
#include <vector>

#include <fmt/format.h>

#include "base/error.h"
#include "base/thread_pool.h"
#include "checkpoint/safetensors.h"
#include "engine/engine.h"
#include "engine/model_runner.h"
#include "model/model.h"

namespace nibble {
namespace {

namespace fs = std::filesystem;

fs::path fixture(const std::string& name) { return fs::path(NIBBLE_SOURCE_DIR) / "tests/golden/fixtures" / name; }

struct Reference {
    std::vector<int32_t> tokens;
    std::vector<float> logits;  // [n, vocab]
    int64_t vocab = 0;
    double tol = 0;
};

Reference load_reference(const std::string& name) {
    SafetensorsFile f((fixture(name) / "expected.safetensors").string());
    const TensorInfo* t = f.find("tokens");
    const TensorInfo* l = f.find("logits");
    EXPECT_TRUE(t && l);
    Reference r;
    if (!t || !l) return r;
    r.tokens.resize(static_cast<size_t>(t->shape.numel()));
    std::memcpy(r.tokens.data(), t->data, r.tokens.size() * 4);
    r.logits.resize(static_cast<size_t>(l->shape.numel()));
    std::memcpy(r.logits.data(), l->data, r.logits.size() * 4);
    r.vocab = l->shape[1];
    const double gap = std::stod(f.metadata().at("fp64_gap"));
    const double max_abs = std::stod(f.metadata().at("max_abs_logit"));
    r.tol = std::max(8.0 * gap, 1e-5 * std::max(1.0, max_abs));
    return r;
}

struct Fixture {
    explicit Fixture(const std::string& name) : pool(2), model(load_model((fixture(name) / "model").string(), pool)) {}
    ThreadPool pool;
    std::unique_ptr<Model> model;
};

// Logits of the last token of `seq`, computed from scratch (a fresh cache, one prefill).
std::vector<float> last_logits(Model& m, const std::vector<int32_t>& seq) {
    const int64_t n = static_cast<int64_t>(seq.size()), blocks = (n + 15) / 16;
    KvCache cache(m.kv_cache_shape(blocks, 16));
    std::vector<int32_t> table(static_cast<size_t>(blocks));
    for (size_t i = 0; i < table.size(); ++i) table[i] = static_cast<int32_t>(i);
    MambaState state(m.mamba_state_shape(SsmStateDtype::F32));  // hybrid models only
    ForwardSequence fs{.tokens = seq,
                       .kv = {.block_table = table.data(), .n_table = blocks, .start_pos = 0},
                       .all_logits = false,
                       .state = state.shape().empty() ? nullptr : &state};
    std::vector<float> logits;
    m.forward(std::span(&fs, 1), cache, logits);
    return logits;
}

std::vector<int32_t> greedy_reference(Model& m, std::vector<int32_t> seq, int64_t max_tokens) {
    std::vector<int32_t> out;
    for (int64_t i = 0; i < max_tokens; ++i) {
        auto l = last_logits(m, seq);
        const int32_t t = static_cast<int32_t>(std::max_element(l.begin(), l.end()) - l.begin());
        out.push_back(t);
        seq.push_back(t);
    }
    return out;
}

// What the sinks received, per request and sample index.
struct Collector {
    std::mutex mutex;
    std::condition_variable cv;
    std::map<std::string, std::map<int, std::vector<int32_t>>> tokens;
    std::map<std::string, std::map<int, std::vector<float>>> logprobs;
    std::map<std::string, std::map<int, std::vector<std::vector<TokenLogprob>>>> top;
    std::map<std::string, std::map<int, FinishReason>> finish;
    std::map<std::string, std::string> error;
    std::map<std::string, int64_t> cached;
    std::map<std::string, bool> finished;

    OutputSink sink() {
        return [this](const RequestOutput& o) {
            std::lock_guard lock(mutex);
            for (const auto& s : o.outputs) {
                auto& t = tokens[o.request_id][s.index];
                t.insert(t.end(), s.tokens.begin(), s.tokens.end());
                auto& l = logprobs[o.request_id][s.index];
                l.insert(l.end(), s.logprobs.begin(), s.logprobs.end());
                auto& tp = top[o.request_id][s.index];
                tp.insert(tp.end(), s.top_logprobs.begin(), s.top_logprobs.end());
                if (s.finish) finish[o.request_id][s.index] = *s.finish;
            }
            if (!o.error.empty()) error[o.request_id] = o.error;
            cached[o.request_id] = o.cached_prompt_tokens;
            finished[o.request_id] = o.finished;
            cv.notify_all();
        };
    }
};

void run_to_end(Engine& engine) {
    int steps = 0;
    while (engine.step()) {
        ASSERT_NO_THROW(engine.check_invariants());
        ASSERT_LT(++steps, 10000);
    }
    EXPECT_NO_THROW(engine.check_invariants());
}

EngineConfig config_for(int64_t num_blocks = 64) {
    return EngineConfig{.max_model_len = 128,
                        .max_num_seqs = 256,
                        .max_num_batched_tokens = 2048,
                        .block_size = 16,
                        .num_blocks = num_blocks,
                        .enable_prefix_caching = true,
                        .kv_cache_dtype = KvDtype::F32,
                        .eos_token_ids = {2}};
}

GenerationRequest greedy(const std::string& id, std::vector<int32_t> prompt, int64_t max_tokens) {
    GenerationRequest r;
    r.id = id;
    r.prompt = std::move(prompt);
    r.sampling.temperature = 0.0f;
    r.max_tokens = max_tokens;
    r.ignore_eos = true;
    return r;
}

// 16 prompts of lengths 5 .. 80: prefixes of one long sequence (they share prefix blocks) and rotations.
std::vector<std::vector<int32_t>> sixteen_prompts(const std::vector<int32_t>& base40, int64_t vocab) {
    std::vector<int32_t> base;
    for (int j = 0; j < 120; ++j) base.push_back(static_cast<int32_t>((base40[static_cast<size_t>(j % 40)] + j / 40) % vocab));
    std::vector<std::vector<int32_t>> prompts;
    for (int i = 0; i < 16; ++i) {
        const size_t len = static_cast<size_t>(5 + 5 * i);
        std::vector<int32_t> p;
        for (size_t j = 0; j < len; ++j) p.push_back(base[(i % 2 == 0 ? j : j + static_cast<size_t>(i)) % base.size()]);
        prompts.push_back(p);
    }
    return prompts;
}

// The longest of sixteen_prompts (80 tokens).
std::vector<int32_t> base_of(const std::vector<std::vector<int32_t>>& prompts) {
    return *std::max_element(prompts.begin(), prompts.end(),
                             [](const auto& x, const auto& y) { return x.size() < y.size(); });
}

TEST(Engine, GreedyIsTheSameAloneConcurrentUncachedAndPreempted) {
    Fixture fx("llama_gqa");
    const Reference ref = load_reference("llama_gqa");
    const auto prompts = sixteen_prompts(ref.tokens, ref.vocab);
    const int64_t max_tokens = 8;

    std::vector<std::vector<int32_t>> expected;
    for (const auto& p : prompts) expected.push_back(greedy_reference(*fx.model, p, max_tokens));

    // Alone: one request at a time, each in a fresh engine.
    for (size_t i = 0; i < prompts.size(); ++i) {
        Engine engine(*fx.model, config_for());
        Collector c;
        engine.submit(greedy("r", prompts[i], max_tokens), c.sink());
        run_to_end(engine);
        EXPECT_EQ(c.tokens["r"][0], expected[i]) << "alone, prompt " << i;
        EXPECT_EQ(c.finish["r"][0], FinishReason::Length);
    }

    struct Variant {
        const char* name;
        EngineConfig config;
    };
    EngineConfig batched = config_for();
    batched.max_num_batched_tokens = 64;  // chunked prefills beside decodes
    batched.max_num_seqs = 8;
    EngineConfig uncached = batched;
    uncached.enable_prefix_caching = false;
    EngineConfig tiny = batched;
    tiny.num_blocks = 8;  // the longest request needs 6 blocks: preemption is certain
    for (const Variant& v : {Variant{"concurrent", batched}, Variant{"no prefix caching", uncached},
                             Variant{"tiny pool", tiny}}) {
        Engine engine(*fx.model, v.config);
        Collector c;
        for (size_t i = 0; i < prompts.size(); ++i)
            engine.submit(greedy(fmt::format("r{}", i), prompts[i], max_tokens), c.sink());
        run_to_end(engine);
        for (size_t i = 0; i < prompts.size(); ++i) {
            const std::string id = fmt::format("r{}", i);
            EXPECT_EQ(c.tokens[id][0], expected[i]) << v.name << ", prompt " << i;
            EXPECT_TRUE(c.finished[id]);
        }
        const EngineStats st = engine.stats();
        EXPECT_EQ(st.num_running, 0);
        EXPECT_EQ(st.num_waiting, 0);
        EXPECT_EQ(st.kv_blocks_used, 0) << v.name;
        EXPECT_EQ(st.generation_tokens_total, 16 * max_tokens);
        if (v.config.num_blocks == 8) {
            EXPECT_GT(st.num_preemptions, 0);
        }
        if (v.config.enable_prefix_caching && v.config.num_blocks > 8) {
            EXPECT_GT(st.prefix_cache_hits, 0);
        }
        if (!v.config.enable_prefix_caching) {
            EXPECT_EQ(st.prefix_cache_hits, 0);
        }
    }
}

// Quantized KV caches (the CPU reference of what the CUDA kernels store): greedy output is the same for a
// request alone and among 16 concurrent ones with chunked prefill (every token's K/V is quantized once, the
// same way, whatever the batch), and the cache dtype really is in effect (logprobs differ from float32's).
TEST(Engine, QuantizedKvCacheIsConsistentAcrossBatching) {
    Fixture fx("llama_gqa");
    const Reference ref = load_reference("llama_gqa");
    const auto prompts = sixteen_prompts(ref.tokens, ref.vocab);
    const int64_t max_tokens = 6;
    auto first_logprob = [&](KvDtype dtype) {
        EngineConfig cfg = config_for();
        cfg.kv_cache_dtype = dtype;
        Engine engine(*fx.model, cfg);
        Collector c;
        GenerationRequest r = greedy("r", prompts[15], 1);
        r.top_logprobs = 0;
        engine.submit(r, c.sink());
        run_to_end(engine);
        return c.logprobs["r"][0].at(0);
    };
    const float f32 = first_logprob(KvDtype::F32);
    for (KvDtype dtype : {KvDtype::Bf16, KvDtype::Fp8, KvDtype::Nvfp4}) {
        EXPECT_NE(first_logprob(dtype), f32) << kv_dtype_name(dtype);
        EngineConfig alone_cfg = config_for();
        alone_cfg.kv_cache_dtype = dtype;
        std::vector<std::vector<int32_t>> alone;
        for (const auto& p : prompts) {
            Engine engine(*fx.model, alone_cfg);
            Collector c;
            engine.submit(greedy("r", p, max_tokens), c.sink());
            run_to_end(engine);
            alone.push_back(c.tokens["r"][0]);
        }
        EngineConfig batched = alone_cfg;
        batched.max_num_batched_tokens = 64;
        batched.max_num_seqs = 8;
        Engine engine(*fx.model, batched);
        Collector c;
        for (size_t i = 0; i < prompts.size(); ++i)
            engine.submit(greedy(fmt::format("r{}", i), prompts[i], max_tokens), c.sink());
        run_to_end(engine);
        for (size_t i = 0; i < prompts.size(); ++i)
            EXPECT_EQ(c.tokens[fmt::format("r{}", i)][0], alone[i]) << kv_dtype_name(dtype) << ", prompt " << i;
    }
}

// A hybrid model (Mamba2 + attention + MoE): each running sequence holds a recurrent-state slot, and greedy
// output is the same alone, batched with chunked prefill, and with a pool so small that sequences are
// preempted and recompute, with prefix caching (resuming from state snapshots) off and on. The reference
// is a fresh one-prefill forward per step; its first token is also checked against transformers' logits.
TEST(Engine, HybridGreedyIsTheSameAloneConcurrentAndPreempted) {
    for (const char* name : {"nemotron_h", "nemotron_h_nvfp4_modelopt"}) {
        Fixture fx(name);
        const Reference ref = load_reference(name);
        const auto prompts = sixteen_prompts(ref.tokens, ref.vocab);
        const int64_t max_tokens = 6;
        std::vector<std::vector<int32_t>> expected;
        for (const auto& p : prompts) expected.push_back(greedy_reference(*fx.model, p, max_tokens));
        // The whole fixture sequence as a prompt: the first greedy token is transformers' argmax.
        const std::vector<int32_t> whole = greedy_reference(*fx.model, ref.tokens, 1);
        const float* last = ref.logits.data() + (ref.tokens.size() - 1) * static_cast<size_t>(ref.vocab);
        EXPECT_EQ(whole[0], std::max_element(last, last + ref.vocab) - last) << name;

        EngineConfig batched = config_for();
        batched.max_num_batched_tokens = 24;  // chunked prefills continue from the carried state
        batched.max_num_seqs = 6;
        EngineConfig tiny = batched;
        tiny.num_blocks = 6;  // preemption is certain
        EngineConfig bf16_state = batched;
        bf16_state.mamba_ssm_cache_dtype = SsmStateDtype::Bf16;
        bf16_state.enable_prefix_caching = false;
        EngineConfig uncached = batched, tiny_uncached = tiny;
        uncached.enable_prefix_caching = tiny_uncached.enable_prefix_caching = false;
        EngineConfig cached_small_interval = batched;
        cached_small_interval.mamba_snapshot_interval = 32;
        for (const auto& [label, cfg] :
             {std::pair{"concurrent", batched}, std::pair{"tiny pool", tiny}, std::pair{"uncached", uncached},
              std::pair{"tiny pool, uncached", tiny_uncached}, std::pair{"snapshot every 32", cached_small_interval}}) {
            Collector c;
            Engine engine(*fx.model, cfg);
            for (size_t i = 0; i < prompts.size(); ++i)
                engine.submit(greedy(fmt::format("r{}", i), prompts[i], max_tokens), c.sink());
            run_to_end(engine);
            for (size_t i = 0; i < prompts.size(); ++i)
                EXPECT_EQ(c.tokens[fmt::format("r{}", i)][0], expected[i]) << name << ", " << label << ", prompt " << i;
            const EngineStats st = engine.stats();
            if (!cfg.enable_prefix_caching) {
                EXPECT_EQ(st.prefix_cache_hits, 0) << label;
                EXPECT_EQ(st.state_snapshots_total, 0) << label;
            } else if (cfg.num_blocks > 6) {
                EXPECT_GT(st.prefix_cache_hits, 0) << label;  // the prompts share prefixes
            }
            EXPECT_EQ(st.kv_blocks_used, 0);
            if (cfg.num_blocks == 6) {
                EXPECT_GT(st.num_preemptions, 0);
            }
        }
        // Without prefix caching a repeated prompt is recomputed (no cached tokens), and a bf16 SSM state
        // still runs to the end.
        Collector c;
        Engine engine(*fx.model, bf16_state);
        engine.submit(greedy("a", ref.tokens, 3), c.sink());
        run_to_end(engine);
        engine.submit(greedy("b", ref.tokens, 3), c.sink());
        run_to_end(engine);
        EXPECT_EQ(c.cached["b"], 0);
        EXPECT_EQ(c.tokens["b"][0].size(), 3u);
        EXPECT_EQ(c.tokens["b"][0], c.tokens["a"][0]);
    }
}

// Hybrid prefix caching resumes from the deepest cached block that carries a state snapshot. Prompt A
// (100 tokens) runs first; then prompts sharing its first L tokens (L = 20, 37, 50, 70, 99, 100, none a
// multiple of the 32-token snapshot interval) and diverging after, one at a time. Worked by hand from the
// snapshot points (scheduler.h): A's one prefill chunk is cut at 96 (its prompt point; the interval points
// it crosses are not taken, only a chunk's end has a state), so A leaves a snapshot at 96; each later prompt
// leaves one at its own prompt point or interval point on A's chain (16, 32, 48, 64), so the next finds one
// deeper. Greedy output equals the from-scratch reference for every prompt and snapshot interval, on the
// BF16 and the NVFP4 fixture.
TEST(Engine, HybridPrefixCachingResumesFromTheDeepestSnapshot) {
    for (const char* name : {"nemotron_h", "nemotron_h_nvfp4_modelopt"}) {
        SCOPED_TRACE(name);
        Fixture fx(name);
        const Reference ref = load_reference(name);
        std::vector<int32_t> base;  // 120 tokens
        for (int j = 0; j < 120; ++j)
            base.push_back(static_cast<int32_t>((ref.tokens[static_cast<size_t>(j) % ref.tokens.size()] + j / 40) % ref.vocab));
        const std::vector<int32_t> a(base.begin(), base.begin() + 100);
        std::vector<std::vector<int32_t>> prompts = {a};
        const std::vector<int> shared = {20, 37, 50, 70, 99, 100};
        for (int l : shared) {
            std::vector<int32_t> p(base.begin(), base.begin() + l);
            for (int k = 0; k < 10; ++k)  // differs from base[l + k]
                p.push_back(static_cast<int32_t>((base[static_cast<size_t>(l + k)] + 1 + k) % ref.vocab));
            prompts.push_back(p);
        }
        prompts.push_back(a);  // A again
        const int64_t max_tokens = 6;
        std::vector<std::vector<int32_t>> expected;
        for (const auto& p : prompts) expected.push_back(greedy_reference(*fx.model, p, max_tokens));

        for (int64_t interval : {32, 0, 48, 2048}) {
            EngineConfig cfg = config_for();
            cfg.max_num_seqs = 4;
            cfg.mamba_prefix_snapshots = 64;  // enough that none is taken back (the scarce case is tested below)
            cfg.mamba_snapshot_interval = interval;
            Engine engine(*fx.model, cfg);
            Collector c;
            for (size_t i = 0; i < prompts.size(); ++i) {
                const std::string id = fmt::format("p{}", i);
                engine.submit(greedy(id, prompts[i], max_tokens), c.sink());
                run_to_end(engine);
                EXPECT_EQ(c.tokens[id][0], expected[i]) << "interval " << interval << ", prompt " << i;
            }
            const EngineStats st = engine.stats();
            EXPECT_GT(st.state_snapshots_used, 0);
            EXPECT_LE(st.state_snapshots_used, st.state_snapshots_total);
            EXPECT_EQ(c.cached["p0"], 0);
            EXPECT_EQ(c.cached[fmt::format("p{}", prompts.size() - 1)], 96) << "A again resumes at its prompt point";
            if (interval == 32) {
                const std::vector<int64_t> want = {0, 16, 32, 48, 96, 96};  // L = 20, 37, 50, 70, 99, 100
                for (size_t k = 0; k < shared.size(); ++k)
                    EXPECT_EQ(c.cached[fmt::format("p{}", k + 1)], want[k]) << "shared " << shared[k];
            }
        }
    }
}

// n > 1 samples of a hybrid request: samples 1.. wait for sample 0's prompt, then resume from the snapshot
// at its last reusable block (every sample but the first reports nothing extra: cached_prompt_tokens is
// sample 0's), and all greedy samples equal the reference.
TEST(Engine, HybridSamplesShareThePromptThroughItsSnapshot) {
    Fixture fx("nemotron_h");
    const Reference ref = load_reference("nemotron_h");
    EngineConfig cfg = config_for();
    cfg.max_num_seqs = 4;
    Engine engine(*fx.model, cfg);
    Collector c;
    GenerationRequest r = greedy("n3", ref.tokens, 5);
    r.n = 3;
    engine.submit(r, c.sink());
    run_to_end(engine);
    const std::vector<int32_t> expected = greedy_reference(*fx.model, ref.tokens, 5);
    for (int i = 0; i < 3; ++i) EXPECT_EQ(c.tokens["n3"][i], expected) << "sample " << i;
    const EngineStats st = engine.stats();
    // Samples 1 and 2 each found the prompt's reusable blocks, ((n - 1) / 16) * 16 tokens.
    const int64_t reusable = (static_cast<int64_t>(ref.tokens.size()) - 1) / 16 * 16;
    EXPECT_EQ(st.prefix_cache_hits, 2 * reusable);
}

// Snapshots live and die with their blocks: preemption, cancellation and eviction give them back (the
// invariant checker, run after every step, also finds a reservation left over between steps), and with only
// two snapshots the engine keeps taking new ones from the least recently used cached blocks.
TEST(Engine, HybridSnapshotsAreFreedByPreemptionAbortAndEviction) {
    Fixture fx("nemotron_h");
    const Reference ref = load_reference("nemotron_h");
    const auto prompts = sixteen_prompts(ref.tokens, ref.vocab);
    const int64_t max_tokens = 6;
    std::vector<std::vector<int32_t>> expected;
    for (const auto& p : prompts) expected.push_back(greedy_reference(*fx.model, p, max_tokens));

    // A pool of 7 blocks (the longest request needs 6) and 2 snapshots: preemption and eviction are certain.
    EngineConfig cfg = config_for(7);
    cfg.max_num_batched_tokens = 24;
    cfg.max_num_seqs = 4;
    cfg.mamba_prefix_snapshots = 2;
    cfg.mamba_snapshot_interval = 32;
    Engine engine(*fx.model, cfg);
    Collector c;
    for (size_t i = 0; i < prompts.size(); ++i)
        engine.submit(greedy(fmt::format("r{}", i), prompts[i], max_tokens), c.sink());
    run_to_end(engine);
    for (size_t i = 0; i < prompts.size(); ++i)
        EXPECT_EQ(c.tokens[fmt::format("r{}", i)][0], expected[i]) << "prompt " << i;
    EngineStats st = engine.stats();
    EXPECT_GT(st.num_preemptions, 0);
    EXPECT_EQ(st.state_snapshots_total, 2);
    EXPECT_LE(st.state_snapshots_used, 2);
    EXPECT_EQ(st.kv_blocks_used, 0);

    // Eviction: 7 fresh single-block prompts take every block; each evicted block gives its snapshot back.
    for (int i = 0; i < 7; ++i) {
        std::vector<int32_t> p;
        for (int j = 0; j < 17; ++j) p.push_back(static_cast<int32_t>((300 + 7 * i + j) % ref.vocab));
        engine.submit(greedy(fmt::format("fresh{}", i), p, 1), c.sink());
    }
    run_to_end(engine);
    st = engine.stats();
    EXPECT_LE(st.state_snapshots_used, 2);

    // Cancellation mid-prefill and mid-decode: nothing stays reserved or held.
    std::vector<int32_t> long_prompt(base_of(prompts));
    engine.submit(greedy("long", long_prompt, 20), c.sink());
    engine.submit(greedy("other", prompts[3], 3), c.sink());
    for (int i = 0; i < 5; ++i) {
        engine.step();
        engine.check_invariants();
    }
    engine.abort("long");
    run_to_end(engine);
    EXPECT_EQ(c.finish["long"][0], FinishReason::Abort);
    EXPECT_EQ(c.tokens["other"][0], greedy_reference(*fx.model, prompts[3], 3));
    EXPECT_EQ(engine.stats().kv_blocks_used, 0);
}

// The measurement in docs/perf.md ("Prefix caching for hybrid models"): agent-style conversations on the
// tiny nemotron_h fixture. A 300-token system prompt (instructions and a tool list), then 6 turns, each
// prompt the previous prompt + the model's reply (24 greedy tokens) + a 20-token user/tool message; three
// such conversations with the same system prompt and different messages, one after another. Cached-token
// fraction = cached prompt tokens / prompt tokens, per conversation; the replies equal the engine's with
// prefix caching off.
TEST(Engine, HybridPrefixCachingHitRateOnAgentConversations) {
    Fixture fx("nemotron_h");
    const int64_t vocab = fx.model->config().vocab_size;
    auto tokens = [&](int n, int seed) {
        std::vector<int32_t> t;
        for (int j = 0; j < n; ++j) t.push_back(static_cast<int32_t>((seed * 131 + j * 17 + (j * j) % 7) % vocab));
        return t;
    };
    const std::vector<int32_t> system = tokens(300, 1);
    const int turns = 6, conversations = 3;
    std::map<bool, std::map<std::string, std::vector<int32_t>>> replies;
    for (bool caching : {false, true}) {
        EngineConfig cfg = config_for(256);
        cfg.max_model_len = 1024;  // NemotronH has no position encoding: the fixture's 128 is not a limit
        cfg.enable_prefix_caching = caching;
        Engine engine(*fx.model, cfg);
        Collector c;
        std::vector<int64_t> prompt_total(conversations, 0), cached_total(conversations, 0);
        std::vector<int64_t> first_turn_cached(conversations, 0);
        for (int conv = 0; conv < conversations; ++conv) {
            std::vector<int32_t> prompt = system;
            for (int turn = 0; turn < turns; ++turn) {
                const auto user = tokens(20, 100 * conv + turn + 2);
                prompt.insert(prompt.end(), user.begin(), user.end());
                const std::string id = fmt::format("c{}t{}", conv, turn);
                engine.submit(greedy(id, prompt, 24), c.sink());
                run_to_end(engine);
                const std::vector<int32_t>& reply = c.tokens[id][0];
                EXPECT_EQ(reply.size(), 24u);
                prompt_total[static_cast<size_t>(conv)] += static_cast<int64_t>(prompt.size());
                cached_total[static_cast<size_t>(conv)] += c.cached[id];
                if (turn == 0) first_turn_cached[static_cast<size_t>(conv)] = c.cached[id];
                prompt.insert(prompt.end(), reply.begin(), reply.end());
                replies[caching][id] = reply;
            }
        }
        for (int conv = 0; conv < conversations; ++conv) {
            const auto i = static_cast<size_t>(conv);
            const double fraction = static_cast<double>(cached_total[i]) / static_cast<double>(prompt_total[i]);
            if (caching)
                std::printf("conversation %d: cached %lld of %lld prompt tokens (%.3f), first turn %lld\n", conv,
                            static_cast<long long>(cached_total[i]), static_cast<long long>(prompt_total[i]), fraction,
                            static_cast<long long>(first_turn_cached[i]));
            if (!caching) {
                EXPECT_EQ(cached_total[i], 0);
                continue;
            }
            // Turns after the first resume at the previous turn's last full block (within 16 + 20 tokens of
            // the end). The first conversation leaves no snapshot inside the system prompt; the second finds
            // its KV blocks without one and leaves a snapshot where they end (288); the third resumes there.
            EXPECT_GT(fraction, 0.8) << conv;
            EXPECT_EQ(first_turn_cached[i], conv < 2 ? 0 : 288) << conv;
        }
        if (caching)
            std::printf("snapshots attached at the end: %lld of %lld\n",
                        static_cast<long long>(engine.stats().state_snapshots_used),
                        static_cast<long long>(engine.stats().state_snapshots_total));
    }
    EXPECT_EQ(replies[true], replies[false]);
}

TEST(Engine, LogprobsAreLogSoftmaxOfTransformersLogits) {
    for (const char* name : {"llama_gqa", "qwen3_qknorm", "mistral"}) {
        Fixture fx(name);
        const Reference ref = load_reference(name);
        const int64_t n = static_cast<int64_t>(ref.tokens.size()), vocab = ref.vocab;
        // log_softmax of transformers' logits for the last prompt position, in long double.
        const float* row = ref.logits.data() + (n - 1) * vocab;
        long double top = *std::max_element(row, row + vocab), z = 0;
        for (int64_t i = 0; i < vocab; ++i) z += std::exp(static_cast<long double>(row[i]) - top);
        std::vector<double> lsm(static_cast<size_t>(vocab));
        for (int64_t i = 0; i < vocab; ++i) lsm[static_cast<size_t>(i)] = static_cast<double>(row[i] - top - std::log(z));
        const double tol = 2 * ref.tol;

        Engine engine(*fx.model, config_for());
        Collector c;
        GenerationRequest r = greedy("lp", ref.tokens, 1);
        r.top_logprobs = 5;
        r.repetition_penalty = 1.3f;  // logprobs stay those of the raw logits
        engine.submit(r, c.sink());
        run_to_end(engine);
        ASSERT_EQ(c.tokens["lp"][0].size(), 1u) << name;
        const int32_t tok = c.tokens["lp"][0][0];
        ASSERT_EQ(c.logprobs["lp"][0].size(), 1u);
        EXPECT_NEAR(c.logprobs["lp"][0][0], lsm[static_cast<size_t>(tok)], tol) << name;
        std::vector<double> sorted = lsm;
        std::sort(sorted.rbegin(), sorted.rend());
        ASSERT_EQ(c.top["lp"][0].size(), 1u);
        const auto& top5 = c.top["lp"][0][0];
        ASSERT_EQ(top5.size(), 5u);
        for (size_t k = 0; k < 5; ++k) {
            EXPECT_NEAR(top5[k].logprob, sorted[k], tol) << name << " rank " << k;
            EXPECT_NEAR(top5[k].logprob, lsm[static_cast<size_t>(top5[k].token)], tol) << name << " rank " << k;
        }
    }
}

TEST(Engine, ReportsCachedPromptTokensOnARepeatedPrompt) {
    Fixture fx("llama_gqa");
    const Reference ref = load_reference("llama_gqa");
    Engine engine(*fx.model, config_for());
    Collector c;
    engine.submit(greedy("first", ref.tokens, 4), c.sink());
    run_to_end(engine);
    engine.submit(greedy("again", ref.tokens, 4), c.sink());
    run_to_end(engine);
    std::vector<int32_t> longer(ref.tokens.begin(), ref.tokens.begin() + 32);  // exactly 2 blocks
    engine.submit(greedy("two-blocks", longer, 4), c.sink());
    run_to_end(engine);
    EXPECT_EQ(c.cached["first"], 0);
    EXPECT_EQ(c.cached["again"], 32);       // 40 tokens: 2 full blocks of 16
    EXPECT_EQ(c.cached["two-blocks"], 16);  // 32 tokens: the last block is recomputed for its logits
    EXPECT_EQ(c.tokens["again"][0], c.tokens["first"][0]);
    const EngineStats st = engine.stats();
    EXPECT_EQ(st.prefix_cache_queries, 40 + 40 + 32);
    EXPECT_EQ(st.prefix_cache_hits, 32 + 16);
    EXPECT_EQ(st.prompt_tokens_total, 40 + 40 + 32);
}

TEST(Engine, AbortFreesBlocksAtOnce) {
    Fixture fx("llama_gqa");
    const Reference ref = load_reference("llama_gqa");
    EngineConfig cfg = config_for();
    cfg.enable_prefix_caching = false;
    Engine engine(*fx.model, cfg);
    Collector c;
    engine.submit(greedy("long", ref.tokens, 60), c.sink());
    engine.submit(greedy("other", ref.tokens, 3), c.sink());
    for (int i = 0; i < 3; ++i) {
        engine.step();
        engine.check_invariants();
    }
    EXPECT_GT(engine.stats().kv_blocks_used, 0);
    engine.abort("long");
    run_to_end(engine);
    EXPECT_EQ(c.finish["long"][0], FinishReason::Abort);
    EXPECT_TRUE(c.finished["long"]);
    EXPECT_TRUE(c.error["long"].empty());
    EXPECT_EQ(c.tokens["long"][0].size(), 3u);
    EXPECT_EQ(c.tokens["other"][0], greedy_reference(*fx.model, ref.tokens, 3));
    EXPECT_EQ(engine.stats().kv_blocks_used, 0);
    engine.abort("long");  // unknown by now: ignored
    EXPECT_FALSE(engine.step());
}

TEST(Engine, SeededSamplesAreReproducibleAndDiffer) {
    Fixture fx("llama_gqa");
    const Reference ref = load_reference("llama_gqa");
    GenerationRequest r = greedy("n3", ref.tokens, 10);
    r.sampling = {.temperature = 1.0f, .top_k = 0, .top_p = 1.0f, .min_p = 0.0f, .seed = 1234};
    r.n = 3;
    std::map<int, std::vector<int32_t>> runs[2];
    for (auto& run : runs) {
        Engine engine(*fx.model, config_for());
        Collector c;
        engine.submit(r, c.sink());
        run_to_end(engine);
        run = c.tokens["n3"];
        EXPECT_TRUE(c.finished["n3"]);
        EXPECT_EQ(engine.stats().kv_blocks_used, 0);
    }
    EXPECT_EQ(runs[0], runs[1]);
    ASSERT_EQ(runs[0].size(), 3u);
    EXPECT_NE(runs[0][0], runs[0][1]);
    EXPECT_NE(runs[0][1], runs[0][2]);
    // Sample i draws from stream seed + i over the model's logits (recomputed here from scratch).
    for (int i = 0; i < 3; ++i) {
        auto rng = make_sampling_rng(r.sampling, i);
        std::vector<int32_t> seq = ref.tokens, out;
        for (int t = 0; t < 10; ++t) {
            out.push_back(sample_token(last_logits(*fx.model, seq), r.sampling, rng));
            seq.push_back(out.back());
        }
        EXPECT_EQ(runs[0][i], out) << "sample " << i;
    }
}

// A runner that samples "on the device" through ModelRunner's default execute_sample (the host rule over
// the CPU runner's logits), counting how often the engine chose that path.
class SamplingCpuRunner final : public ModelRunner {
public:
    SamplingCpuRunner(Model& m, const EngineConfig& c) : inner_(m, c.num_blocks, c.block_size, c.kv_cache_dtype) {}
    int64_t vocab_size() const override { return inner_.vocab_size(); }
    void execute(std::span<const RunnerSequence> batch, std::vector<float>& logits) override {
        inner_.execute(batch, logits);
    }
    bool samples_on_device() const override { return true; }
    void execute_sample(std::span<const RunnerSequence> batch, std::span<const RowSampling> rows,
                        std::vector<int32_t>& tokens) override {
        ++sample_calls;
        ModelRunner::execute_sample(batch, rows, tokens);
    }
    int sample_calls = 0;

private:
    CpuModelRunner inner_;
};

// Sampling on the runner draws each row's u from the sequence's own stream, so a seeded request gets the
// tokens the host sampler gives it, alone or batched with requests that need the logits on the host
// (logprobs, penalties, min_tokens), which send their steps down the host path.
TEST(Engine, RunnerSamplingGivesTheHostSamplersTokens) {
    Fixture fx("llama_gqa");
    const Reference ref = load_reference("llama_gqa");
    std::vector<GenerationRequest> requests;
    GenerationRequest s = greedy("sampled", ref.tokens, 12);
    s.sampling = {.temperature = 0.9f, .top_k = 20, .top_p = 0.9f, .min_p = 0.02f, .seed = 77};
    s.n = 2;
    requests.push_back(s);
    GenerationRequest hot = greedy("hot", ref.tokens, 12);
    hot.sampling = {.temperature = 1.5f, .top_k = 0, .top_p = 1.0f, .min_p = 0.0f, .seed = 5};
    requests.push_back(hot);
    requests.push_back(greedy("greedy", ref.tokens, 12));
    GenerationRequest lp = hot;
    lp.id = "logprobs";
    lp.max_tokens = 5;
    lp.top_logprobs = 2;
    GenerationRequest pen = hot;
    pen.id = "penalty";
    pen.max_tokens = 6;
    pen.presence_penalty = 0.5f;
    GenerationRequest mt = s;
    mt.id = "min_tokens";
    mt.n = 1;
    mt.min_tokens = 4;
    mt.ignore_eos = false;
    auto generate = [&](const std::vector<GenerationRequest>& reqs, bool on_runner, int* sample_calls) {
        const EngineConfig cfg = config_for();
        auto runner = on_runner ? std::make_unique<SamplingCpuRunner>(*fx.model, cfg) : nullptr;
        SamplingCpuRunner* raw = runner.get();
        Engine engine(*fx.model, cfg, std::move(runner));
        Collector c;
        for (const auto& r : reqs) engine.submit(r, c.sink());
        run_to_end(engine);
        if (sample_calls) *sample_calls = raw ? raw->sample_calls : 0;
        return c.tokens;
    };
    int calls = 0;
    const auto alone_host = generate(requests, false, nullptr);
    const auto alone_runner = generate(requests, true, &calls);
    EXPECT_EQ(alone_runner, alone_host);
    EXPECT_GE(calls, 12);  // every step samples on the runner: the prefill, then the decode steps
    ASSERT_EQ(alone_host.at("sampled").size(), 2u);
    EXPECT_NE(alone_host.at("sampled").at(0), alone_host.at("sampled").at(1));

    std::vector<GenerationRequest> mixed = requests;
    mixed.insert(mixed.end(), {lp, pen, mt});
    const auto mixed_host = generate(mixed, false, nullptr);
    const auto mixed_runner = generate(mixed, true, &calls);
    EXPECT_EQ(mixed_runner, mixed_host);
    EXPECT_GT(calls, 0);    // steps after the logprobs, penalty and min_tokens requests finished...
    EXPECT_LT(calls, 12);   // ...but none while one of them was running
    for (const char* id : {"sampled", "hot", "greedy"}) EXPECT_EQ(mixed_host.at(id), alone_host.at(id)) << id;
}

TEST(Engine, StopsOnEosAndStopIdsAfterMinTokens) {
    Fixture fx("llama_gqa");
    const Reference ref = load_reference("llama_gqa");
    const auto expected = greedy_reference(*fx.model, ref.tokens, 8);
    Engine engine(*fx.model, config_for());
    Collector c;
    GenerationRequest r = greedy("stop", ref.tokens, 8);
    r.stop_token_ids = {expected[2]};
    engine.submit(r, c.sink());
    GenerationRequest m = greedy("min", ref.tokens, 8);
    m.stop_token_ids = {expected[2]};
    m.min_tokens = 8;
    engine.submit(m, c.sink());
    run_to_end(engine);
    // Stops at the first occurrence of the stop id, which is included.
    const auto first = std::find(expected.begin(), expected.end(), expected[2]) - expected.begin();
    EXPECT_EQ(c.tokens["stop"][0], std::vector<int32_t>(expected.begin(), expected.begin() + first + 1));
    EXPECT_EQ(c.finish["stop"][0], FinishReason::Stop);
    // Under min_tokens the stop id is masked: never produced, and the request runs to max_tokens.
    EXPECT_EQ(c.tokens["min"][0].size(), 8u);
    EXPECT_EQ(std::count(c.tokens["min"][0].begin(), c.tokens["min"][0].end(), expected[2]), 0);
    EXPECT_EQ(c.finish["min"][0], FinishReason::Length);
}

TEST(Engine, AFailingSinkFailsOnlyItsRequest) {
    Fixture fx("llama_gqa");
    const Reference ref = load_reference("llama_gqa");
    Engine engine(*fx.model, config_for());
    Collector c;
    int calls = 0;
    RequestOutput last;
    engine.submit(greedy("bad", ref.tokens, 5), [&](const RequestOutput& o) {
        if (++calls == 1) throw std::runtime_error("client went away");
        last = o;
    });
    engine.submit(greedy("good", ref.tokens, 5), c.sink());
    run_to_end(engine);
    EXPECT_EQ(calls, 2);
    EXPECT_TRUE(last.finished);
    EXPECT_NE(last.error.find("client went away"), std::string::npos);
    EXPECT_EQ(c.tokens["good"][0], greedy_reference(*fx.model, ref.tokens, 5));
    EXPECT_EQ(engine.stats().kv_blocks_used, 0);
}

TEST(Engine, RefusesBadRequestsNamingTheField) {
    Fixture fx("llama_gqa");
    Collector c;  // before the engine: its destructor still delivers (Abort) to this sink
    Engine engine(*fx.model, config_for());
    auto message = [&](GenerationRequest r) {
        try {
            engine.submit(std::move(r), c.sink());
        } catch (const Error& e) {
            return std::string(e.what());
        }
        return std::string();
    };
    EXPECT_NE(message(greedy("a", {}, 4)).find("prompt"), std::string::npos);
    EXPECT_NE(message(greedy("b", {1, 2}, 200)).find("max_model_len"), std::string::npos);
    EXPECT_NE(message(greedy("c", {1, 100000}, 4)).find("vocabulary"), std::string::npos);
    GenerationRequest n0 = greedy("d", {1, 2}, 4);
    n0.n = 0;
    EXPECT_NE(message(n0).find("n must"), std::string::npos);
    GenerationRequest pen = greedy("e", {1, 2}, 4);
    pen.presence_penalty = 3;
    EXPECT_NE(message(pen).find("presence_penalty"), std::string::npos);
    EXPECT_EQ(message(greedy("f", {1, 2}, 4)), "");
    EXPECT_NE(message(greedy("f", {1, 2}, 4)).find("in flight"), std::string::npos);
    run_to_end(engine);
    EXPECT_EQ(message(greedy("f", {1, 2}, 4)), "");  // finished: the id may be used again
}

TEST(Engine, LoopThreadServesConcurrentSubmitters) {
    Fixture fx("llama_gqa");
    const Reference ref = load_reference("llama_gqa");
    const auto prompts = sixteen_prompts(ref.tokens, ref.vocab);
    Engine engine(*fx.model, config_for());
    engine.start();
    Collector c;
    std::vector<std::thread> threads;
    for (int i = 0; i < 4; ++i)
        threads.emplace_back([&, i] { engine.submit(greedy(fmt::format("t{}", i), prompts[static_cast<size_t>(i)], 6), c.sink()); });
    for (auto& t : threads) t.join();
    {
        std::unique_lock lock(c.mutex);
        ASSERT_TRUE(c.cv.wait_for(lock, std::chrono::seconds(60), [&] {
            int done = 0;
            for (const auto& [id, f] : c.finished) done += f ? 1 : 0;
            return done == 4;
        }));
    }
    engine.stop();
    for (int i = 0; i < 4; ++i)
        EXPECT_EQ(c.tokens[fmt::format("t{}", i)][0], greedy_reference(*fx.model, prompts[static_cast<size_t>(i)], 6));
}

}  // namespace
}  // namespace nibble
