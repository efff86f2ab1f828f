// Malformed safetensors files and checkpoint folders, each built byte by byte here: every one must end in a
// nibble::Error naming the file and, where there is one, the tensor (never a crash or a huge allocation).
#include <gtest/gtest.h>

#include <filesystem>

#include "checkpoint/safetensors.h"
#include "safetensors_test_util.h"

namespace nibble {
namespace {

using test::expect_error;
using test::safetensors_bytes;
using test::TempDir;
using test::write_bytes;

struct BadHeader {
    std::string label;   // also the file name
    std::string header;  // JSON text after the length prefix
    size_t data_size;
    std::string tensor;  // must appear in the message ("" when the problem has no tensor)
    std::string detail;  // another part of the message
};

TEST(SafetensorsErrors, BadHeaders) {
    const std::string ok_entry = R"({"dtype":"F32","shape":[2],"data_offsets":[0,8]})";
    std::string long_list = "1";  // 100000 ones: refused while parsing, before a large tree is built
    for (int i = 1; i < 100000; ++i) long_list += ",1";
    const std::vector<BadHeader> cases = {
        {"not_json", R"({"w": {"dtype": "F32",)", 8, "", "not valid JSON"},
        {"not_object", R"([1, 2, 3])", 8, "", "not an object"},
        {"trailing_garbage", R"({} x)", 0, "", "not valid JSON"},
        {"bad_utf8", "{\"w\xff\xfe\": " + ok_entry + "}", 8, "", "not valid JSON"},
        {"entry_not_object", R"({"w": [1, 2]})", 8, "w", "not an object"},
        {"metadata_not_object", R"({"__metadata__": "x"})", 0, "", "__metadata__"},
        {"metadata_not_string", R"({"__metadata__": {"format": 1}})", 0, "", "format"},
        {"missing_dtype", R"({"w": {"shape": [2], "data_offsets": [0, 8]}})", 8, "w", "dtype"},
        {"missing_shape", R"({"w": {"dtype": "F32", "data_offsets": [0, 8]}})", 8, "w", "shape"},
        {"missing_offsets", R"({"w": {"dtype": "F32", "shape": [2]}})", 8, "w", "data_offsets"},
        {"dtype_not_string", R"({"w": {"dtype": 4, "shape": [2], "data_offsets": [0, 8]}})", 8, "w", "dtype"},
        {"unknown_dtype", R"({"w": {"dtype": "Q4_K", "shape": [2], "data_offsets": [0, 8]}})", 8, "w", "Q4_K"},
        {"shape_not_array", R"({"w": {"dtype": "F32", "shape": 2, "data_offsets": [0, 8]}})", 8, "w", "shape"},
        {"negative_dim", R"({"w": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}})", 8, "w", "-2"},
        {"float_dim", R"({"w": {"dtype": "F32", "shape": [2.5], "data_offsets": [0, 8]}})", 8, "w", "2.5"},
        {"integral_float_dim", R"({"w": {"dtype": "F32", "shape": [2.0], "data_offsets": [0, 8]}})", 8, "w",
         "not a non-negative integer"},
        {"string_dim", R"({"w": {"dtype": "F32", "shape": ["2"], "data_offsets": [0, 8]}})", 8, "w", "\"2\""},
        {"huge_dim", R"({"w": {"dtype": "F32", "shape": [18446744073709551615], "data_offsets": [0, 8]}})", 8, "w",
         "not a non-negative integer"},
        {"too_many_dims", R"({"w": {"dtype": "U8", "shape": [1,1,1,1,1,1,1], "data_offsets": [0, 1]}})", 8, "w",
         "7 dimensions"},
        {"numel_overflow", R"({"w": {"dtype": "U8", "shape": [4294967296, 4294967296, 2], "data_offsets": [0, 8]}})",
         8, "w", "too many elements"},
        {"overflow_then_zero",
         R"({"w": {"dtype": "U8", "shape": [4294967296, 4294967296, 0], "data_offsets": [0, 0]}})", 8, "w",
         "too many elements"},
        // Found by the fuzzer: fits uint64 but not int64 (Shape::numel), then a zero dim.
        {"int64_overflow_then_zero",
         R"({"w": {"dtype": "F64", "shape": [4294966792, 4294967296, 0], "data_offsets": [0, 0]}})", 8, "w",
         "too many elements"},
        {"nbytes_overflow", R"({"w": {"dtype": "F64", "shape": [4611686018427387904], "data_offsets": [0, 8]}})", 8,
         "w", "too many elements"},
        {"offsets_not_array", R"({"w": {"dtype": "F32", "shape": [2], "data_offsets": {"b": 0}}})", 8, "w",
         "data_offsets"},
        {"offsets_one", R"({"w": {"dtype": "F32", "shape": [2], "data_offsets": [8]}})", 8, "w", "data_offsets"},
        {"offsets_negative", R"({"w": {"dtype": "F32", "shape": [2], "data_offsets": [-8, 0]}})", 8, "w",
         "non-negative"},
        {"offsets_float", R"({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8.0]}})", 8, "w",
         "non-negative integers"},
        {"end_past_data", R"({"w": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}})", 8, "w",
         "past the data section"},
        {"end_past_data_huge",
         R"({"w": {"dtype": "F32", "shape": [2], "data_offsets": [18446744073709551608, 18446744073709551615]}})", 8,
         "w", "past the data section"},
        {"begin_after_end", R"({"w": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}})", 8, "w",
         "begin after end"},
        {"wrong_byte_count", R"({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}})", 16, "w",
         "needs 12 bytes"},
        {"overlap", R"({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                        "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}})",
         16, "b", "overlaps tensor a"},
        {"same_range", R"({"a": {"dtype": "U8", "shape": [8], "data_offsets": [0, 8]},
                           "b": {"dtype": "U8", "shape": [8], "data_offsets": [0, 8]}})",
         8, "a", "overlaps"},
        {"empty_inside_other", R"({"a": {"dtype": "U8", "shape": [8], "data_offsets": [0, 8]},
                                   "b": {"dtype": "U8", "shape": [0], "data_offsets": [4, 4]}})",
         8, "b", "overlaps tensor a"},
        {"duplicate_tensor", "{\"w\": " + ok_entry + ", \"w\": " + ok_entry + "}", 8, "w", "duplicate key"},
        {"duplicate_field", R"({"w": {"dtype": "F32", "dtype": "F16", "shape": [2], "data_offsets": [0, 8]}})", 8,
         "dtype", "duplicate key"},
        {"too_deep", R"({"w": {"dtype": "F32", "shape": [[2]], "data_offsets": [0, 8]}})", 8, "", "deeper"},
        {"long_array", "{\"w\": {\"dtype\": \"U8\", \"shape\": [" + long_list + "], \"data_offsets\": [0, 1]}}", 8,
         "", "array longer than 16"},
        {"very_deep", std::string(100000, '[') + std::string(100000, ']'), 8, "", "deeper"},
    };
    TempDir dir;
    for (const auto& c : cases) {
        SCOPED_TRACE(c.label);
        auto path = dir / (c.label + ".safetensors");
        write_bytes(path, safetensors_bytes(c.header, c.data_size));
        expect_error([&] { SafetensorsFile f(path); }, {path, c.tensor, c.detail});
        // The header-only entry point (the fuzz target's) says the same.
        expect_error([&] { parse_safetensors_header(c.header.data(), c.header.size(), c.data_size, path, nullptr); },
                     {path, c.tensor, c.detail});
    }
}

