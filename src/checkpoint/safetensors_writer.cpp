// safetensors writers: SafetensorsWriter streams one file (header fixed by the declarations, then each
// tensor's bytes in order, to PATH.tmp renamed at the end); ShardedCheckpointWriter packs declared tensors
// into shards and writes model.safetensors.index.json. Layout details follow the reference implementation
// (huggingface/safetensors): compact JSON, "__metadata__" first, header padded with spaces to 8 bytes.
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <limits>
#include <set>

#include <nlohmann/json.hpp>

#include "base/error.h"
#include "checkpoint/safetensors.h"

namespace nibble {

namespace fs = std::filesystem;

namespace {

struct Declared {
    std::string name;
    DType dtype;
    Shape shape;
    uint64_t nbytes;
};

Declared make_declared(const std::string& where, const std::string& name, DType dtype, const Shape& shape) {
    NIBBLE_CHECK(!name.empty() && name != "__metadata__", "{}: \"{}\" is not a usable tensor name", where, name);
    uint64_t numel = 1;
    for (int i = 0; i < shape.ndim; ++i) {
        NIBBLE_CHECK(shape[i] >= 0, "{}: tensor {}: negative dimension in {}", where, name, shape.str());
        // int64 bound: what Shape::numel() and readers multiply in.
        NIBBLE_CHECK(!__builtin_mul_overflow(numel, static_cast<uint64_t>(shape[i]), &numel) &&
                         numel <= static_cast<uint64_t>(std::numeric_limits<int64_t>::max()),
                     "{}: tensor {}: shape {} has too many elements", where, name, shape.str());
    }
    uint64_t nbytes = 0;
    NIBBLE_CHECK(!__builtin_mul_overflow(numel, dtype_size(dtype), &nbytes),
                 "{}: tensor {}: shape {} has too many bytes", where, name, shape.str());
    return {name, dtype, shape, nbytes};
}

void write_all(std::FILE* out, const void* data, size_t n, const std::string& path) {
    if (n == 0) return;
    NIBBLE_CHECK(std::fwrite(data, 1, n, out) == n, "cannot write {}: {}", path, std::strerror(errno));
}

}  // namespace

// ---------------------------------------------------------------- SafetensorsWriter

struct SafetensorsWriter::Impl {
    std::string path;
    std::string tmp_path;
    std::map<std::string, std::string> metadata;
    std::vector<Declared> tensors;
    std::set<std::string> names;
    size_t next = 0;             // index of the next tensor to write
    std::FILE* out = nullptr;    // open from the first write (or finish) on
    bool finished = false;

