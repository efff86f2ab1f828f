#include "parallel/parallel_options.h"

#include <fmt/format.h>

#include <vector>

#include "base/error.h"

namespace nibble {

void check_parallel_options(const ParallelOptions& o) {
    std::vector<std::string> problems;
    if (o.tensor_parallel_size < 1)
        problems.push_back(fmt::format("--tensor-parallel-size must be at least 1, got {}", o.tensor_parallel_size));
    if (o.nnodes < 1) problems.push_back(fmt::format("--nnodes must be at least 1, got {}", o.nnodes));
    if (o.nnodes >= 1 && (o.node_rank < 0 || o.node_rank >= o.nnodes))
        problems.push_back(fmt::format("--node-rank must be in [0, {}) (--nnodes {}), got {}", o.nnodes, o.nnodes,
                                       o.node_rank));
    if (o.nnodes >= 1 && o.tensor_parallel_size >= 1 && o.tensor_parallel_size % o.nnodes != 0)
        problems.push_back(fmt::format("--tensor-parallel-size {} must be a multiple of --nnodes {} (every node runs "
                                       "the same number of GPUs)",
                                       o.tensor_parallel_size, o.nnodes));
    if (o.master_port < 1 || o.master_port > 65535)
        problems.push_back(fmt::format("--master-port must be in [1, 65535], got {}", o.master_port));
    if (o.master_addr.empty()) problems.push_back("--master-addr must not be empty");
    NIBBLE_CHECK(problems.empty(), "{}", fmt::join(problems, "; "));
}

}  // namespace nibble
