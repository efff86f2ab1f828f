// Tensor-parallel serving's control path on the CPU: an Engine whose runner is a TensorParallelLeader over
// rank 0 of the sharded llama forward (parallel/llama_rank.h), with rank 1 in run_tensor_parallel_follower,
// the steps crossing a real localhost StepChannel and the activations an InProcessGroup (the test double of
// NCCL). References:
//  - greedy tokens of the same requests from an Engine over the unsharded model (llama_tp_test.cpp shows the
//    sharded forward decodes the same tokens on this fixture; here the steps must also reach rank 1 intact
//    and in order, or the collectives would pair different forwards and the logits go wrong);
//  - with a runner that only records what it is asked: every call (sampling and snapshots too) arrives at the follower
//    as it was made, the leader's destructor ends the follower's loop, and a follower that has gone is
//    named by the next call, after which every call fails with the same error (the group is out of step);
//  - a follower whose forward fails mid-step: rank 0's collective fails, the engine fails the request with the
//    error, and the next request fails too.
#include <gtest/gtest.h>

#include <filesystem>
#include <future>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "base/error.h"
#include "base/thread_pool.h"
#include "checkpoint/safetensors.h"
#include "engine/engine.h"
#include "engine/tensor_parallel_leader.h"
#include "model/model.h"
#include "parallel/in_process_group.h"
#include "parallel/llama_rank.h"