    void start();
};

void SafetensorsWriter::Impl::start() {
    nlohmann::ordered_json header = nlohmann::ordered_json::object();
    if (!metadata.empty()) header["__metadata__"] = metadata;
    uint64_t offset = 0;
    for (const auto& t : tensors) {
        nlohmann::ordered_json entry;
        entry["dtype"] = std::string(dtype_name(t.dtype));
        auto& shape = entry["shape"] = nlohmann::ordered_json::array();
        for (int i = 0; i < t.shape.ndim; ++i) shape.push_back(t.shape[i]);
        entry["data_offsets"] = {offset, offset + t.nbytes};
        NIBBLE_CHECK(!__builtin_add_overflow(offset, t.nbytes, &offset), "{}: tensors too large", path);
        header[t.name] = std::move(entry);
    }
    std::string text = header.dump();
    text.append((8 - text.size() % 8) % 8, ' ');
    out = std::fopen(tmp_path.c_str(), "wb");
    NIBBLE_CHECK(out != nullptr, "cannot create {}: {}", tmp_path, std::strerror(errno));
    uint8_t len[8];
    for (int i = 0; i < 8; ++i) len[i] = static_cast<uint8_t>(static_cast<uint64_t>(text.size()) >> (8 * i));
    write_all(out, len, 8, tmp_path);
    write_all(out, text.data(), text.size(), tmp_path);
}

SafetensorsWriter::SafetensorsWriter(std::string path) : impl_(std::make_unique<Impl>()) {
    impl_->tmp_path = path + ".tmp";
    impl_->path = std::move(path);
}

SafetensorsWriter::~SafetensorsWriter() {
    if (impl_->out != nullptr) std::fclose(impl_->out);
    if (!impl_->finished) std::remove(impl_->tmp_path.c_str());
}

const std::string& SafetensorsWriter::path() const { return impl_->path; }

void SafetensorsWriter::set_metadata(const std::string& key, const std::string& value) {
    NIBBLE_CHECK(impl_->out == nullptr && !impl_->finished,
                 "{}: metadata \"{}\" set after writing began", impl_->path, key);
    impl_->metadata[key] = value;
}

void SafetensorsWriter::declare(const std::string& name, DType dtype, const Shape& shape) {
    NIBBLE_CHECK(impl_->out == nullptr && !impl_->finished, "{}: tensor {} declared after writing began",
                 impl_->path, name);
    NIBBLE_CHECK(impl_->names.insert(name).second, "{}: tensor {} declared twice", impl_->path, name);
    impl_->tensors.push_back(make_declared(impl_->path, name, dtype, shape));
}

void SafetensorsWriter::write(const std::string& name, const void* data, size_t nbytes) {
    auto& im = *impl_;
    NIBBLE_CHECK(!im.finished, "{}: tensor {} written after finish()", im.path, name);
    NIBBLE_CHECK(im.next < im.tensors.size(), "{}: tensor {} written, but every declared tensor is written already",
                 im.path, name);
    const auto& t = im.tensors[im.next];
    NIBBLE_CHECK(t.name == name, "{}: tensor {} written out of order: {} is declared next", im.path, name, t.name);
    NIBBLE_CHECK(nbytes == t.nbytes, "{}: tensor {}: {} bytes written, but {} {} takes {} bytes", im.path, name,
                 nbytes, dtype_name(t.dtype), t.shape.str(), t.nbytes);
    if (im.out == nullptr) im.start();
    write_all(im.out, data, nbytes, im.tmp_path);
    ++im.next;
}

void SafetensorsWriter::finish() {
    auto& im = *impl_;
    NIBBLE_CHECK(!im.finished, "{}: finish() called twice", im.path);
    NIBBLE_CHECK(im.next == im.tensors.size(), "{}: finished with {} of {} tensors written; next is {}", im.path,
                 im.next, im.tensors.size(), im.next < im.tensors.size() ? im.tensors[im.next].name : "");
    if (im.out == nullptr) im.start();  // no tensors, or none with bytes: still a valid file
    std::FILE* out = im.out;
    im.out = nullptr;
    bool ok = std::fflush(out) == 0;
    ok = std::fclose(out) == 0 && ok;
    NIBBLE_CHECK(ok, "cannot write {}: {}", im.tmp_path, std::strerror(errno));
    NIBBLE_CHECK(std::rename(im.tmp_path.c_str(), im.path.c_str()) == 0, "cannot rename {} to {}: {}",
                 im.tmp_path, im.path, std::strerror(errno));
    im.finished = true;
}

// ---------------------------------------------------------------- ShardedCheckpointWriter

struct ShardedCheckpointWriter::Impl {
    std::string dir;
    uint64_t max_shard_bytes = 0;
    std::map<std::string, std::string> metadata;
    std::vector<Declared> tensors;
    std::set<std::string> names;
    std::vector<size_t> shard_of;     // per tensor, filled when writing starts
    size_t n_shards = 0;
    size_t next = 0;                   // next tensor to write
    std::unique_ptr<SafetensorsWriter> current;
    size_t current_shard = 0;
    bool finished = false;

