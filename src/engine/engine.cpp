// The engine loop: drain the inbox (submit, abort, finish_sequence from other threads), schedule, run one
// forward, sample, hand each request its new tokens. A request whose sampling or sink throws fails alone:
// its sequences finish (Abort, error set) and release their blocks; other requests go on.
#include "engine/engine.h"

#include <algorithm>
#include <cmath>
#include <condition_variable>
#include <map>
#include <mutex>
#include <set>
#include <thread>
#include <unordered_map>

#include "base/error.h"
#include "base/log.h"
#include "engine/block_pool.h"
#include "engine/model_runner.h"
#include "engine/scheduler.h"
#include "engine/sequence.h"
#include "model/model.h"

namespace nibble {

namespace {

struct Request {
    GenerationRequest req;
    OutputSink sink;
    std::vector<std::unique_ptr<Sequence>> seqs;  // [n]
    std::vector<std::mt19937_64> rngs;            // [n]: seed + index
    std::vector<int32_t> stop_ids;                // stop_token_ids, and EOS unless ignore_eos
    bool prompt_counted = false;
    RequestOutput out;                            // outputs gathered this step
    bool dirty = false;

    bool finished() const {
        return std::all_of(seqs.begin(), seqs.end(), [](const auto& s) { return s->status == SequenceStatus::Finished; });
    }
};

struct Command {
    enum class Kind { Submit, Abort, FinishSequence } kind = Kind::Submit;
    std::unique_ptr<Request> request;  // Submit
    std::string id;                    // Abort, FinishSequence
    int index = 0;
    FinishReason reason = FinishReason::Stop;
};

// Hybrid models: state snapshots the engine keeps (0 when prefix caching is off).
int64_t snapshots_for(const Model& m, const EngineConfig& c) {
    if (m.mamba_state_shape(c.mamba_ssm_cache_dtype).empty() || !c.enable_prefix_caching) return 0;
    return c.mamba_prefix_snapshots < 0 ? c.max_num_seqs : c.mamba_prefix_snapshots;
}

}  // namespace

struct Engine::Impl {
    Impl(Model& m, const EngineConfig& c, std::unique_ptr<ModelRunner> backend)
        : model(m),
          config(c),
          hybrid(!m.mamba_state_shape(c.mamba_ssm_cache_dtype).empty()),
          snapshots(snapshots_for(m, c)),
          pool(c.num_blocks, c.block_size, c.enable_prefix_caching && (!hybrid || snapshots > 0), hash_block_tokens,
               snapshots),
          scheduler({.max_num_seqs = c.max_num_seqs,
                     .max_num_batched_tokens = c.max_num_batched_tokens,
                     .num_state_slots = hybrid ? c.max_num_seqs : 0,
                     .snapshot_interval = hybrid ? c.mamba_snapshot_interval : 0},
                    pool),
          owned_runner(backend ? std::move(backend)
                               : std::make_unique<CpuModelRunner>(m, c.num_blocks, c.block_size, c.kv_cache_dtype,
                                                                  hybrid ? c.max_num_seqs : 0,
                                                                  c.mamba_ssm_cache_dtype, snapshots)),
          runner(*owned_runner),
          vocab(m.config().vocab_size) {
        // A runner without snapshot support (ModelRunner's default: 0) must be configured with 0 snapshots,
        // which leaves hybrid prefix caching off.
        NIBBLE_CHECK(runner.num_state_snapshots() == snapshots, "engine: the runner keeps {} state snapshots, not {}",
                     runner.num_state_snapshots(), snapshots);
    }

    Model& model;
    EngineConfig config;
    bool hybrid;  // the model keeps per-sequence recurrent state (one slot per sequence)
    int64_t snapshots;  // hybrid prefix caching: recurrent-state snapshots (0: off)
    BlockPool pool;
    Scheduler scheduler;
    std::unique_ptr<ModelRunner> owned_runner;  // the CPU runner, or the backend the caller gave
    ModelRunner& runner;
    int64_t vocab;

    // Engine-thread state (under step_mutex).
    std::mutex step_mutex;
    std::map<std::string, std::unique_ptr<Request>> live;
    std::unordered_map<const Sequence*, Request*> owner;
    int64_t next_seq_id = 0;
    int64_t prompt_tokens_total = 0, generation_tokens_total = 0;

