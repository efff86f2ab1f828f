// `nibble serve --tensor-parallel-size N`: one process per GPU, all started by serve itself. On node 0 the
// serve process is global rank 0: it starts local ranks 1 .. g-1 (g = GPUs per node) as child processes of
// the same executable (the same arguments plus the hidden --tp-local-rank R; each uses GPU R), loads the
// model, uploads its own shard, decides the memory plan and hands it to every other rank over the step
// channel (parallel/step_channel.h, --master-port + 1), joins NCCL, and serves HTTP with a
// TensorParallelLeader as the engine's runner (engine/tensor_parallel_leader.h). On a node with
// --node-rank > 0 every GPU is a follower: local rank 0 is the serve process itself (started by hand with the
// same flags), the others its children; no HTTP there.
//
// A follower: sets its GPU first, connects to rank 0's step channel, loads the model (the mmap is shared
// through the page cache), uploads its shard, takes rank 0's setup (KV blocks, batch limits, cache dtype:
// rank 0 decides, followers obey), builds its runner, answers ready (or the error that stopped it), joins
// NCCL, and runs each step rank 0 sends until rank 0 stops or goes.
//
// Failure: rank 0 waits for the followers with a timeout, and stops at once, naming the rank, when a child
// exits or a follower answers with an error. Children die with the serve process (PR_SET_PDEATHSIG). A
// rank that fails while serving breaks the group: the next step fails (engine/tensor_parallel_leader.h).
// Only the llama family and Qwen3-MoE (experts by id) are split (parallel/tensor_parallel.h
// check_tensor_parallel); CPU-only builds and --device cpu refuse tensor-parallel sizes above 1.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "engine/memory_plan.h"
#include "engine/model_runner.h"
#include "model/model.h"
#include "parallel/step_channel.h"
#include "server/serve_args.h"
#include "tune/tune_cache.h"

namespace nibble::cli {

// Before anything loads: throws a clear error when this build or --device cannot run o's tensor-parallel
// size (a CPU-only build; --device cpu). Nothing for size 1.
void check_tensor_parallel_serving(const server::ServeOptions& o);

// Whether this serve process is a follower rank (a child started for a local GPU, or any process of a node
// other than 0): it runs run_tensor_parallel_follower_process instead of serving.
bool is_tensor_parallel_follower(const server::ServeOptions& o);

// The command line of local rank R's process: PROGRAM --log-level LEVEL serve SERVE_ARGS --tp-local-rank R.
std::vector<std::string> local_rank_command(const std::string& program, const std::string& log_level,
                                            const std::vector<std::string>& serve_args, int64_t local_rank);

// This node's local ranks 1 .. gpus_per_node-1 as child processes. Each dies with this process
// (PR_SET_PDEATHSIG; it exits at once if this process is already gone) and ignores SIGINT (the terminal's
// Ctrl-C reaches the whole process group; rank 0 stops the children in order). Waits for them when destroyed
// (they end once rank 0 stops), killing any still running after a grace period, at once when unwinding an
// error.
class LocalRankProcesses {
public:
    // serve_args: the arguments `nibble serve` was given (passed on by local_rank_command to this executable).
    LocalRankProcesses(const std::vector<std::string>& serve_args, int64_t gpus_per_node);
    // The general form (tests): child i (local rank i + 1) executes exec_path with argv commands[i].
    LocalRankProcesses(const std::string& exec_path, const std::vector<std::vector<std::string>>& commands);
    ~LocalRankProcesses();
    LocalRankProcesses(const LocalRankProcesses&) = delete;
    LocalRankProcesses& operator=(const LocalRankProcesses&) = delete;

    // Throws naming the first child that has exited (its local rank, pid and status). For waits on them.
    void check_alive();

private:
    struct Child {
        int64_t local_rank = 0;
        pid_t pid = -1;
        bool exited = false;
        int status = 0;
    };
    std::vector<Child> children_;
};

// Rank 0 of a tensor-parallel serve (node 0, local GPU 0): its children and the step channel, bound at once
// so that followers may connect while everyone loads.
class TensorParallelRank0 {
public:
    TensorParallelRank0(const server::ServeOptions& o, const std::vector<std::string>& serve_args);
    ~TensorParallelRank0();

    // The engine's runner: uploads rank 0's shard, waits for every follower, sends each the plan, builds the
    // local CUDA runner (kernel choices from tune_cache, may be null), joins NCCL and returns the
    // TensorParallelLeader. Throws naming a failed rank.
    std::unique_ptr<ModelRunner> make_runner(Model& model, const MemoryPlan& plan, int64_t max_model_len,
                                             const tune::TuneCache* tune_cache);

private:
    server::ServeOptions options_;
    LocalRankProcesses children_;                 // destroyed after the channel: they end when it closes
    std::unique_ptr<StepChannelLeader> channel_;  // handed to the leader by make_runner
};

// The whole life of a follower process (see above); returns when rank 0 has stopped.
void run_tensor_parallel_follower_process(const server::ServeOptions& o, const std::vector<std::string>& serve_args);

}  // namespace nibble::cli