TEST(SafetensorsErrors, BadLengthPrefix) {
    TempDir dir;
    auto path = dir / "bad.safetensors";
    for (size_t n : {0, 1, 7}) {
        write_bytes(path, std::string(n, '\x01'));
        expect_error([&] { SafetensorsFile f(path); }, {path, "shorter than the 8-byte"});
    }
    // Length beyond the file.
    auto file = safetensors_bytes("{}", 0);
    file[0] = 3;
    write_bytes(path, file);
    expect_error([&] { SafetensorsFile f(path); }, {path, "header length 3 is larger"});
    // Absurd length (2^63): refused before any allocation or read.
    file = safetensors_bytes("{}", 0);
    file[7] = '\x80';
    write_bytes(path, file);
    expect_error([&] { SafetensorsFile f(path); }, {path, "exceeds the 100000000-byte limit"});
    // Just over the cap.
    file = safetensors_bytes("{}", 0);
    uint64_t n = kMaxSafetensorsHeaderBytes + 1;
    for (int i = 0; i < 8; ++i) file[static_cast<size_t>(i)] = static_cast<char>(n >> (8 * i));
    write_bytes(path, file);
    expect_error([&] { SafetensorsFile f(path); }, {path, "exceeds"});
    // A folder is not a file.
    expect_error([&] { SafetensorsFile f(dir.str()); }, {dir.str()});
    expect_error([&] { SafetensorsFile f(dir / "missing.safetensors"); }, {dir / "missing.safetensors"});
}