    // Shared with submitting threads (under mutex).
    mutable std::mutex mutex;
    std::condition_variable wake;
    std::vector<Command> inbox;
    std::set<std::string> in_flight;
    EngineStats stats;
    bool stopping = false;
    std::thread loop;

    void validate(const GenerationRequest& r) const;
    void push(Command cmd);
    bool step();
    void apply(Command& cmd);
    SequenceOutput& output_of(Request& r, int index);
    void finish_seq(Request& r, Sequence& s, FinishReason reason);
    void fail(Request& r, const std::string& error);
    void sample(Request& r, Sequence& s, std::span<const float> raw);
    // Nothing of this step's sampling needs the logits on the host (no logprobs, logit_bias, penalties, nor
    // stop tokens masked under min_tokens): a runner that samples on the device may pick the token.
    bool plain(const Request& r, const Sequence& s) const;
    bool plain_greedy(const Request& r, const Sequence& s) const;
    // Appends the chosen token (raw: its logits row, for logprobs; empty for device-sampled steps).
    void accept(Request& r, Sequence& s, int32_t token, std::span<const float> raw);
    void deliver(Request& r);
    void deliver_all();
    void fail_all(const std::string& error);
    void update_stats();
    void run_loop();
};

void Engine::Impl::validate(const GenerationRequest& r) const {
    NIBBLE_CHECK(!r.id.empty(), "request id must not be empty");
    NIBBLE_CHECK(!r.prompt.empty(), "request {}: prompt must not be empty", r.id);
    for (size_t i = 0; i < r.prompt.size(); ++i)
        NIBBLE_CHECK(r.prompt[i] >= 0 && r.prompt[i] < vocab, "request {}: prompt token {} ({}) is outside the vocabulary [0, {})",
                     r.id, i, r.prompt[i], vocab);
    NIBBLE_CHECK(r.n >= 1, "request {}: n must be at least 1, got {}", r.id, r.n);
    NIBBLE_CHECK(r.max_tokens >= 1, "request {}: max_tokens must be at least 1, got {}", r.id, r.max_tokens);
    NIBBLE_CHECK(r.min_tokens >= 0 && r.min_tokens <= r.max_tokens,
                 "request {}: min_tokens must be in [0, max_tokens = {}], got {}", r.id, r.max_tokens, r.min_tokens);
    const int64_t total = static_cast<int64_t>(r.prompt.size()) + r.max_tokens;
    NIBBLE_CHECK(total <= config.max_model_len,
                 "request {}: prompt ({} tokens) + max_tokens ({}) = {} exceeds max_model_len {}", r.id, r.prompt.size(),
                 r.max_tokens, total, config.max_model_len);
    const int64_t blocks = (total + config.block_size - 1) / config.block_size;
    NIBBLE_CHECK(blocks <= config.num_blocks, "request {}: prompt + max_tokens = {} tokens need {} KV blocks, the pool has {}",
                 r.id, total, blocks, config.num_blocks);
    if (std::string e = r.sampling.validate(); !e.empty()) nibble::fail("request {}: {}", r.id, e);
    NIBBLE_CHECK(r.presence_penalty >= -2.0f && r.presence_penalty <= 2.0f,
                 "request {}: presence_penalty must be in [-2, 2], got {}", r.id, r.presence_penalty);
    NIBBLE_CHECK(r.frequency_penalty >= -2.0f && r.frequency_penalty <= 2.0f,
                 "request {}: frequency_penalty must be in [-2, 2], got {}", r.id, r.frequency_penalty);
    NIBBLE_CHECK(r.repetition_penalty > 0.0f && std::isfinite(r.repetition_penalty),
                 "request {}: repetition_penalty must be a finite number > 0, got {}", r.id, r.repetition_penalty);
    for (const auto& [id, bias] : r.logit_bias) {
        NIBBLE_CHECK(id >= 0 && id < vocab, "request {}: logit_bias token {} is outside the vocabulary [0, {})", r.id, id,
                     vocab);
        NIBBLE_CHECK(std::isfinite(bias), "request {}: logit_bias of token {} must be finite, got {}", r.id, id, bias);
    }
    for (int32_t id : r.stop_token_ids)
        NIBBLE_CHECK(id >= 0 && id < vocab, "request {}: stop_token_ids entry {} is outside the vocabulary [0, {})", r.id,
                     id, vocab);
    NIBBLE_CHECK(r.top_logprobs >= -1 && r.top_logprobs <= vocab, "request {}: top_logprobs must be in [-1, {}], got {}",
                 r.id, vocab, r.top_logprobs);
}

void Engine::Impl::push(Command cmd) {
    {
        std::lock_guard lock(mutex);
        inbox.push_back(std::move(cmd));
    }
    wake.notify_all();
}

void Engine::Impl::apply(Command& cmd) {
    if (cmd.kind == Command::Kind::Submit) {
        Request& r = *cmd.request;
        for (int i = 0; i < r.req.n; ++i) {
            auto s = std::make_unique<Sequence>();
            s->id = next_seq_id++;
            s->index = i;
            s->tokens = r.req.prompt;
            s->n_prompt = static_cast<int64_t>(r.req.prompt.size());
            if (i > 0) s->parent = r.seqs[0].get();
            owner[s.get()] = &r;
            scheduler.add(s.get());
            r.seqs.push_back(std::move(s));
            r.rngs.push_back(make_sampling_rng(r.req.sampling, i));
        }
        live[r.req.id] = std::move(cmd.request);
        return;
    }
    auto it = live.find(cmd.id);
    if (it == live.end()) return;  // finished already
    Request& r = *it->second;
    for (auto& s : r.seqs) {
        if (s->status == SequenceStatus::Finished) continue;
        if (cmd.kind == Command::Kind::Abort) finish_seq(r, *s, FinishReason::Abort);
        else if (s->index == cmd.index) finish_seq(r, *s, cmd.reason);
    }
}

SequenceOutput& Engine::Impl::output_of(Request& r, int index) {
    r.dirty = true;
    for (auto& o : r.out.outputs)
        if (o.index == index) return o;
    r.out.outputs.push_back({});
    r.out.outputs.back().index = index;
    return r.out.outputs.back();
}

void Engine::Impl::finish_seq(Request& r, Sequence& s, FinishReason reason) {
    scheduler.finish(&s);
    output_of(r, s.index).finish = reason;
}

void Engine::Impl::fail(Request& r, const std::string& error) {
    for (auto& s : r.seqs)
        if (s->status != SequenceStatus::Finished) finish_seq(r, *s, FinishReason::Abort);
    if (r.out.error.empty()) r.out.error = error;
    r.dirty = true;
}

bool Engine::Impl::plain(const Request& r, const Sequence& s) const {
    const GenerationRequest& q = r.req;
    return q.top_logprobs < 0 && q.logit_bias.empty() && q.presence_penalty == 0.0f && q.frequency_penalty == 0.0f &&
           q.repetition_penalty == 1.0f && s.num_output() >= q.min_tokens;
}

bool Engine::Impl::plain_greedy(const Request& r, const Sequence& s) const {
    return r.req.sampling.temperature == 0.0f && plain(r, s);
}

void Engine::Impl::sample(Request& r, Sequence& s, std::span<const float> raw) {
    const GenerationRequest& q = r.req;
    const bool under_min = s.num_output() < q.min_tokens;
    std::vector<float> work(raw.begin(), raw.end());
    if (under_min) mask_tokens(work, r.stop_ids);
    apply_logit_bias(work, q.logit_bias);
    apply_penalties(work,
                    {.presence_penalty = q.presence_penalty,
                     .frequency_penalty = q.frequency_penalty,
                     .repetition_penalty = q.repetition_penalty},
                    s.prompt(), s.output());
    accept(r, s, sample_token(work, q.sampling, r.rngs[static_cast<size_t>(s.index)]), raw);
}

void Engine::Impl::accept(Request& r, Sequence& s, int32_t token, std::span<const float> raw) {
    const GenerationRequest& q = r.req;
    const bool under_min = s.num_output() < q.min_tokens;  // before this token: EOS could not stop it
    SequenceOutput& o = output_of(r, s.index);
    o.tokens.push_back(token);
    if (q.top_logprobs >= 0) {
        const std::vector<float> lp = log_softmax(raw);
        o.logprobs.push_back(lp[static_cast<size_t>(token)]);
        o.top_logprobs.push_back(top_logprobs(lp, q.top_logprobs));
    }
    s.tokens.push_back(token);
    ++generation_tokens_total;
    if (!r.prompt_counted) {
        r.prompt_counted = true;
        prompt_tokens_total += s.n_prompt;
    }
    const bool stop = !under_min && std::find(r.stop_ids.begin(), r.stop_ids.end(), token) != r.stop_ids.end();
    if (stop) finish_seq(r, s, FinishReason::Stop);
    else if (s.num_output() >= q.max_tokens || s.num_tokens() >= config.max_model_len) finish_seq(r, s, FinishReason::Length);
}

void Engine::Impl::deliver(Request& r) {
    if (!r.dirty) return;
    for (int attempt = 0; attempt < 2; ++attempt) {
        r.out.request_id = r.req.id;
        r.out.prompt_tokens = static_cast<int64_t>(r.req.prompt.size());
        r.out.cached_prompt_tokens = std::max<int64_t>(0, r.seqs[0]->num_cached_tokens);
        r.out.finished = r.finished();
        try {
            r.sink(r.out);
            break;
        } catch (const std::exception& e) {
            // The sink failed: end this request (once more telling the sink why), never the engine.
            log::warn("request {}: output sink failed: {}", r.req.id, e.what());
            r.out.outputs.clear();
            fail(r, fmt::format("output sink failed: {}", e.what()));
        } catch (...) {
            r.out.outputs.clear();
            fail(r, "output sink failed");
        }
    }
    r.out.outputs.clear();
    r.dirty = false;
}

void Engine::Impl::deliver_all() {
    std::vector<std::string> done;
    for (auto& [id, r] : live) {
        deliver(*r);
        if (r->finished()) done.push_back(id);
    }
    for (const auto& id : done) {
        for (auto& s : live[id]->seqs) owner.erase(s.get());
        live.erase(id);
    }
    if (!done.empty()) {
        std::lock_guard lock(mutex);
        for (const auto& id : done) in_flight.erase(id);
    }
}

void Engine::Impl::fail_all(const std::string& error) {
    for (auto& [id, r] : live) fail(*r, error);
    deliver_all();
}

void Engine::Impl::update_stats() {
    EngineStats st;
    for (const auto& [id, r] : live) {
        const bool running = std::any_of(r->seqs.begin(), r->seqs.end(),
                                         [](const auto& s) { return s->status == SequenceStatus::Running; });
        ++(running ? st.num_running : st.num_waiting);
    }
    st.kv_blocks_total = pool.num_blocks();
    st.kv_blocks_used = pool.num_blocks() - pool.num_free();
    st.prefix_cache_queries = scheduler.prefix_cache().queries;
    st.prefix_cache_hits = scheduler.prefix_cache().hits;
    st.prompt_tokens_total = prompt_tokens_total;
    st.generation_tokens_total = generation_tokens_total;
    st.num_preemptions = scheduler.num_preemptions();
    st.state_snapshots_total = pool.num_snapshots();
    st.state_snapshots_used = pool.num_attached_snapshots();
    std::lock_guard lock(mutex);
    for (const auto& cmd : inbox) st.num_waiting += cmd.kind == Command::Kind::Submit ? 1 : 0;
    stats = st;
}

bool Engine::Impl::step() {
    std::lock_guard step_lock(step_mutex);
    std::vector<Command> commands;
    {
        std::lock_guard lock(mutex);
        commands.swap(inbox);
    }
    for (auto& cmd : commands) apply(cmd);
    deliver_all();

    if (scheduler.running().empty() && scheduler.waiting().empty()) {
        update_stats();
        return false;
    }
    const SchedulerOutput out = scheduler.schedule();
    NIBBLE_CHECK(!out.chunks.empty(), "engine: {} sequences waiting but none could be scheduled",
                 scheduler.waiting().size());

    std::vector<RunnerSequence> batch;
    for (const ScheduledChunk& c : out.chunks) {
        const Sequence& s = *c.seq;
        batch.push_back({.tokens = std::span(s.tokens).subspan(static_cast<size_t>(s.num_computed),
                                                               static_cast<size_t>(c.n_tokens)),
                         .block_table = s.block_table,
                         .start_pos = s.num_computed,
                         .needs_logits = c.sample,
                         .state_slot = s.state_slot});
    }
    std::vector<float> logits;
    std::vector<int32_t> device_tokens;
    // Greedy on the device when every sampled sequence wants plain greedy, else sampling on the device when
    // every one is plain: one int per sequence comes back instead of a vocabulary of floats.
    bool greedy_on_device = runner.samples_greedy_on_device(), sample_on_device = runner.samples_on_device();
    for (const ScheduledChunk& c : out.chunks) {
        if (!c.sample) continue;
        const Request& r = *owner.at(c.seq);
        if (!plain_greedy(r, *c.seq)) greedy_on_device = false;
        if (!plain(r, *c.seq)) sample_on_device = false;
    }
    const bool on_device = greedy_on_device || sample_on_device;
    std::vector<RowSampling> device_rows;  // one per sampled sequence, in batch order
    if (!greedy_on_device && sample_on_device) {
        for (const ScheduledChunk& c : out.chunks) {
            if (!c.sample) continue;
            Request& r = *owner.at(c.seq);
            const SamplingParams& p = r.req.sampling;
            // The draw the host sampler would take from this sequence's stream (none when greedy).
            const double u = p.temperature == 0.0f ? 0.0 : sampling_uniform(r.rngs[static_cast<size_t>(c.seq->index)]);
            device_rows.push_back({.temperature = p.temperature, .top_k = p.top_k, .top_p = p.top_p, .min_p = p.min_p,
                                   .u = u});
        }
    }
    try {
        // A sequence resuming on cached blocks starts from the state after the last of them; a chunk ending
        // on a snapshot point leaves its state in the reserved snapshot (the scheduler attaches it).
        for (const ScheduledChunk& c : out.chunks)
            if (c.seq->restore_snapshot >= 0) runner.restore_state_snapshot(c.seq->restore_snapshot, c.seq->state_slot);
        if (greedy_on_device)
            runner.execute_greedy(batch, device_tokens);
        else if (sample_on_device)
            runner.execute_sample(batch, device_rows, device_tokens);
        else
            runner.execute(batch, logits);
        for (const ScheduledChunk& c : out.chunks)
            if (c.seq->save_snapshot >= 0) runner.save_state_snapshot(c.seq->state_slot, c.seq->save_snapshot);
    } catch (const std::exception& e) {
        for (const ScheduledChunk& c : out.chunks) fail(*owner.at(c.seq), fmt::format("forward failed: {}", e.what()));
        deliver_all();
        update_stats();
        return true;
    }

    size_t row = 0;
    for (const ScheduledChunk& c : out.chunks) {
        Sequence& s = *c.seq;
        Request& r = *owner.at(&s);
        const size_t this_row = c.sample ? row++ : 0;
        if (s.status != SequenceStatus::Running) continue;  // its request failed earlier in this loop
        scheduler.finish_chunk(c);
        if (!c.sample) continue;
        try {
            if (on_device)
                accept(r, s, device_tokens.at(this_row), {});
            else
                sample(r, s, std::span<const float>(logits).subspan(this_row * static_cast<size_t>(vocab),
                                                                    static_cast<size_t>(vocab)));
        } catch (const std::exception& e) {
            fail(r, fmt::format("sampling failed: {}", e.what()));
        }
    }
    deliver_all();
    update_stats();
    return true;
}

void Engine::Impl::run_loop() {
    for (;;) {
        {
            std::lock_guard lock(mutex);
            if (stopping) return;
        }
        bool busy = false;
        try {
            busy = step();
        } catch (const std::exception& e) {
            log::error("engine step failed: {}", e.what());
            std::lock_guard step_lock(step_mutex);
            fail_all(fmt::format("engine step failed: {}", e.what()));
        }
        if (!busy) {
            std::unique_lock lock(mutex);
            wake.wait(lock, [&] { return stopping || !inbox.empty(); });
        }
    }
}

Engine::Engine(Model& model, const EngineConfig& config, std::unique_ptr<ModelRunner> runner) {
    NIBBLE_CHECK(config.num_blocks > 0, "engine: num_blocks (KV blocks, from the memory plan) must be positive, got {}",
                 config.num_blocks);
    NIBBLE_CHECK(config.block_size > 0, "engine: block_size must be positive, got {}", config.block_size);
    NIBBLE_CHECK(config.max_model_len > 0, "engine: max_model_len must be positive, got {}", config.max_model_len);
    const int64_t vocab = model.config().vocab_size;
    for (int32_t id : config.eos_token_ids)
        NIBBLE_CHECK(id >= 0 && id < vocab, "engine: eos token id {} is outside the vocabulary [0, {})", id, vocab);
    NIBBLE_CHECK(config.mamba_snapshot_interval >= 0 && config.mamba_snapshot_interval % config.block_size == 0,
                 "engine: the Mamba state snapshot interval {} must be a non-negative multiple of block_size {}",
                 config.mamba_snapshot_interval, config.block_size);
    if (config.enable_prefix_caching && config.mamba_prefix_snapshots == 0 &&
        !model.mamba_state_shape(config.mamba_ssm_cache_dtype).empty())
        log::warn("prefix caching is off for {}: a hybrid model resumes only from a Mamba state snapshot and "
                  "--mamba-prefix-snapshots is 0", model.config().arch_name);
    impl_ = std::make_unique<Impl>(model, config, std::move(runner));
    impl_->update_stats();
}

Engine::~Engine() {
    stop();
    // Pending requests end with Abort (their sinks hear of it).
    Impl& m = *impl_;
    std::lock_guard step_lock(m.step_mutex);
    std::vector<Command> commands;
    {
        std::lock_guard lock(m.mutex);
        commands.swap(m.inbox);
    }
    for (auto& cmd : commands)
        if (cmd.kind == Command::Kind::Submit) m.apply(cmd);
    for (auto& [id, r] : m.live)
        for (auto& s : r->seqs)
            if (s->status != SequenceStatus::Finished) m.finish_seq(*r, *s, FinishReason::Abort);
    m.deliver_all();
}

void Engine::submit(GenerationRequest request, OutputSink sink) {
    impl_->validate(request);
    NIBBLE_CHECK(static_cast<bool>(sink), "request {}: no output sink", request.id);
    auto r = std::make_unique<Request>();
    r->stop_ids = request.stop_token_ids;
    if (!request.ignore_eos)
        r->stop_ids.insert(r->stop_ids.end(), impl_->config.eos_token_ids.begin(), impl_->config.eos_token_ids.end());
    r->req = std::move(request);
    r->sink = std::move(sink);
    {
        std::lock_guard lock(impl_->mutex);
        NIBBLE_CHECK(impl_->in_flight.insert(r->req.id).second, "request id '{}' is already in flight", r->req.id);
        impl_->inbox.push_back({.kind = Command::Kind::Submit, .request = std::move(r), .id = {}, .index = 0,
                                .reason = FinishReason::Stop});
    }
    impl_->wake.notify_all();
}

void Engine::abort(const std::string& request_id) {
    impl_->push({.kind = Command::Kind::Abort, .request = nullptr, .id = request_id, .index = 0,
                 .reason = FinishReason::Abort});
}

void Engine::finish_sequence(const std::string& request_id, int index, FinishReason reason) {
    impl_->push({.kind = Command::Kind::FinishSequence, .request = nullptr, .id = request_id, .index = index,
                 .reason = reason});
}

void Engine::start() {
    std::lock_guard lock(impl_->mutex);
    if (impl_->loop.joinable()) return;
    impl_->stopping = false;
    impl_->loop = std::thread([this] { impl_->run_loop(); });
}

void Engine::stop() {
    {
        std::lock_guard lock(impl_->mutex);
        impl_->stopping = true;
    }
    impl_->wake.notify_all();
    if (impl_->loop.joinable()) impl_->loop.join();
}

bool Engine::step() { return impl_->step(); }

EngineStats Engine::stats() const {
    std::lock_guard lock(impl_->mutex);
    return impl_->stats;
}

const EngineConfig& Engine::config() const { return impl_->config; }

void Engine::check_invariants() const {
    Impl& m = *impl_;
    std::lock_guard step_lock(m.step_mutex);
    m.scheduler.check_invariants();
    for (const auto& [id, r] : m.live)
        for (const auto& s : r->seqs)
            NIBBLE_CHECK(s->status != SequenceStatus::Finished || s->block_table.empty(),
                         "invariant: finished sequence {} of request {} still holds {} blocks", s->index, id,
                         s->block_table.size());
}

}  // namespace nibble
