#include "parallel/in_process_group.h"

#include <cstring>
#include <thread>

#include "base/error.h"
#include "tensor/float_formats.h"

namespace nibble {

namespace {

float load(const void* data, DType dtype, int64_t i) {
    if (dtype == DType::F32) return static_cast<const float*>(data)[i];
    return bf16_to_float(static_cast<const uint16_t*>(data)[i]);
}

void check_dtype(DType dtype, const char* what) {
    NIBBLE_CHECK(dtype == DType::F32 || dtype == DType::BF16, "{}: dtype {} is not supported (F32 or BF16)", what,
                 dtype_name(dtype));
}

}  // namespace

class InProcessGroup::Rank final : public Communicator {
public:
    Rank(InProcessGroup& group, int rank) : group_(group), rank_(rank) {}
    int rank() const override { return rank_; }
    int world_size() const override { return group_.world_size_; }

    void all_reduce_sum(void* data, int64_t count, DType dtype) override {
        check_dtype(dtype, "all_reduce_sum");
        group_.slots_[static_cast<size_t>(rank_)] = data;
        group_.sync();
        // Every rank sums all buffers in rank order into its own copy; nobody writes until all have read.
        std::vector<float> sum(static_cast<size_t>(count), 0.0f);
        for (const void* slot : group_.slots_)
            for (int64_t i = 0; i < count; ++i) sum[static_cast<size_t>(i)] += load(slot, dtype, i);
        group_.sync();
        if (dtype == DType::F32) {
            std::memcpy(data, sum.data(), sum.size() * sizeof(float));
        } else {
            auto* out = static_cast<uint16_t*>(data);
            for (int64_t i = 0; i < count; ++i) out[i] = bf16_from_float(sum[static_cast<size_t>(i)]);
        }
    }

    void all_gather(const void* send, int64_t count, DType dtype, void* recv) override {
        check_dtype(dtype, "all_gather");
        group_.slots_[static_cast<size_t>(rank_)] = send;
        group_.sync();
        const size_t bytes = static_cast<size_t>(count) * dtype_size(dtype);
        for (size_t r = 0; r < group_.slots_.size(); ++r)
            std::memcpy(static_cast<uint8_t*>(recv) + r * bytes, group_.slots_[r], bytes);
        group_.sync();  // senders may reuse their buffers only once everyone has copied
    }

private:
    InProcessGroup& group_;
    int rank_;
};

InProcessGroup::InProcessGroup(int world_size)
    : world_size_(world_size), barrier_(world_size > 0 ? world_size : 1), slots_(static_cast<size_t>(std::max(world_size, 0))) {
    NIBBLE_CHECK(world_size >= 1, "an in-process group needs at least one rank, got {}", world_size);
    for (int r = 0; r < world_size; ++r) ranks_.push_back(std::make_unique<Rank>(*this, r));
}

InProcessGroup::~InProcessGroup() = default;

Communicator& InProcessGroup::communicator(int rank) {
    NIBBLE_CHECK(rank >= 0 && rank < world_size_, "rank {} is outside the group of {}", rank, world_size_);
    return *ranks_[static_cast<size_t>(rank)];
}

void InProcessGroup::sync() {
    barrier_.arrive_and_wait();
    NIBBLE_CHECK(!failed_.load(), "another tensor-parallel rank failed");
}

void InProcessGroup::run(const std::function<void(int rank)>& body) {
    NIBBLE_CHECK(!failed_.load(), "this in-process group already failed; make a new one");
    std::vector<std::thread> threads;
    for (int r = 0; r < world_size_; ++r) {
        threads.emplace_back([this, r, &body] {
            try {
                body(r);
            } catch (...) {
                {
                    std::lock_guard lock(error_mutex_);
                    if (!error_) error_ = std::current_exception();
                }
                failed_ = true;
                // Leave the barrier for good, so ranks waiting in a collective wake and see the failure.
                barrier_.arrive_and_drop();
            }
        });
    }
    for (auto& t : threads) t.join();
    if (error_) std::rethrow_exception(error_);
}

}  // namespace nibble