TEST(SafetensorsErrors, LenientWhereSafe) {
    // Accepted: padding spaces, a gap between tensors, bytes after the last one, an empty header, a
    // zero-size tensor at the end of another.
    TempDir dir;
    auto path = dir / "ok.safetensors";
    write_bytes(path, safetensors_bytes(R"({"a": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]},
        "b": {"dtype": "U8", "shape": [2], "data_offsets": [4, 6]},
        "c": {"dtype": "U8", "shape": [0], "data_offsets": [2, 2]}}        )",
                                        9));
    SafetensorsFile f(path);
    ASSERT_EQ(f.tensors().size(), 3u);
    EXPECT_EQ(f.tensors()[0].name, "a");
    EXPECT_EQ(f.tensors()[1].name, "c");
    EXPECT_EQ(f.find("b")->offset, 4u);
    write_bytes(path, safetensors_bytes("{}", 0));
    EXPECT_TRUE(SafetensorsFile(path).tensors().empty());
}

// ---------------------------------------------------------------- checkpoint folders

// A file holding U8 tensors of 4 bytes each with the given names.
void write_u8_file(const std::string& path, const std::vector<std::string>& names) {
    std::string header = "{";
    for (size_t i = 0; i < names.size(); ++i) {
        if (i) header += ",";
        header += "\"" + names[i] + "\":{\"dtype\":\"U8\",\"shape\":[4],\"data_offsets\":[" + std::to_string(4 * i) +
                  "," + std::to_string(4 * i + 4) + "]}";
    }
    write_bytes(path, safetensors_bytes(header + "}", 4 * names.size()));
}

void write_index(const std::string& folder, const std::string& weight_map) {
    write_bytes(folder + "/model.safetensors.index.json",
                R"({"metadata": {"total_size": 16}, "weight_map": )" + weight_map + "}");
}

TEST(CheckpointErrors, MissingAndMistypedTensors) {
    TempDir dir;
    write_u8_file(dir / "model.safetensors", {"a", "b"});
    Checkpoint ckpt(dir.str());
    expect_error([&] { ckpt.get("lm_head.weight"); }, {"missing tensor lm_head.weight", dir.str()});
    expect_error([&] { ckpt.get("lm_head.weight", DType::U8, {4}); }, {"lm_head.weight", dir.str()});
    expect_error([&] { ckpt.get("a", DType::BF16, {4}); },
                 {"tensor a", dir / "model.safetensors", "expected BF16 [4], got U8 [4]"});
    expect_error([&] { ckpt.get("b", DType::U8, {2, 2}); },
                 {"tensor b", dir / "model.safetensors", "expected U8 [2, 2], got U8 [4]"});
    EXPECT_EQ(ckpt.get("b", DType::U8, {4}).nbytes, 4u);
}

TEST(CheckpointErrors, FolderWithoutCheckpoint) {
    TempDir dir;
    expect_error([&] { Checkpoint c(dir.str()); }, {dir.str(), "no model.safetensors and no"});
    expect_error([&] { Checkpoint c(dir / "nope"); }, {dir / "nope", "not a directory"});
    // Shards without an index.
    write_u8_file(dir / "model-00001-of-00002.safetensors", {"a"});
    expect_error([&] { Checkpoint c(dir.str()); },
                 {dir.str(), "model-00001-of-00002.safetensors", "neither model.safetensors nor",
                  "model.safetensors.index.json"});
    // model.safetensors beside another .safetensors file: the other one is not part of the checkpoint.
    write_u8_file(dir / "model.safetensors", {"a"});
    EXPECT_TRUE(Checkpoint(dir.str()).has("a"));
    // A broken model.safetensors names itself.
    std::filesystem::remove(dir / "model-00001-of-00002.safetensors");
    write_bytes(dir / "model.safetensors", "abc");
    expect_error([&] { Checkpoint c(dir.str()); }, {dir / "model.safetensors", "shorter"});
}

