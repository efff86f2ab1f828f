#include "engine/runner_step.h"

#include <cstring>

#include "base/error.h"

namespace nibble {

namespace {

constexpr char kMagic[4] = {'N', 'B', 'R', 'S'};
constexpr uint32_t kVersion = 1;

template <class T>
void put(std::vector<uint8_t>& out, const T& value) {
    const size_t at = out.size();
    out.resize(at + sizeof value);
    std::memcpy(out.data() + at, &value, sizeof value);
}

void put_ids(std::vector<uint8_t>& out, std::span<const int32_t> ids) {
    const size_t at = out.size();
    out.resize(at + ids.size_bytes());
    if (!ids.empty()) std::memcpy(out.data() + at, ids.data(), ids.size_bytes());
}

bool is_execute(RunnerCall call) { return call == RunnerCall::Execute || call == RunnerCall::ExecuteGreedy; }
bool is_snapshot(RunnerCall call) {
    return call == RunnerCall::SaveStateSnapshot || call == RunnerCall::RestoreStateSnapshot;
}

// Reads fixed-size values off the front of the bytes, failing with what it was reading when they run out.
class Reader {
public:
    explicit Reader(std::span<const uint8_t> bytes) : bytes_(bytes) {}

    template <class T>
    T get(const char* what) {
        need(sizeof(T), what);
        T value;
        std::memcpy(&value, bytes_.data() + at_, sizeof value);
        at_ += sizeof value;
        return value;
    }
    void get_ids(int32_t* dst, size_t n, const char* what, size_t seq) {
        const size_t bytes = n * sizeof(int32_t);
        if (bytes_.size() - at_ < bytes)
            fail("runner step: truncated: sequence {}'s {} need {} bytes, {} left", seq, what, bytes, bytes_.size() - at_);
        if (n > 0) std::memcpy(dst, bytes_.data() + at_, bytes);
        at_ += bytes;
    }
    size_t left() const { return bytes_.size() - at_; }

private:
    void need(size_t n, const char* what) {
        if (bytes_.size() - at_ < n)
            fail("runner step: truncated: {} bytes in all, {} needs {} at offset {}", bytes_.size(), what, n, at_);
    }
    std::span<const uint8_t> bytes_;
    size_t at_ = 0;
};

// Each sequence's fixed fields: start_pos, state_slot, needs_logits, n_tokens, n_blocks.
constexpr size_t kSequenceHeaderBytes = sizeof(int64_t) + sizeof(int32_t) + 3 * sizeof(uint32_t);

}  // namespace

std::string_view runner_call_name(RunnerCall call) {
    switch (call) {
        case RunnerCall::Execute: return "execute";
        case RunnerCall::ExecuteGreedy: return "execute_greedy";
        case RunnerCall::SaveStateSnapshot: return "save_state_snapshot";
        case RunnerCall::RestoreStateSnapshot: return "restore_state_snapshot";
        case RunnerCall::Shutdown: return "shutdown";
    }
    return "unknown";
}

void encode_runner_step(RunnerCall call, std::span<const RunnerSequence> batch, int32_t state_slot, int32_t snapshot,
                        std::vector<uint8_t>& out) {
    NIBBLE_CHECK(is_execute(call) || batch.empty(), "runner step: {} carries no batch", runner_call_name(call));
    out.resize(sizeof kMagic);
    std::memcpy(out.data(), kMagic, sizeof kMagic);
    put(out, kVersion);
    put(out, static_cast<uint32_t>(call));
    put(out, state_slot);
    put(out, snapshot);
    put(out, static_cast<uint32_t>(batch.size()));
    for (const RunnerSequence& s : batch) {
        NIBBLE_CHECK(s.tokens.size() <= UINT32_MAX && s.block_table.size() <= UINT32_MAX,
                     "runner step: a sequence of {} tokens and {} blocks does not fit the wire format", s.tokens.size(),
                     s.block_table.size());
        put(out, s.start_pos);
        put(out, s.state_slot);
        put(out, static_cast<uint32_t>(s.needs_logits ? 1 : 0));
        put(out, static_cast<uint32_t>(s.tokens.size()));
        put(out, static_cast<uint32_t>(s.block_table.size()));
        put_ids(out, s.tokens);
        put_ids(out, s.block_table);
    }
}

RunnerStep decode_runner_step(std::span<const uint8_t> bytes) {
    Reader in(bytes);
    char magic[4];
    for (char& c : magic) c = static_cast<char>(in.get<uint8_t>("the magic"));
    NIBBLE_CHECK(std::memcmp(magic, kMagic, sizeof kMagic) == 0, "runner step: bad magic (not a runner step)");
    const uint32_t version = in.get<uint32_t>("the version");
    NIBBLE_CHECK(version == kVersion, "runner step: version {}, this build reads {} (every rank must run the same build)",
                 version, kVersion);
    RunnerStep step;
    const uint32_t call = in.get<uint32_t>("the call");
    NIBBLE_CHECK(call >= static_cast<uint32_t>(RunnerCall::Execute) && call <= static_cast<uint32_t>(RunnerCall::Shutdown),
                 "runner step: unknown call {}", call);
    step.call = static_cast<RunnerCall>(call);
    step.state_slot = in.get<int32_t>("the state slot");
    step.snapshot = in.get<int32_t>("the snapshot");
    const uint32_t n_seqs = in.get<uint32_t>("the sequence count");
    NIBBLE_CHECK(is_execute(step.call) || n_seqs == 0, "runner step: {} with a batch of {} sequences",
                 runner_call_name(step.call), n_seqs);
    NIBBLE_CHECK(!is_snapshot(step.call) || (step.state_slot >= 0 && step.snapshot >= 0),
                 "runner step: {} of state slot {} and snapshot {}", runner_call_name(step.call), step.state_slot,
                 step.snapshot);
    // Each sequence takes at least its header: a count beyond that is corrupt (and must not size anything).
    NIBBLE_CHECK(n_seqs <= in.left() / kSequenceHeaderBytes,
                 "runner step: truncated: {} sequences announced, {} bytes left", n_seqs, in.left());

    struct Extent {
        size_t tokens_at, n_tokens, blocks_at, n_blocks;
    };
    std::vector<Extent> extents(n_seqs);
    step.batch.resize(n_seqs);
    // ids never holds more int32s than the bytes left: one allocation.
    step.ids.reserve(in.left() / sizeof(int32_t));
    for (uint32_t i = 0; i < n_seqs; ++i) {
        RunnerSequence& s = step.batch[i];
        s.start_pos = in.get<int64_t>("a sequence's start_pos");
        NIBBLE_CHECK(s.start_pos >= 0, "runner step: sequence {} has start_pos {}", i, s.start_pos);
        s.state_slot = in.get<int32_t>("a sequence's state_slot");
        const uint32_t needs_logits = in.get<uint32_t>("a sequence's needs_logits");
        NIBBLE_CHECK(needs_logits <= 1, "runner step: sequence {} has needs_logits {} (0 or 1)", i, needs_logits);
        s.needs_logits = needs_logits == 1;
        const uint32_t n_tokens = in.get<uint32_t>("a sequence's token count");
        const uint32_t n_blocks = in.get<uint32_t>("a sequence's block count");
        Extent& e = extents[i];
        e.tokens_at = step.ids.size();
        e.n_tokens = n_tokens;
        // Checked before resizing: a corrupt count must not allocate.
        NIBBLE_CHECK(uint64_t{n_tokens} + n_blocks <= in.left() / sizeof(int32_t),
                     "runner step: truncated: sequence {} announces {} tokens and {} blocks, {} bytes left", i, n_tokens,
                     n_blocks, in.left());
        step.ids.resize(e.tokens_at + n_tokens);
        in.get_ids(step.ids.data() + e.tokens_at, n_tokens, "tokens", i);
        e.blocks_at = step.ids.size();
        e.n_blocks = n_blocks;
        step.ids.resize(e.blocks_at + n_blocks);
        in.get_ids(step.ids.data() + e.blocks_at, n_blocks, "block table", i);
    }
    NIBBLE_CHECK(in.left() == 0, "runner step: {} bytes left over after {} sequences", in.left(), n_seqs);
    const std::span<const int32_t> ids(step.ids);
    for (uint32_t i = 0; i < n_seqs; ++i) {
        step.batch[i].tokens = ids.subspan(extents[i].tokens_at, extents[i].n_tokens);
        step.batch[i].block_table = ids.subspan(extents[i].blocks_at, extents[i].n_blocks);
    }
    return step;
}

}  // namespace nibble
