// safetensors round trips against an independent reference: tests/checkpoint/safetensors_reference.py
// (Python json + struct + numpy) writes files and a manifest of their tensors' bytes; nibble must read
// them exactly, and files nibble writes must pass the script's strict reader and match the reference
// layout byte for byte (header JSON, space padding to 8 bytes, packed offsets).
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <filesystem>
#include <fstream>
#include <iterator>

#include "checkpoint/safetensors.h"
#include "safetensors_test_util.h"

namespace nibble {
namespace {

using test::expect_error;
using test::run_reference;
using test::TempDir;

struct Expected {
    std::string name;
    DType dtype;
    Shape shape;
    std::string bytes;
};

struct Manifest {
    std::map<std::string, std::string> metadata;
    std::vector<Expected> tensors;  // in reference file order
};

std::string hex_decode(const std::string& hex) {
    std::string out;
    for (size_t i = 0; i + 1 < hex.size(); i += 2) out += static_cast<char>(std::stoi(hex.substr(i, 2), nullptr, 16));
    return out;
}

Manifest read_manifest(const std::string& path) {
    std::ifstream in(path);
    auto j = nlohmann::json::parse(in);
    Manifest m;
    m.metadata = j.at("metadata").get<std::map<std::string, std::string>>();
    for (const auto& t : j.at("tensors")) {
        auto dtype = dtype_from_name(t.at("dtype").get<std::string>());
        EXPECT_TRUE(dtype.has_value());
        m.tensors.push_back({t.at("name"), *dtype, Shape::from(t.at("shape").get<std::vector<int64_t>>()),
                             hex_decode(t.at("hex"))});
    }
    return m;
}

std::string slurp(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

void expect_tensor(const TensorInfo& got, const Expected& want) {
    EXPECT_EQ(got.name, want.name);
    EXPECT_EQ(got.dtype, want.dtype) << want.name;
    EXPECT_EQ(got.shape, want.shape) << want.name << ": " << got.shape.str() << " vs " << want.shape.str();
    ASSERT_EQ(got.nbytes, want.bytes.size()) << want.name;
    if (got.nbytes) {
        EXPECT_EQ(std::string(reinterpret_cast<const char*>(got.data), got.nbytes), want.bytes) << want.name;
    }
    EXPECT_EQ(got.view().nbytes(), got.nbytes) << want.name;
}

TEST(Safetensors, ReadsReferenceFile) {
    TempDir dir;
    ASSERT_TRUE(run_reference("write-file " + dir / "ref.safetensors" + " " + dir / "m.json"));
    auto m = read_manifest(dir / "m.json");
    ASSERT_GE(m.tensors.size(), 10u);
    SafetensorsFile file(dir / "ref.safetensors");
    EXPECT_EQ(file.metadata(), m.metadata);
    ASSERT_EQ(file.tensors().size(), m.tensors.size());
    for (size_t i = 0; i < m.tensors.size(); ++i) {
        expect_tensor(file.tensors()[i], m.tensors[i]);  // offset order is the reference's order
        const auto* found = file.find(m.tensors[i].name);
        ASSERT_NE(found, nullptr) << m.tensors[i].name;
        EXPECT_EQ(found, &file.tensors()[i]);
        EXPECT_EQ(found->file, dir / "ref.safetensors");
        // Widest-first reference order keeps every tensor aligned to its element size.
        EXPECT_EQ(reinterpret_cast<uintptr_t>(found->data) % dtype_size(found->dtype), 0u) << found->name;
    }
    EXPECT_EQ(file.find("nope"), nullptr);
}

TEST(Safetensors, WriterMatchesReferenceLayoutByteForByte) {
    TempDir dir;
    ASSERT_TRUE(run_reference("write-file " + dir / "ref.safetensors" + " " + dir / "m.json"));
    auto m = read_manifest(dir / "m.json");
    {
        SafetensorsWriter w(dir / "ours.safetensors");
        for (const auto& [k, v] : m.metadata) w.set_metadata(k, v);
        for (const auto& t : m.tensors) w.declare(t.name, t.dtype, t.shape);
        for (const auto& t : m.tensors) w.write(t.name, t.bytes.data(), t.bytes.size());
        w.finish();
    }
    EXPECT_FALSE(std::filesystem::exists(dir / "ours.safetensors.tmp"));
    EXPECT_TRUE(run_reference("check-file " + dir / "ours.safetensors" + " " + dir / "m.json"));
    EXPECT_EQ(slurp(dir / "ours.safetensors"), slurp(dir / "ref.safetensors"));
    // And back through our reader.
    SafetensorsFile back(dir / "ours.safetensors");
    ASSERT_EQ(back.tensors().size(), m.tensors.size());
    for (size_t i = 0; i < m.tensors.size(); ++i) expect_tensor(back.tensors()[i], m.tensors[i]);
}

TEST(Safetensors, WriterHeaderPaddingForEveryLength) {
    // Names of 1..9 characters move the JSON length through every residue mod 8.
    TempDir dir;
    for (int len = 1; len <= 9; ++len) {
        auto path = dir / ("pad" + std::to_string(len) + ".safetensors");
        SafetensorsWriter w(path);
        std::string name(static_cast<size_t>(len), 'x');
        w.declare(name, DType::U8, {3});
        uint8_t bytes[3] = {1, 2, 3};
        w.write(name, bytes, 3);
        w.finish();
        auto raw = slurp(path);
        uint64_t n = 0;
        for (int i = 7; i >= 0; --i) n = (n << 8) | static_cast<uint8_t>(raw[static_cast<size_t>(i)]);
        EXPECT_EQ(n % 8, 0u);
        EXPECT_EQ(raw.size(), 8 + n + 3);
        // Padding is spaces after the closing brace, and the JSON parses without it.
        auto header = raw.substr(8, n);
        auto close = header.find_last_of('}');
        EXPECT_EQ(header.find_first_not_of(' ', close + 1), std::string::npos);
        EXPECT_LT(header.size() - close - 1, 8u);
        auto j = nlohmann::json::parse(header);
        EXPECT_EQ(j.at(name).at("data_offsets"), nlohmann::json::array({0, 3}));
    }
}

TEST(Safetensors, WriterErrors) {
    TempDir dir;
    auto path = dir / "w.safetensors";
    uint8_t buf[64] = {};
    {
        SafetensorsWriter w(path);
        w.declare("a", DType::F32, {2});
        w.declare("b", DType::BF16, {3});
        expect_error([&] { w.declare("a", DType::F32, {2}); }, {path, "a", "twice"});
        expect_error([&] { w.declare("neg", DType::F32, {-1}); }, {path, "neg", "negative"});
        expect_error([&] { w.declare("big", DType::U8, {4294967296, 4294967296, 0}); },
                     {path, "big", "too many elements"});
        expect_error([&] { w.write("b", buf, 6); }, {path, "b", "out of order", "a"});
        expect_error([&] { w.write("a", buf, 7); }, {path, "a", "7 bytes", "8 bytes"});
        w.write("a", buf, 8);
        expect_error([&] { w.declare("c", DType::F32, {1}); }, {path, "c", "after writing began"});
        expect_error([&] { w.set_metadata("k", "v"); }, {path, "k", "after writing began"});
        expect_error([&] { w.finish(); }, {path, "1 of 2", "b"});
        w.write("b", buf, 6);
        expect_error([&] { w.write("b", buf, 6); }, {path, "b", "already"});
        w.finish();
    }
    SafetensorsFile f(path);
    EXPECT_EQ(f.tensors().size(), 2u);

    // Abandoned: PATH.tmp is removed and PATH never appears.
    auto abandoned = dir / "abandoned.safetensors";
    {
        SafetensorsWriter w(abandoned);
        w.declare("a", DType::F32, {2});
        w.write("a", buf, 8);
        EXPECT_TRUE(std::filesystem::exists(abandoned + ".tmp"));
    }
    EXPECT_FALSE(std::filesystem::exists(abandoned + ".tmp"));
    EXPECT_FALSE(std::filesystem::exists(abandoned));

    // No tensors at all is still a valid file.
    auto empty = dir / "empty.safetensors";
    SafetensorsWriter w(empty);
    w.finish();
    EXPECT_TRUE(SafetensorsFile(empty).tensors().empty());
}

TEST(Checkpoint, ReadsReferenceShardedFolder) {
    TempDir dir;
    auto folder = dir / "model";
    ASSERT_TRUE(run_reference("write-sharded " + folder + " " + dir / "m.json"));
    auto m = read_manifest(dir / "m.json");
    Checkpoint ckpt(folder);
    EXPECT_EQ(ckpt.files().size(), 3u);
    std::vector<std::string> want_names;
    for (const auto& t : m.tensors) {
        want_names.push_back(t.name);
        ASSERT_TRUE(ckpt.has(t.name)) << t.name;
        expect_tensor(ckpt.get(t.name), t);
        EXPECT_EQ(&ckpt.get(t.name, t.dtype, t.shape), &ckpt.get(t.name));
    }
    std::sort(want_names.begin(), want_names.end());
    EXPECT_EQ(ckpt.names(), want_names);
    EXPECT_FALSE(ckpt.has("nope"));
}

TEST(Checkpoint, ReadsSingleFileFolder) {
    TempDir dir;
    auto folder = dir / "model";
    std::filesystem::create_directories(folder);
    ASSERT_TRUE(run_reference("write-file " + folder + "/model.safetensors " + dir / "m.json"));
    auto m = read_manifest(dir / "m.json");
    Checkpoint ckpt(folder);
    EXPECT_EQ(ckpt.files().size(), 1u);
    for (const auto& t : m.tensors) expect_tensor(ckpt.get(t.name), t);
}

TEST(Checkpoint, ShardedWriterPassesReferenceChecks) {
    TempDir dir;
    ASSERT_TRUE(run_reference("write-file " + dir / "ref.safetensors" + " " + dir / "m.json"));
    auto m = read_manifest(dir / "m.json");
    auto folder = dir / "out";
    {
        // 64-byte shards: the reference tensors (16..48 bytes each) spread over several shards, the empty
        // and small ones packed together.
        ShardedCheckpointWriter w(folder, 64);
        for (const auto& [k, v] : m.metadata) w.set_metadata(k, v);
        for (const auto& t : m.tensors) w.declare(t.name, t.dtype, t.shape);
        for (const auto& t : m.tensors) w.write(t.name, t.bytes.data(), t.bytes.size());
        w.finish();
    }
    EXPECT_TRUE(run_reference("check-sharded " + folder + " " + dir / "m.json"));
    size_t shards = 0;
    uint64_t total = 0;
    for (const auto& e : std::filesystem::directory_iterator(folder)) {
        if (e.path().extension() == ".safetensors") {
            ++shards;
            uint64_t in_shard = 0;
            SafetensorsFile shard(e.path().string());
            for (const auto& t : shard.tensors()) in_shard += t.nbytes;
            total += in_shard;
            EXPECT_LE(in_shard, 64u) << e.path();
        }
        EXPECT_NE(e.path().extension(), ".tmp") << e.path();
    }
    EXPECT_GT(shards, 2u);
    Checkpoint ckpt(folder);
    for (const auto& t : m.tensors) expect_tensor(ckpt.get(t.name), t);
    auto index = nlohmann::json::parse(slurp(folder + "/model.safetensors.index.json"));
    EXPECT_EQ(index.at("metadata").at("total_size").get<uint64_t>(), total);

    // Refuses to write over an existing checkpoint.
    expect_error([&] { ShardedCheckpointWriter again(folder, 64); }, {folder, "already holds"});
}

TEST(Checkpoint, ShardedWriterSingleShardIsModelSafetensors) {
    TempDir dir;
    auto folder = dir / "out";
    ShardedCheckpointWriter w(folder, 1 << 20);
    float x[4] = {1, 2, 3, 4};
    w.declare("w", DType::F32, {2, 2});
    expect_error([&] { w.write("v", x, 16); }, {folder, "v", "out of order"});
    w.write("w", x, sizeof x);
    w.finish();
    EXPECT_TRUE(std::filesystem::exists(folder + "/model.safetensors"));
    EXPECT_FALSE(std::filesystem::exists(folder + "/model.safetensors.index.json"));
    Checkpoint ckpt(folder);
    EXPECT_EQ(ckpt.get("w", DType::F32, {2, 2}).view().as<float>()[3], 4.0f);
}

}  // namespace
}  // namespace nibble
