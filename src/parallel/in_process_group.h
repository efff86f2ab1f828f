// N tensor-parallel ranks in one process, one thread each, exchanging host buffers through shared memory:
// the test double of the NCCL communicator, so the sharded forward can be checked against the unsharded one
// on the CPU. Not a transport for serving.
#pragma once

#include <atomic>
#include <barrier>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <vector>

#include "parallel/communicator.h"

namespace nibble {

class InProcessGroup {
public:
    explicit InProcessGroup(int world_size);
    ~InProcessGroup();
    InProcessGroup(const InProcessGroup&) = delete;
    InProcessGroup& operator=(const InProcessGroup&) = delete;

    int world_size() const { return world_size_; }
    // Rank r's communicator; its collectives may be called only from inside run().
    Communicator& communicator(int rank);

    // Runs body(rank) for every rank at once, one thread each, and waits for all. When a rank throws, the
    // others' collectives throw too (instead of waiting forever) and the first exception is rethrown here.
    void run(const std::function<void(int rank)>& body);

private:
    class Rank;
    friend class Rank;
    // Waits for every live rank; throws when a rank has failed.
    void sync();

    int world_size_;
    std::barrier<> barrier_;
    std::vector<std::unique_ptr<Rank>> ranks_;
    std::vector<const void*> slots_;  // [world_size] each rank's buffer during a collective
    std::atomic<bool> failed_{false};
    std::mutex error_mutex_;
    std::exception_ptr error_;
};

}  // namespace nibble