    bool planned() const { return n_shards != 0; }
    void plan();
    std::string shard_name(size_t shard) const;
    void open_shard(size_t shard);
};

void ShardedCheckpointWriter::Impl::plan() {
    // Greedy in declaration order, as transformers' shard_checkpoint does: start a new shard when the
    // next tensor would push the current one past the limit.
    uint64_t in_shard = 0;
    size_t shard = 0;
    for (size_t i = 0; i < tensors.size(); ++i) {
        if (i > 0 && in_shard > 0 && in_shard + tensors[i].nbytes > max_shard_bytes) {
            ++shard;
            in_shard = 0;
        }
        in_shard += tensors[i].nbytes;
        shard_of.push_back(shard);
    }
    n_shards = shard + 1;
}

std::string ShardedCheckpointWriter::Impl::shard_name(size_t shard) const {
    if (n_shards == 1) return "model.safetensors";
    return fmt::format("model-{:05d}-of-{:05d}.safetensors", shard + 1, n_shards);
}

void ShardedCheckpointWriter::Impl::open_shard(size_t shard) {
    current = std::make_unique<SafetensorsWriter>((fs::path(dir) / shard_name(shard)).string());
    current_shard = shard;
    for (const auto& [k, v] : metadata) current->set_metadata(k, v);
    for (size_t i = 0; i < tensors.size(); ++i)
        if (shard_of[i] == shard) current->declare(tensors[i].name, tensors[i].dtype, tensors[i].shape);
}

ShardedCheckpointWriter::ShardedCheckpointWriter(std::string dir, uint64_t max_shard_bytes)
    : impl_(std::make_unique<Impl>()) {
    NIBBLE_CHECK(max_shard_bytes > 0, "{}: shard size limit must be positive", dir);
    std::error_code ec;
    fs::create_directories(dir, ec);
    NIBBLE_CHECK(!ec, "cannot create folder {}: {}", dir, ec.message());
    for (const auto& entry : fs::directory_iterator(dir, ec)) {
        auto name = entry.path().filename().string();
        NIBBLE_CHECK(entry.path().extension() != ".safetensors" && name != "model.safetensors.index.json",
                     "{}: already holds {}; refusing to mix a new checkpoint with an old one", dir, name);
    }
    NIBBLE_CHECK(!ec, "cannot list {}: {}", dir, ec.message());
    impl_->dir = std::move(dir);
    impl_->max_shard_bytes = max_shard_bytes;
}

ShardedCheckpointWriter::~ShardedCheckpointWriter() = default;

void ShardedCheckpointWriter::set_metadata(const std::string& key, const std::string& value) {
    NIBBLE_CHECK(!impl_->planned(), "{}: metadata \"{}\" set after writing began", impl_->dir, key);
    impl_->metadata[key] = value;
}

void ShardedCheckpointWriter::declare(const std::string& name, DType dtype, const Shape& shape) {
    NIBBLE_CHECK(!impl_->planned(), "{}: tensor {} declared after writing began", impl_->dir, name);
    NIBBLE_CHECK(impl_->names.insert(name).second, "{}: tensor {} declared twice", impl_->dir, name);
    impl_->tensors.push_back(make_declared(impl_->dir, name, dtype, shape));
}

void ShardedCheckpointWriter::write(const std::string& name, const void* data, size_t nbytes) {
    auto& im = *impl_;
    NIBBLE_CHECK(!im.finished, "{}: tensor {} written after finish()", im.dir, name);
    if (!im.planned()) im.plan();
    NIBBLE_CHECK(im.next < im.tensors.size(), "{}: tensor {} written, but every declared tensor is written already",
                 im.dir, name);
    NIBBLE_CHECK(im.tensors[im.next].name == name, "{}: tensor {} written out of order: {} is declared next",
                 im.dir, name, im.tensors[im.next].name);
    size_t shard = im.shard_of[im.next];
    if (!im.current || im.current_shard != shard) {
        if (im.current) im.current->finish();
        im.open_shard(shard);
    }
    im.current->write(name, data, nbytes);
    ++im.next;
}

void ShardedCheckpointWriter::finish() {
    auto& im = *impl_;
    NIBBLE_CHECK(!im.finished, "{}: finish() called twice", im.dir);
    if (!im.planned()) im.plan();
    NIBBLE_CHECK(im.next == im.tensors.size(), "{}: finished with {} of {} tensors written; next is {}", im.dir,
                 im.next, im.tensors.size(), im.next < im.tensors.size() ? im.tensors[im.next].name : "");
    if (!im.current) im.open_shard(0);  // no tensors at all: an empty model.safetensors
    im.current->finish();
    im.current.reset();
    if (im.n_shards > 1) {
        uint64_t total = 0;
        nlohmann::json weight_map = nlohmann::json::object();
        for (size_t i = 0; i < im.tensors.size(); ++i) {
            total += im.tensors[i].nbytes;
            weight_map[im.tensors[i].name] = im.shard_name(im.shard_of[i]);
        }
        nlohmann::json index = {{"metadata", {{"total_size", total}}}, {"weight_map", weight_map}};
        auto path = (fs::path(im.dir) / "model.safetensors.index.json").string();
        auto tmp = path + ".tmp";
        std::string text = index.dump(2) + "\n";
        std::FILE* out = std::fopen(tmp.c_str(), "wb");
        NIBBLE_CHECK(out != nullptr, "cannot create {}: {}", tmp, std::strerror(errno));
        bool ok = std::fwrite(text.data(), 1, text.size(), out) == text.size();
        ok = std::fclose(out) == 0 && ok;
        NIBBLE_CHECK(ok, "cannot write {}: {}", tmp, std::strerror(errno));
        NIBBLE_CHECK(std::rename(tmp.c_str(), path.c_str()) == 0, "cannot rename {} to {}: {}", tmp, path,
                     std::strerror(errno));
    }
    im.finished = true;
}

}  // namespace nibble
