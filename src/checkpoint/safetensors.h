// safetensors: read over mmap (one file, or a sharded checkpoint with model.safetensors.index.json) and
// write. Format: u64 little-endian header length N, N bytes of JSON {name: {dtype, shape, data_offsets:
// [begin, end]}, "__metadata__": {str: str}}, then the data; offsets are relative to the end of the header.
// Every malformed input ends in a nibble::Error naming the file and, where there is one, the tensor.
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

struct TensorInfo {
    std::string name;
    DType dtype = DType::F32;
    Shape shape;
    const uint8_t* data = nullptr;  // into the mmap; valid while the file object lives
    size_t nbytes = 0;
    std::string file;  // path of the file holding it, for messages

    Tensor view() const { return Tensor{const_cast<uint8_t*>(data), dtype, shape, Device::Cpu}; }
};

// Validates a header (the JSON text after the 8-byte length) against a data section of data_size bytes.
// Exposed for the fuzz target; `file` only names the source in messages.
std::vector<TensorInfo> parse_safetensors_header(const char* json, size_t json_size, size_t data_size,
                                                 const std::string& file,
                                                 std::map<std::string, std::string>* metadata);

class SafetensorsFile {
public:
    explicit SafetensorsFile(const std::string& path);
    const std::string& path() const { return file_.path(); }
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
// (every listed shard must exist and hold exactly the tensors the index maps to it).
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

private:
    std::string dir_;
    std::vector<std::unique_ptr<SafetensorsFile>> files_;
    std::map<std::string, const TensorInfo*> tensors_;
};

// Streams a safetensors file to disk without holding all tensors in memory: declare every tensor first
// (fixing the header), then write each tensor's bytes in declaration order.
class SafetensorsWriter {
public:
    explicit SafetensorsWriter(std::string path);
    ~SafetensorsWriter();
    void set_metadata(const std::string& key, const std::string& value);
    void declare(const std::string& name, DType dtype, const Shape& shape);
    // Writes the next declared tensor; `name` must match it and `nbytes` must equal dtype x shape.
    void write(const std::string& name, const void* data, size_t nbytes);
    // Checks every declared tensor was written, flushes and closes. Written to PATH.tmp, renamed at the end.
    void finish();

private:
    struct Impl;
    std::unique_ptr<Impl> impl_;
};

}  // namespace nibble
