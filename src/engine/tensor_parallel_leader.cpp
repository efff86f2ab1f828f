#include "engine/tensor_parallel_leader.h"

#include "base/error.h"
#include "base/log.h"
#include "engine/runner_step.h"

namespace nibble {

TensorParallelLeader::TensorParallelLeader(std::unique_ptr<StepChannelLeader> channel, std::unique_ptr<ModelRunner> local,
                                           std::unique_ptr<Communicator> comm)
    : channel_(std::move(channel)), comm_(std::move(comm)), local_(std::move(local)) {
    NIBBLE_CHECK(channel_ != nullptr && local_ != nullptr, "TensorParallelLeader: a channel and a local runner are needed");
}

TensorParallelLeader::~TensorParallelLeader() {
    if (broken_.empty()) {
        try {
            encode_runner_step(RunnerCall::Shutdown, {}, -1, -1, bytes_);
            channel_->broadcast(bytes_);
        } catch (const std::exception& e) {
            log::warn("tensor parallel: could not tell every rank to stop: {}", e.what());
        }
    }
    local_.reset();
    // A broken group's communicator is left to the process's exit: destroying it may wait for a rank that is
    // gone (NCCL's teardown talks to its peers).
    if (!broken_.empty()) (void)comm_.release();
    comm_.reset();
}

void TensorParallelLeader::step(const std::function<void()>& run) {
    NIBBLE_CHECK(broken_.empty(), "{}", broken_);
    try {
        channel_->broadcast(bytes_);
        run();
    } catch (const std::exception& e) {
        broken_ = std::string("tensor-parallel group out of step (restart nibble serve): ") + e.what();
        log::error("{}", broken_);
        throw Error(broken_);
    }
}

void TensorParallelLeader::execute(std::span<const RunnerSequence> batch, std::vector<float>& logits) {
    encode_runner_step(RunnerCall::Execute, batch, -1, -1, bytes_);
    step([&] { local_->execute(batch, logits); });
}

void TensorParallelLeader::execute_greedy(std::span<const RunnerSequence> batch, std::vector<int32_t>& tokens) {
    encode_runner_step(RunnerCall::ExecuteGreedy, batch, -1, -1, bytes_);
    step([&] { local_->execute_greedy(batch, tokens); });
}

void TensorParallelLeader::execute_sample(std::span<const RunnerSequence> batch, std::span<const RowSampling> rows,
                                          std::vector<int32_t>& tokens) {
    encode_runner_step(RunnerCall::Execute, batch, -1, -1, bytes_);
    step([&] { local_->execute_sample(batch, rows, tokens); });
}

void TensorParallelLeader::save_state_snapshot(int32_t state_slot, int32_t snapshot) {
    encode_runner_step(RunnerCall::SaveStateSnapshot, {}, state_slot, snapshot, bytes_);
    step([&] { local_->save_state_snapshot(state_slot, snapshot); });
}

void TensorParallelLeader::restore_state_snapshot(int32_t snapshot, int32_t state_slot) {
    encode_runner_step(RunnerCall::RestoreStateSnapshot, {}, state_slot, snapshot, bytes_);
    step([&] { local_->restore_state_snapshot(snapshot, state_slot); });
}

int64_t run_tensor_parallel_follower(StepChannelFollower& channel, ModelRunner& runner, const FollowerForward& forward) {
    std::vector<uint8_t> bytes;
    int64_t steps = 0;
    while (channel.receive(bytes)) {
        RunnerStep s = decode_runner_step(bytes);
        switch (s.call) {
            case RunnerCall::Execute:
            case RunnerCall::ExecuteGreedy: forward(s.batch); break;
            case RunnerCall::SaveStateSnapshot: runner.save_state_snapshot(s.state_slot, s.snapshot); break;
            case RunnerCall::RestoreStateSnapshot: runner.restore_state_snapshot(s.snapshot, s.state_slot); break;
            case RunnerCall::Shutdown: return steps;
        }
        ++steps;
    }
    log::info("tensor parallel: rank {}: rank 0 closed the step channel; stopping", channel.rank());
    return steps;
}

}  // namespace nibble
