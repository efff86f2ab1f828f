// safetensors: read over mmap (one file, or a sharded checkpoint with model.safetensors.index.json) and
// write (one file, or a whole sharded checkpoint), streaming.
//
// File layout: u64 little-endian header length N, N bytes of UTF-8 JSON (padded with trailing spaces
// so that 8 + N is a multiple of 8), then the data section. The JSON is an object
//   {"__metadata__": {str: str}, NAME: {"dtype": "BF16", "shape": [d0, d1, ...], "data_offsets": [b, e]}, ...}
// where [b, e) are byte offsets relative to the start of the data section (just after the header).
// Data are little-endian, row-major, densely packed.
//
// Every malformed input ends in a nibble::Error naming the file and, where there is one, the tensor; never
// a crash, an out-of-bounds read or an allocation driven by a size the file claims. What the reader checks:
// header length (at most kMaxSafetensorsHeaderBytes and within the file), JSON syntax and UTF-8, no
// duplicate keys, nesting depth, field types, dtype names, dims (non-negative integers, at most
// Shape::kMaxDims of them, product without overflow), offsets within the data section, byte count equal to
// dtype size x numel, and no two tensors overlapping. It is lenient where nothing unsafe follows: gaps
// between tensors and bytes after the last tensor are allowed (the reference reader rejects both).
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "base/mapped_file.h"
#include "tensor/dtype.h"
#include "tensor/tensor.h"

namespace nibble {

// Largest header accepted: 100 MB, the same cap as the reference implementation (huggingface/safetensors
// MAX_HEADER_SIZE). The biggest real checkpoints' headers are a few MB.
inline constexpr uint64_t kMaxSafetensorsHeaderBytes = 100'000'000;

struct TensorInfo {
    std::string name;
    DType dtype = DType::F32;
    Shape shape;
    const uint8_t* data = nullptr;  // into the mmap; valid while the file object lives (nullptr from
                                    // parse_safetensors_header, which sees no data)
    size_t offset = 0;              // of the first byte, from the start of the data section
    size_t nbytes = 0;
    std::string file;  // path of the file holding it, for messages

    Tensor view() const { return Tensor{const_cast<uint8_t*>(data), dtype, shape, Device::Cpu}; }
};

// Validates a header (the JSON text after the 8-byte length) against a data section of data_size bytes.
// Returns the tensors sorted by offset. Exposed for the fuzz target; `file` only names the source in
// messages. `metadata` (may be null) receives "__metadata__".
std::vector<TensorInfo> parse_safetensors_header(const char* json, size_t json_size, size_t data_size,
                                                 const std::string& file,
                                                 std::map<std::string, std::string>* metadata);

// Validates a whole file held in memory (length prefix, header, data section); the tensors' `data` point
// into `bytes`. What SafetensorsFile runs on its mmap.
std::vector<TensorInfo> parse_safetensors_bytes(const uint8_t* bytes, size_t size, const std::string& file,
                                                std::map<std::string, std::string>* metadata);

class SafetensorsFile {
public:
    explicit SafetensorsFile(const std::string& path);
    const std::string& path() const { return file_.path(); }
    // Sorted by offset in the file, which is the order to stream them in.
    const std::vector<TensorInfo>& tensors() const { return tensors_; }
    const std::map<std::string, std::string>& metadata() const { return metadata_; }
    // nullptr when absent.
    const TensorInfo* find(const std::string& name) const;

private:
    MappedFile file_;
    std::vector<TensorInfo> tensors_;
    std::map<std::string, std::string> metadata_;
    std::map<std::string, size_t> index_;
};

// All tensors of a model folder: model.safetensors, or the shards listed by model.safetensors.index.json
// (every listed shard must exist and hold exactly the tensors the index maps to it; no tensor may be in
// two shards). Without an index the folder must hold model.safetensors; other *.safetensors files beside it
// (Mistral's consolidated.safetensors, a tool's outputs) are ignored, as transformers ignores them.
class Checkpoint {
public:
    explicit Checkpoint(const std::string& dir);
    const std::string& dir() const { return dir_; }
    bool has(const std::string& name) const;
    // Throws "missing tensor NAME in DIR" when absent.
    const TensorInfo& get(const std::string& name) const;
    // As get(), and also checks dtype and shape: "tensor NAME in FILE: expected BF16 [4096, 4096], got ...".
    const TensorInfo& get(const std::string& name, DType dtype, const Shape& shape) const;
    // Names in sorted order.
    std::vector<std::string> names() const;
    // The open files, in shard-name order; tensors() of each is in offset order (for streaming loads).
    const std::vector<std::unique_ptr<SafetensorsFile>>& files() const { return files_; }

private:
    void load_single(const std::string& path);
    void load_sharded(const std::string& index_path);
    std::string dir_;
    std::vector<std::unique_ptr<SafetensorsFile>> files_;
    std::map<std::string, const TensorInfo*> tensors_;
};

// Streams a safetensors file to disk without holding all tensors in memory: declare every tensor first
// (fixing the header), then write each tensor's bytes in declaration order. Offsets follow declaration
// order with no gaps, as the reference writer lays them out; to keep every tensor aligned to its element
// size, declare wider dtypes first (the reference sorts by dtype, widest first, then by name). The header
// is compact JSON, "__metadata__" first, padded with spaces to a multiple of 8 bytes.
// Written to PATH.tmp and renamed to PATH by finish(); destroyed unfinished, it removes PATH.tmp.
class SafetensorsWriter {
public:
    explicit SafetensorsWriter(std::string path);
    ~SafetensorsWriter();
    SafetensorsWriter(const SafetensorsWriter&) = delete;
    SafetensorsWriter& operator=(const SafetensorsWriter&) = delete;
    // Both only before the first write().
    void set_metadata(const std::string& key, const std::string& value);
    void declare(const std::string& name, DType dtype, const Shape& shape);
    // Writes the next declared tensor; `name` must match it and `nbytes` must equal dtype x shape.
    void write(const std::string& name, const void* data, size_t nbytes);
    // Checks every declared tensor was written, flushes and closes. Written to PATH.tmp, renamed at the end.
    void finish();
    const std::string& path() const;

private:
    struct Impl;
    std::unique_ptr<Impl> impl_;
};

// Streams a whole checkpoint folder the way Hugging Face's save_pretrained lays it out: tensors packed in
// declaration order into shards of at most max_shard_bytes of tensor data each (a larger tensor gets a
// shard of its own) named model-00001-of-0000N.safetensors, plus model.safetensors.index.json
// ({"metadata": {"total_size": bytes of all tensors}, "weight_map": {name: shard}}); a checkpoint that
// fits one shard is written as model.safetensors with no index. Metadata go into every shard.
// The folder is created if needed and must not already hold a checkpoint (no mixing with stale shards).
class ShardedCheckpointWriter {
public:
    ShardedCheckpointWriter(std::string dir, uint64_t max_shard_bytes);
    ~ShardedCheckpointWriter();
    ShardedCheckpointWriter(const ShardedCheckpointWriter&) = delete;
    ShardedCheckpointWriter& operator=(const ShardedCheckpointWriter&) = delete;
    void set_metadata(const std::string& key, const std::string& value);
    void declare(const std::string& name, DType dtype, const Shape& shape);
    // Next declared tensor, as SafetensorsWriter::write.
    void write(const std::string& name, const void* data, size_t nbytes);
    // Checks every tensor was written, closes the last shard and writes the index.
    void finish();

private:
    struct Impl;
    std::unique_ptr<Impl> impl_;
};

}  // namespace nibble
