#include "base/thread_pool.h"

#include <algorithm>

namespace nibble {

ThreadPool::ThreadPool(size_t n_threads) {
    if (n_threads == 0) n_threads = std::max<size_t>(1, std::thread::hardware_concurrency());
    for (size_t i = 1; i < n_threads; ++i) workers_.emplace_back([this] { worker_loop(); });
}

ThreadPool::~ThreadPool() {
    {
        std::lock_guard lock(mutex_);
        stop_ = true;
    }
    wake_.notify_all();
    for (auto& t : workers_) t.join();
}

// Takes chunks of the current job until none remain. `lock` holds mutex_ on entry and on return.
void ThreadPool::run_chunks(std::unique_lock<std::mutex>& lock) {
    while (body_ != nullptr && next_ < n_) {
        size_t begin = next_;
        size_t end = std::min(n_, begin + chunk_);
        next_ = end;
        ++pending_;
        const auto* body = body_;
        lock.unlock();
        std::exception_ptr err;
        try {
            (*body)(begin, end);
        } catch (...) {
            err = std::current_exception();
        }
        lock.lock();
        if (err && !error_) error_ = err;
        if (--pending_ == 0 && next_ >= n_) done_.notify_all();
    }
}

void ThreadPool::worker_loop() {
    std::unique_lock lock(mutex_);
    while (true) {
        wake_.wait(lock, [&] { return stop_ || (body_ != nullptr && next_ < n_); });
        if (stop_) return;
        run_chunks(lock);
    }
}

void ThreadPool::parallel_for(size_t n, size_t grain, const std::function<void(size_t, size_t)>& body) {
    if (n == 0) return;
    grain = std::max<size_t>(1, grain);
    size_t n_chunks = std::min(std::max<size_t>(1, n / grain), size() * 4);
    if (workers_.empty() || n_chunks <= 1) {
        body(0, n);
        return;
    }
    std::unique_lock lock(mutex_);
    body_ = &body;
    n_ = n;
    chunk_ = (n + n_chunks - 1) / n_chunks;
    next_ = 0;
    pending_ = 0;
    error_ = nullptr;
    wake_.notify_all();
    run_chunks(lock);
    done_.wait(lock, [&] { return next_ >= n_ && pending_ == 0; });
    body_ = nullptr;
    auto err = error_;
    error_ = nullptr;
    lock.unlock();
    if (err) std::rethrow_exception(err);
}

}  // namespace nibble