TEST(CheckpointErrors, ShardedFolders) {
    TempDir dir;
    const std::string s1 = "model-00001-of-00002.safetensors", s2 = "model-00002-of-00002.safetensors";
    auto p1 = dir / s1, p2 = dir / s2, index = dir / "model.safetensors.index.json";
    write_u8_file(p1, {"a", "b"});
    write_u8_file(p2, {"c"});
    const std::string good = R"({"a": ")" + s1 + R"(", "b": ")" + s1 + R"(", "c": ")" + s2 + R"("})";
    write_index(dir.str(), good);
    {
        Checkpoint ok(dir.str());
        EXPECT_EQ(ok.names(), (std::vector<std::string>{"a", "b", "c"}));
        EXPECT_EQ(ok.get("c").file, p2);
    }

    // The index references a shard that is not there.
    write_index(dir.str(), R"({"a": ")" + s1 + R"(", "b": ")" + s1 + R"(", "c": "model-00003.safetensors"})");
    expect_error([&] { Checkpoint c(dir.str()); }, {index, "model-00003.safetensors", "tensor c", "does not exist"});

    // A tensor the shard holds but the index does not list.
    write_index(dir.str(), R"({"a": ")" + s1 + R"(", "c": ")" + s2 + R"("})");
    expect_error([&] { Checkpoint c(dir.str()); }, {index, "tensor b", p1, "not in the weight_map"});

    // The index lists a tensor no shard holds.
    write_index(dir.str(), R"({"a": ")" + s1 + R"(", "b": ")" + s1 + R"(", "c": ")" + s2 + R"(", "d": ")" + s2 +
                               R"("})");
    expect_error([&] { Checkpoint c(dir.str()); }, {index, "tensor d", p2, "does not hold it"});

    // The index puts a tensor in the wrong shard.
    write_index(dir.str(), R"({"a": ")" + s1 + R"(", "b": ")" + s2 + R"(", "c": ")" + s2 + R"("})");
    expect_error([&] { Checkpoint c(dir.str()); }, {index, "tensor b", p1, "puts it in", p2});

    // One name in two shards.
    write_u8_file(p2, {"c", "a"});
    write_index(dir.str(), good);
    expect_error([&] { Checkpoint c(dir.str()); }, {"tensor a", "two shards", p1, p2});
    write_u8_file(p2, {"c"});

    // A duplicate key in the index itself.
    write_index(dir.str(), R"({"a": ")" + s1 + R"(", "a": ")" + s2 + R"(", "b": ")" + s1 + R"("})");
    expect_error([&] { Checkpoint c(dir.str()); }, {index, "duplicate key \"a\""});

    // Shard names must stay in the folder.
    write_index(dir.str(), R"({"a": "../model.safetensors"})");
    expect_error([&] { Checkpoint c(dir.str()); }, {index, "tensor a", "../model.safetensors", "not a file name"});

    // Broken index files.
    write_bytes(index, "{\"weight_map\": ");
    expect_error([&] { Checkpoint c(dir.str()); }, {index, "not valid JSON"});
    write_bytes(index, R"({"metadata": {}})");
    expect_error([&] { Checkpoint c(dir.str()); }, {index, "no \"weight_map\""});
    write_bytes(index, R"({"weight_map": []})");
    expect_error([&] { Checkpoint c(dir.str()); }, {index, "weight_map", "not an object"});
    write_bytes(index, R"({"weight_map": {"a": 1}})");
    expect_error([&] { Checkpoint c(dir.str()); }, {index, "tensor a", "not a file name"});
    write_bytes(index, R"({"weight_map": {}})");
    expect_error([&] { Checkpoint c(dir.str()); }, {index, "empty"});

    // A malformed shard names the shard.
    write_index(dir.str(), good);
    write_bytes(p2, safetensors_bytes(R"({"c": {"dtype": "U8", "shape": [4], "data_offsets": [0, 5]}})", 4));
    expect_error([&] { Checkpoint c(dir.str()); }, {p2, "tensor c", "past the data section"});
}

}  // namespace
}  // namespace nibble
