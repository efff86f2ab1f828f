// The CUDA backend in a tensor-parallel serving group (engine/tensor_parallel_leader.h has the protocol): a
// CudaModelRunner over a rank's shard joins the group's NCCL communicator, and becomes rank 0's
// TensorParallelLeader or runs a follower's loop, whose steps are CudaModelRunner::run_step.
#pragma once

#include <cstdint>
#include <memory>

#include "engine/model_runner.h"
#include "gpu/cuda_model_runner.h"
#include "parallel/nccl_communicator.h"
#include "parallel/step_channel.h"

namespace nibble::gpu {

// Joins NCCL (collective over every rank: all must call it) with the collectives on runner.stream(), and sets
// the communicator on the runner. The runner must not run a step after the communicator is destroyed.
std::unique_ptr<NcclCommunicator> join_tensor_parallel_group(CudaModelRunner& runner, const NcclBootstrap& bootstrap);

// Rank 0: the engine's runner. Each call goes to the followers, then to `runner`; the communicator is
// released after the runner.
std::unique_ptr<ModelRunner> make_tensor_parallel_leader(std::unique_ptr<StepChannelLeader> channel,
                                                         std::unique_ptr<CudaModelRunner> runner,
                                                         std::unique_ptr<NcclCommunicator> comm);

// Another rank: runs rank 0's steps on `runner` until rank 0 stops or goes. Returns the steps run.
int64_t run_tensor_parallel_follower(CudaModelRunner& runner, StepChannelFollower& channel);

}  // namespace nibble::gpu
