// Checkpoint: the tensors of a model folder, from model.safetensors or from the shards that
// model.safetensors.index.json ({"metadata": {...}, "weight_map": {tensor: shard file}}) lists; the index
// and the shards must agree exactly.
#include <algorithm>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <set>

#include <fmt/ranges.h>

#include "base/error.h"
#include "checkpoint/safetensors.h"
#include "checkpoint/strict_json.h"

namespace nibble {

namespace fs = std::filesystem;

namespace {

constexpr const char* kSingleFile = "model.safetensors";
constexpr const char* kIndexFile = "model.safetensors.index.json";
// Index files are a few MB even for the largest models; anything far bigger is not an index.
constexpr uintmax_t kMaxIndexBytes = 256u << 20;

std::string read_small_file(const std::string& path, uintmax_t limit) {
    std::error_code ec;
    auto size = fs::file_size(path, ec);
    NIBBLE_CHECK(!ec, "cannot read {}: {}", path, ec.message());
    NIBBLE_CHECK(size <= limit, "{}: {} bytes, more than the {}-byte limit for this file", path, size, limit);
    std::ifstream in(path, std::ios::binary);
    NIBBLE_CHECK(in.good(), "cannot open {}", path);
    std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    NIBBLE_CHECK(!in.bad(), "cannot read {}", path);
    return text;
}

// A shard named by the index must be a plain file name inside the folder.
bool is_plain_file_name(const std::string& name) {
    return !name.empty() && name != "." && name != ".." && name.find('/') == std::string::npos &&
           name.find('\0') == std::string::npos;
}

}  // namespace

Checkpoint::Checkpoint(const std::string& dir) : dir_(dir) {
    std::error_code ec;
    NIBBLE_CHECK(fs::is_directory(dir, ec), "{} is not a directory", dir);
    fs::path folder(dir);
    if (fs::exists(folder / kIndexFile, ec)) {
        load_sharded((folder / kIndexFile).string());
        return;
    }
    std::vector<std::string> found;
    for (const auto& entry : fs::directory_iterator(folder, ec))
        if (entry.path().extension() == ".safetensors") found.push_back(entry.path().filename().string());
    NIBBLE_CHECK(!ec, "cannot list {}: {}", dir, ec.message());
    std::sort(found.begin(), found.end());
    NIBBLE_CHECK(!found.empty(), "{}: no {} and no {} in the folder", dir, kSingleFile, kIndexFile);
    // Other .safetensors files beside model.safetensors (Mistral's consolidated.safetensors, a tool's
    // outputs) are not part of the transformers checkpoint and are ignored, as transformers ignores them.
    NIBBLE_CHECK(std::find(found.begin(), found.end(), kSingleFile) != found.end(),
                 "{}: found {} but neither {} nor {}", dir, fmt::format("{}", fmt::join(found, ", ")), kSingleFile,
                 kIndexFile);
    load_single((folder / kSingleFile).string());
}

void Checkpoint::load_single(const std::string& path) {
    files_.push_back(std::make_unique<SafetensorsFile>(path));
    for (const auto& t : files_.back()->tensors()) tensors_.emplace(t.name, &t);
}

void Checkpoint::load_sharded(const std::string& index_path) {
    std::string text = read_small_file(index_path, kMaxIndexBytes);
    auto index = parse_json_strict(text.data(), text.size(), index_path, 8);
    NIBBLE_CHECK(index.is_object(), "{}: a JSON {}, not an object", index_path, index.type_name());
    auto wm = index.find("weight_map");
    NIBBLE_CHECK(wm != index.end(), "{}: no \"weight_map\"", index_path);
    NIBBLE_CHECK(wm->is_object(), "{}: \"weight_map\" is a {}, not an object", index_path, wm->type_name());

    std::map<std::string, std::string> weight_map;  // tensor -> shard file name
    std::set<std::string> shards;
    for (const auto& [name, shard] : wm->items()) {
        NIBBLE_CHECK(shard.is_string(), "{}: tensor {}: shard is a {}, not a file name", index_path, name,
                     shard.type_name());
        const auto& s = shard.get_ref<const std::string&>();
        NIBBLE_CHECK(is_plain_file_name(s), "{}: tensor {}: shard \"{}\" is not a file name in the folder",
                     index_path, name, s);
        weight_map.emplace(name, s);
        shards.insert(s);
    }
    NIBBLE_CHECK(!shards.empty(), "{}: \"weight_map\" is empty", index_path);

    fs::path folder(dir_);
    for (const auto& shard : shards) {
        auto path = (folder / shard).string();
        std::error_code ec;
        if (!fs::exists(path, ec)) {
            auto first = std::find_if(weight_map.begin(), weight_map.end(),
                                      [&](const auto& kv) { return kv.second == shard; });
            fail("{}: shard {} (holding tensor {}) does not exist in {}", index_path, shard, first->first, dir_);
        }
        files_.push_back(std::make_unique<SafetensorsFile>(path));
        for (const auto& t : files_.back()->tensors()) {
            auto [it, inserted] = tensors_.emplace(t.name, &t);
            NIBBLE_CHECK(inserted, "tensor {} is in two shards: {} and {}", t.name, it->second->file, path);
        }
    }
    // Only once every shard is open, so that a tensor in two shards is reported as such.
    for (const auto& [name, t] : tensors_) {
        auto listed = weight_map.find(name);
        NIBBLE_CHECK(listed != weight_map.end(), "{}: tensor {} is in shard {} but not in the weight_map",
                     index_path, name, t->file);
        auto listed_path = (folder / listed->second).string();
        NIBBLE_CHECK(listed_path == t->file, "{}: tensor {} is in shard {} but the weight_map puts it in {}",
                     index_path, name, t->file, listed_path);
    }
    for (const auto& [name, shard] : weight_map)
        NIBBLE_CHECK(tensors_.count(name), "{}: weight_map puts tensor {} in {}, which does not hold it",
                     index_path, name, (folder / shard).string());
}

bool Checkpoint::has(const std::string& name) const { return tensors_.count(name) != 0; }

const TensorInfo& Checkpoint::get(const std::string& name) const {
    auto it = tensors_.find(name);
    NIBBLE_CHECK(it != tensors_.end(), "missing tensor {} in {}", name, dir_);
    return *it->second;
}

const TensorInfo& Checkpoint::get(const std::string& name, DType dtype, const Shape& shape) const {
    const auto& t = get(name);
    NIBBLE_CHECK(t.dtype == dtype && t.shape == shape, "tensor {} in {}: expected {} {}, got {} {}", name, t.file,
                 dtype_name(dtype), shape.str(), dtype_name(t.dtype), t.shape.str());
    return t;
}

std::vector<std::string> Checkpoint::names() const {
    std::vector<std::string> out;
    out.reserve(tensors_.size());
    for (const auto& kv : tensors_) out.push_back(kv.first);
    return out;
}

}  // namespace nibble
