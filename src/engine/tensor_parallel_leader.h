// Serving one model over a tensor-parallel group of processes: rank 0 runs the engine, whose ModelRunner is a
// TensorParallelLeader; every other rank runs run_tensor_parallel_follower. Each runner call on rank 0 is
// first sent to every follower (engine/runner_step.h over parallel/step_channel.h), then run on rank 0's own
// runner, so every rank runs the same forwards in the same order and their collectives match. Backend-neutral:
// the CUDA backend wires its runner and NCCL communicator in (gpu/tensor_parallel_runner.h); the CPU tests
// drive the sharded CPU forward (parallel/llama_rank.h) through it.
//
// Once a step has failed (a follower gone, or rank 0's own forward throwing after the followers were told to
// run it) the ranks are out of step for good: every later call fails with the first error, which the engine
// hands to the requests. Restarting the server is the way back.
#pragma once

#include <functional>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "engine/model_runner.h"
#include "parallel/communicator.h"
#include "parallel/step_channel.h"

namespace nibble {

class TensorParallelLeader final : public ModelRunner {
public:
    // local: rank 0's runner over its shard, with its communicator already set. comm (may be null: a test's
    // group owns its own) is kept alive until after `local` is destroyed.
    TensorParallelLeader(std::unique_ptr<StepChannelLeader> channel, std::unique_ptr<ModelRunner> local,
                         std::unique_ptr<Communicator> comm = nullptr);
    // Tells the followers to stop (a failure to is logged, not thrown), then releases the runner and the
    // communicator, in that order (a broken group's communicator is not destroyed: its peers may be gone).
    ~TensorParallelLeader() override;
    TensorParallelLeader(const TensorParallelLeader&) = delete;
    TensorParallelLeader& operator=(const TensorParallelLeader&) = delete;

    int64_t vocab_size() const override { return local_->vocab_size(); }
    void execute(std::span<const RunnerSequence> batch, std::vector<float>& logits) override;
    bool samples_greedy_on_device() const override { return local_->samples_greedy_on_device(); }
    void execute_greedy(std::span<const RunnerSequence> batch, std::vector<int32_t>& tokens) override;
    bool samples_on_device() const override { return local_->samples_on_device(); }
    // The followers run the forward only (sampling is rank 0's alone): they get an Execute step.
    void execute_sample(std::span<const RunnerSequence> batch, std::span<const RowSampling> rows,
                        std::vector<int32_t>& tokens) override;
    int64_t num_state_snapshots() const override { return local_->num_state_snapshots(); }
    void save_state_snapshot(int32_t state_slot, int32_t snapshot) override;
    void restore_state_snapshot(int32_t snapshot, int32_t state_slot) override;

    ModelRunner& local() { return *local_; }

private:
    // Broadcasts the encoded step in bytes_, then runs `run` locally; any failure breaks the group.
    void step(const std::function<void()>& run);

    std::unique_ptr<StepChannelLeader> channel_;
    std::unique_ptr<Communicator> comm_;  // declared before local_: destroyed after it
    std::unique_ptr<ModelRunner> local_;
    std::vector<uint8_t> bytes_;  // the step being sent (capacity reused)
    std::string broken_;          // the first failure, "" while the group is in step
};

// A follower's forward of one step: the same forward rank 0 runs (its result is not wanted here).
using FollowerForward = std::function<void(std::span<const RunnerSequence> batch)>;

// Runs a follower until rank 0 sends Shutdown or closes the channel (both a clean return). Execute and
// ExecuteGreedy steps run `forward`; snapshot steps go to `runner`. Returns the number of steps run. Throws on
// a malformed step or a failed forward (the process should exit then: the group is out of step).
int64_t run_tensor_parallel_follower(StepChannelFollower& channel, ModelRunner& runner, const FollowerForward& forward);

}  // namespace nibble
