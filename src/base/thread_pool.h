// A fixed pool of worker threads for data-parallel loops on the CPU backend. Owned by whoever builds the
// backend (no global pool). parallel_for blocks until every chunk has run; the calling thread works too.
#pragma once

#include <condition_variable>
#include <cstddef>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace nibble {

class ThreadPool {
public:
    // n_threads == 0 means std::thread::hardware_concurrency().
    explicit ThreadPool(size_t n_threads = 0);
    ~ThreadPool();
    ThreadPool(const ThreadPool&) = delete;
    ThreadPool& operator=(const ThreadPool&) = delete;

    size_t size() const { return workers_.size() + 1; }

    // Calls body(begin, end) over disjoint chunks covering [0, n), at least `grain` items per chunk.
    // The first exception thrown by a chunk is rethrown here after all chunks finish.
    void parallel_for(size_t n, size_t grain, const std::function<void(size_t, size_t)>& body);

private:
    void worker_loop();
    void run_chunks(std::unique_lock<std::mutex>& lock);

    std::vector<std::thread> workers_;
    std::mutex mutex_;
    std::condition_variable wake_;
    std::condition_variable done_;
    // The job in flight (guarded by mutex_).
    const std::function<void(size_t, size_t)>* body_ = nullptr;
    size_t n_ = 0, chunk_ = 0, next_ = 0, pending_ = 0;
    bool stop_ = false;
    std::exception_ptr error_;
};

}  // namespace nibble
