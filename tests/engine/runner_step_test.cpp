// The runner-step codec: every field of random batches survives encode -> decode (spans over the decoded
// step's own storage, still valid after a move), snapshot and shutdown calls too; and bytes that are not a
// step are refused with an error naming what is wrong: bad magic, another version, an unknown call, every
// truncation of a valid message, left-over bytes, needs_logits other than 0/1, absurd counts, a batch on a
// call that takes none.
#include <gtest/gtest.h>

#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "base/error.h"
#include "engine/runner_step.h"

namespace nibble {
namespace {

// A batch with owned storage: sequences of 0 .. 40 tokens, 0 .. 9 blocks, random fields.
struct OwnedBatch {
    std::vector<std::vector<int32_t>> tokens, tables;
    std::vector<RunnerSequence> seqs;
};

OwnedBatch random_batch(std::mt19937& rng, int n) {
    OwnedBatch b;
    std::uniform_int_distribution<int32_t> id(-5, 1 << 20);
    for (int i = 0; i < n; ++i) {
        b.tokens.emplace_back(static_cast<size_t>(rng() % 41));
        b.tables.emplace_back(static_cast<size_t>(rng() % 10));
        for (int32_t& t : b.tokens.back()) t = id(rng);
        for (int32_t& t : b.tables.back()) t = id(rng);
    }
    for (int i = 0; i < n; ++i)
        b.seqs.push_back({.tokens = b.tokens[static_cast<size_t>(i)],
                          .block_table = b.tables[static_cast<size_t>(i)],
                          .start_pos = static_cast<int64_t>(rng() % 100000) * 3,
                          .needs_logits = rng() % 2 == 0,
                          .state_slot = static_cast<int32_t>(rng() % 7) - 1});
    return b;
}

void expect_same(std::span<const RunnerSequence> got, std::span<const RunnerSequence> want) {
    ASSERT_EQ(got.size(), want.size());
    for (size_t i = 0; i < got.size(); ++i) {
        EXPECT_EQ(std::vector<int32_t>(got[i].tokens.begin(), got[i].tokens.end()),
                  std::vector<int32_t>(want[i].tokens.begin(), want[i].tokens.end()))
            << i;
        EXPECT_EQ(std::vector<int32_t>(got[i].block_table.begin(), got[i].block_table.end()),
                  std::vector<int32_t>(want[i].block_table.begin(), want[i].block_table.end()))
            << i;
        EXPECT_EQ(got[i].start_pos, want[i].start_pos) << i;
        EXPECT_EQ(got[i].needs_logits, want[i].needs_logits) << i;
        EXPECT_EQ(got[i].state_slot, want[i].state_slot) << i;
    }
}

std::string error_of(std::span<const uint8_t> bytes) {
    try {
        decode_runner_step(bytes);
    } catch (const Error& e) {
        return e.what();
    }
    return "";
}

TEST(RunnerStep, BatchesRoundTrip) {
    std::mt19937 rng(7);
    std::vector<uint8_t> bytes;
    for (int trial = 0; trial < 50; ++trial) {
        const OwnedBatch b = random_batch(rng, static_cast<int>(rng() % 9));
        const RunnerCall call = trial % 2 == 0 ? RunnerCall::Execute : RunnerCall::ExecuteGreedy;
        encode_runner_step(call, b.seqs, -1, -1, bytes);  // the buffer is reused across trials
        RunnerStep decoded = decode_runner_step(bytes);
        EXPECT_EQ(decoded.call, call);
        expect_same(decoded.batch, b.seqs);
        // The spans point into the step's own storage, so they survive a move and the bytes going away.
        RunnerStep moved = std::move(decoded);
        bytes.assign(bytes.size(), 0xAB);
        expect_same(moved.batch, b.seqs);
    }
}

TEST(RunnerStep, SnapshotAndShutdownCallsRoundTrip) {
    RunnerStep save = decode_runner_step(encode_runner_step(RunnerCall::SaveStateSnapshot, {}, 3, 11));
    EXPECT_EQ(save.call, RunnerCall::SaveStateSnapshot);
    EXPECT_EQ(save.state_slot, 3);
    EXPECT_EQ(save.snapshot, 11);
    EXPECT_TRUE(save.batch.empty());
    RunnerStep restore = decode_runner_step(encode_runner_step(RunnerCall::RestoreStateSnapshot, {}, 0, 5));
    EXPECT_EQ(restore.call, RunnerCall::RestoreStateSnapshot);
    EXPECT_EQ(restore.state_slot, 0);
    EXPECT_EQ(restore.snapshot, 5);
    RunnerStep stop = decode_runner_step(encode_runner_step(RunnerCall::Shutdown));
    EXPECT_EQ(stop.call, RunnerCall::Shutdown);
    EXPECT_TRUE(stop.batch.empty());
    EXPECT_EQ(runner_call_name(RunnerCall::RestoreStateSnapshot), "restore_state_snapshot");
}

TEST(RunnerStep, EveryTruncationIsRefused) {
    std::mt19937 rng(3);
    const OwnedBatch b = random_batch(rng, 4);
    const std::vector<uint8_t> full = encode_runner_step(RunnerCall::Execute, b.seqs);
    for (size_t n = 0; n < full.size(); ++n) {
        const std::string e = error_of(std::span(full.data(), n));
        EXPECT_NE(e.find("runner step"), std::string::npos) << n;
        // Every cut is refused; past the magic, the message says the step is truncated.
        if (n >= 4) {
            EXPECT_NE(e.find("truncated"), std::string::npos) << n << ": " << e;
        }
    }
    std::vector<uint8_t> longer = full;
    longer.push_back(0);
    EXPECT_NE(error_of(longer).find("1 bytes left over after 4 sequences"), std::string::npos) << error_of(longer);
}

TEST(RunnerStep, MalformedFieldsAreNamed) {
    const int32_t tokens[] = {5, 6, 7}, table[] = {0};
    const RunnerSequence seq{.tokens = tokens, .block_table = table, .start_pos = 2, .needs_logits = true};
    const std::vector<uint8_t> good = encode_runner_step(RunnerCall::Execute, std::span(&seq, 1));
    ASSERT_EQ(error_of(good), "");
    // Header: magic [0, 4), version [4, 8), call [8, 12), state_slot, snapshot, n_seqs [20, 24); then the
    // sequence: start_pos [24, 32), state_slot [32, 36), needs_logits [36, 40), n_tokens [40, 44), n_blocks.
    auto with = [&](size_t at, uint32_t value) {
        std::vector<uint8_t> b = good;
        std::memcpy(b.data() + at, &value, sizeof value);
        return b;
    };
    std::vector<uint8_t> bad_magic = good;
    bad_magic[0] = 'X';
    EXPECT_NE(error_of(bad_magic).find("bad magic"), std::string::npos) << error_of(bad_magic);
    EXPECT_NE(error_of(with(4, 2)).find("version 2, this build reads 1"), std::string::npos);
    EXPECT_NE(error_of(with(8, 0)).find("unknown call 0"), std::string::npos);
    EXPECT_NE(error_of(with(8, 9)).find("unknown call 9"), std::string::npos);
    EXPECT_NE(error_of(with(8, static_cast<uint32_t>(RunnerCall::Shutdown))).find("shutdown with a batch of 1"),
              std::string::npos);
    EXPECT_NE(error_of(with(20, 0xFFFFFFFFu)).find("4294967295 sequences announced"), std::string::npos)
        << error_of(with(20, 0xFFFFFFFFu));
    EXPECT_NE(error_of(with(36, 2)).find("needs_logits 2"), std::string::npos);
    EXPECT_NE(error_of(with(40, 0x7FFFFFFFu)).find("announces 2147483647 tokens"), std::string::npos)
        << error_of(with(40, 0x7FFFFFFFu));
    EXPECT_NE(error_of(with(28, 0x80000000u)).find("start_pos"), std::string::npos);  // negative start_pos
    // Snapshot calls need both ids; a batch on a non-execute call cannot even be encoded.
    EXPECT_NE(error_of(encode_runner_step(RunnerCall::SaveStateSnapshot, {}, -1, 2)).find("state slot -1"),
              std::string::npos);
    EXPECT_THROW(encode_runner_step(RunnerCall::Shutdown, std::span(&seq, 1)), Error);
}

}  // namespace
}  // namespace nibble
