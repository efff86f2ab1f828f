#include "gpu/tensor_parallel_runner.h"

#include "engine/tensor_parallel_leader.h"

namespace nibble::gpu {

std::unique_ptr<NcclCommunicator> join_tensor_parallel_group(CudaModelRunner& runner, const NcclBootstrap& bootstrap) {
    auto comm = std::make_unique<NcclCommunicator>(bootstrap, runner.stream());
    runner.set_communicator(comm.get());
    return comm;
}

std::unique_ptr<ModelRunner> make_tensor_parallel_leader(std::unique_ptr<StepChannelLeader> channel,
                                                         std::unique_ptr<CudaModelRunner> runner,
                                                         std::unique_ptr<NcclCommunicator> comm) {
    return std::make_unique<TensorParallelLeader>(std::move(channel), std::move(runner), std::move(comm));
}

int64_t run_tensor_parallel_follower(CudaModelRunner& runner, StepChannelFollower& channel) {
    return nibble::run_tensor_parallel_follower(channel, runner,
                                                [&](std::span<const RunnerSequence> batch) { runner.run_step(batch); });
}

}  // namespace nibble::gpu