namespace nibble {
namespace {

namespace fs = std::filesystem;

fs::path fixture_model(const std::string& name) {
    return fs::path(NIBBLE_SOURCE_DIR) / "tests" / "golden" / "fixtures" / name / "model";
}

StepChannelOptions leader_options(int world) {
    return {.master_addr = "127.0.0.1", .port = 0, .world_size = world, .rank = 0, .timeout_ms = 20000};
}
StepChannelOptions follower_options(int port, int world, int rank) {
    return {.master_addr = "127.0.0.1", .port = port, .world_size = world, .rank = rank, .timeout_ms = 20000};
}

EngineConfig engine_config() {
    return EngineConfig{.max_model_len = 128,
                        .max_num_seqs = 8,
                        .max_num_batched_tokens = 256,
                        .block_size = 16,
                        .num_blocks = 48,
                        .enable_prefix_caching = true,
                        .kv_cache_dtype = KvDtype::F32};
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

// Tokens and errors per request, from the engine thread.
struct Results {
    std::map<std::string, std::vector<int32_t>> tokens;
    std::map<std::string, std::string> errors;
    OutputSink sink() {
        return [this](const RequestOutput& o) {
            for (const auto& s : o.outputs) tokens[o.request_id].insert(tokens[o.request_id].end(), s.tokens.begin(), s.tokens.end());
            if (!o.error.empty()) errors[o.request_id] = o.error;
        };
    }
};

std::vector<std::vector<int32_t>> prompts(int64_t vocab) {
    std::vector<std::vector<int32_t>> out;
    for (int i = 0; i < 4; ++i) {
        std::vector<int32_t> p;
        for (int j = 0; j < 5 + 9 * i; ++j) p.push_back(static_cast<int32_t>((7 + 31 * j + 101 * i) % vocab));
        out.push_back(p);
    }
    return out;
}

void run_requests(Engine& engine, Results& results, const std::vector<std::vector<int32_t>>& ps, const std::string& tag) {
    for (size_t i = 0; i < ps.size(); ++i) engine.submit(greedy(tag + std::to_string(i), ps[i], 6), results.sink());
    for (int steps = 0; engine.step(); ++steps) ASSERT_LT(steps, 1000);
}

TEST(TensorParallelLeader, AnEngineOverTwoShardedRanksDecodesAsTheWholeModel) {
    const fs::path dir = fixture_model("llama_gqa");
    ThreadPool pool(1);
    std::unique_ptr<Model> whole = load_model(dir.string(), pool);
    const auto ps = prompts(whole->config().vocab_size);
    Results expected;
    {
        Engine engine(*whole, engine_config());
        run_requests(engine, expected, ps, "r");
    }
    ASSERT_EQ(expected.tokens.size(), ps.size());

    Results got;
    int64_t follower_steps = -1;
    InProcessGroup group(2);
    auto channel = std::make_unique<StepChannelLeader>(leader_options(2));
    const int port = channel->port();
    auto ckpt = std::make_shared<const Checkpoint>(dir.string());
    group.run([&](int r) {
        ThreadPool rank_pool(1);
        std::unique_ptr<LlamaRankModel> shard = load_llama_rank(dir.string(), ckpt, group.communicator(r), rank_pool);
        const EngineConfig ec = engine_config();
        auto runner = std::make_unique<CpuModelRunner>(*shard, ec.num_blocks, ec.block_size, ec.kv_cache_dtype);
        if (r == 0) {
            channel->accept_followers();
            Engine engine(*shard, ec, std::make_unique<TensorParallelLeader>(std::move(channel), std::move(runner)));
            run_requests(engine, got, ps, "r");
        } else {  // ends when the leader (owned by the engine) goes
            StepChannelFollower follower(follower_options(port, 2, 1));
            std::vector<float> unused;
            follower_steps = run_tensor_parallel_follower(
                follower, *runner, [&](std::span<const RunnerSequence> batch) { runner->execute(batch, unused); });
        }
    });
    EXPECT_EQ(got.errors.size(), 0u);
    EXPECT_EQ(got.tokens, expected.tokens);
    EXPECT_GE(follower_steps, 6);  // a prefill and 5 decode steps at least
}

// Records every call; execute returns logits that depend on the batch so that the leader's result is checked.
class RecordingRunner final : public ModelRunner {
public:
    std::vector<std::string> calls;
    int64_t vocab_size() const override { return 4; }
    void execute(std::span<const RunnerSequence> batch, std::vector<float>& logits) override {
        calls.push_back(describe("execute", batch));
        logits.clear();  // a row per entry with needs_logits; its maximum at (token count mod 4)
        for (const RunnerSequence& q : batch) {
            if (!q.needs_logits) continue;
            logits.resize(logits.size() + 4, 0.0f);
            logits[logits.size() - 4 + q.tokens.size() % 4] = 1.0f;
        }
    }
    void run_step(std::span<const RunnerSequence> batch) { calls.push_back(describe("step", batch)); }
    int64_t num_state_snapshots() const override { return 8; }
    void save_state_snapshot(int32_t slot, int32_t snapshot) override {
        calls.push_back("save " + std::to_string(slot) + " " + std::to_string(snapshot));
    }
    void restore_state_snapshot(int32_t snapshot, int32_t slot) override {
        calls.push_back("restore " + std::to_string(snapshot) + " " + std::to_string(slot));
    }
    static std::string describe(const std::string& what, std::span<const RunnerSequence> batch) {
        std::string s = what;
        for (const RunnerSequence& q : batch) {
            s += " [";
            for (int32_t t : q.tokens) s += std::to_string(t) + ",";
            s += "|";
            for (int32_t b : q.block_table) s += std::to_string(b) + ",";
            s += "|" + std::to_string(q.start_pos) + (q.needs_logits ? "L" : "-") + std::to_string(q.state_slot) + "]";
        }
        return s;
    }
};

TEST(TensorParallelLeader, EveryCallReachesTheFollowerAsMadeAndAGoneFollowerIsNamed) {
    auto channel = std::make_unique<StepChannelLeader>(leader_options(2));
    const int port = channel->port();
    RecordingRunner follower_runner;
    std::promise<int64_t> follower_done;
    std::thread follower([&] {
        StepChannelFollower f(follower_options(port, 2, 1));
        follower_done.set_value(run_tensor_parallel_follower(
            f, follower_runner, [&](std::span<const RunnerSequence> b) { follower_runner.run_step(b); }));
    });
    channel->accept_followers();
    auto local_owner = std::make_unique<RecordingRunner>();
    RecordingRunner& local = *local_owner;
    auto leader = std::make_unique<TensorParallelLeader>(std::move(channel), std::move(local_owner));
    EXPECT_EQ(leader->vocab_size(), 4);
    EXPECT_EQ(leader->num_state_snapshots(), 8);
    EXPECT_FALSE(leader->samples_greedy_on_device());

    const int32_t a_tokens[] = {3, 4, 5}, a_table[] = {0, 1}, b_tokens[] = {9}, b_table[] = {7};
    const RunnerSequence batch[] = {
        {.tokens = a_tokens, .block_table = a_table, .start_pos = 0, .needs_logits = true},
        {.tokens = b_tokens, .block_table = b_table, .start_pos = 40, .needs_logits = false, .state_slot = 2}};
    std::vector<float> logits;
    leader->execute(batch, logits);
    EXPECT_EQ(logits, (std::vector<float>{0, 0, 0, 1}));
    std::vector<int32_t> tokens;
    leader->execute_greedy(std::span(batch, 1), tokens);  // ModelRunner's default: argmax of execute's rows
    EXPECT_EQ(tokens, std::vector<int32_t>{3});
    const RowSampling greedy_row{.temperature = 0.0f};
    leader->execute_sample(batch, std::span(&greedy_row, 1), tokens);  // one row: the first sequence's
    EXPECT_EQ(tokens, std::vector<int32_t>{3});
    leader->save_state_snapshot(2, 5);
    leader->restore_state_snapshot(5, 1);
    EXPECT_EQ(local.calls.size(), 5u);
    EXPECT_EQ(local.calls[0], RecordingRunner::describe("execute", batch));
    EXPECT_EQ(local.calls[2], RecordingRunner::describe("execute", batch));
    leader.reset();  // sends Shutdown (and destroys `local`)
    EXPECT_EQ(follower_done.get_future().get(), 5);
    follower.join();
    const std::vector<std::string> want = {
        RecordingRunner::describe("step", batch), RecordingRunner::describe("step", std::span(batch, 1)),
        RecordingRunner::describe("step", batch), "save 2 5", "restore 5 1"};
    EXPECT_EQ(follower_runner.calls, want);

    // A follower that has gone (closed after one step): the next call names it and runs nothing locally.
    channel = std::make_unique<StepChannelLeader>(leader_options(2));
    const int port2 = channel->port();
    std::promise<void> gone;
    std::thread quitter([&] {
        {
            StepChannelFollower f(follower_options(port2, 2, 1));
            std::vector<uint8_t> m;
            EXPECT_TRUE(f.receive(m));
        }
        gone.set_value();
    });
    channel->accept_followers();
    auto second_owner = std::make_unique<RecordingRunner>();
    RecordingRunner& second = *second_owner;
    TensorParallelLeader leader2(std::move(channel), std::move(second_owner));
    leader2.execute(batch, logits);
    gone.get_future().wait();
    quitter.join();
    std::this_thread::sleep_for(std::chrono::milliseconds(50));  // the FIN crosses loopback
    std::string first;
    try {
        leader2.execute(batch, logits);
        ADD_FAILURE() << "no exception";
    } catch (const Error& e) {
        first = e.what();
    }
    EXPECT_NE(first.find("rank 1 has closed its connection"), std::string::npos) << first;
    EXPECT_NE(first.find("out of step"), std::string::npos) << first;
    EXPECT_EQ(second.calls.size(), 1u);  // the failed step did not run on rank 0
    try {
        leader2.save_state_snapshot(0, 0);
        ADD_FAILURE() << "no exception";
    } catch (const Error& e) {
        EXPECT_EQ(std::string(e.what()), first);
    }
}

TEST(TensorParallelLeader, AFollowerFailingMidStepFailsTheRequestsWithTheError) {
    const fs::path dir = fixture_model("llama_gqa");
    const int64_t vocab = 512;
    Results got;
    InProcessGroup group(2);
    auto channel = std::make_unique<StepChannelLeader>(leader_options(2));
    const int port = channel->port();
    auto ckpt = std::make_shared<const Checkpoint>(dir.string());
    try {
        group.run([&](int r) {
            ThreadPool rank_pool(1);
            std::unique_ptr<LlamaRankModel> shard = load_llama_rank(dir.string(), ckpt, group.communicator(r), rank_pool);
            const EngineConfig ec = engine_config();
            auto runner = std::make_unique<CpuModelRunner>(*shard, ec.num_blocks, ec.block_size, ec.kv_cache_dtype);
            if (r == 0) {
                channel->accept_followers();
                Engine engine(*shard, ec, std::make_unique<TensorParallelLeader>(std::move(channel), std::move(runner)));
                run_requests(engine, got, {prompts(vocab)[0]}, "first");
                run_requests(engine, got, {prompts(vocab)[1]}, "second");
            } else {
                StepChannelFollower follower(follower_options(port, 2, 1));
                std::vector<float> unused;
                int steps = 0;
                run_tensor_parallel_follower(follower, *runner, [&](std::span<const RunnerSequence> batch) {
                    if (++steps == 3) fail("rank 1: out of device memory (simulated)");
                    runner->execute(batch, unused);
                });
            }
        });
        ADD_FAILURE() << "the follower's failure should end the group's run";
    } catch (const Error& e) {
        EXPECT_NE(std::string(e.what()).find("simulated"), std::string::npos) << e.what();
    }
    // The first request's third step failed on rank 0 in the collective its follower never joined.
    EXPECT_NE(got.errors["first0"].find("tensor-parallel group out of step"), std::string::npos) << got.errors["first0"];
    EXPECT_NE(got.errors["second0"].find("tensor-parallel group out of step"), std::string::npos) << got.errors["second0"];
    EXPECT_EQ(got.tokens["first0"].size(), 2u);  // the prefill's token and one decode step's
}

}  // namespace
}  // namespace nibble
