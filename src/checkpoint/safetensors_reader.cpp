// safetensors reader: validation of the length prefix, the JSON header and the tensors' byte ranges, and
// SafetensorsFile over an mmap. See safetensors.h for the layout and the list of checks.
#include <algorithm>
#include <cstring>
#include <limits>
#include <optional>

#include "base/error.h"
#include "checkpoint/safetensors.h"
#include "checkpoint/strict_json.h"

namespace nibble {

namespace {

using json = nlohmann::json;

// {"name": {"shape": [..]}} is 3 containers deep; nothing valid goes deeper. No valid array (shape,
// data_offsets) is longer than Shape::kMaxDims; the bound keeps a hostile header's parse tree small.
constexpr int kMaxHeaderDepth = 3;
constexpr size_t kMaxHeaderArray = 16;

// A non-negative integer that fits `limit`, or nullopt (floats such as 2.0 are refused too).
std::optional<uint64_t> as_count(const json& v, uint64_t limit) {
    if (v.is_number_unsigned()) {
        auto x = v.get<uint64_t>();
        if (x <= limit) return x;
    } else if (v.is_number_integer()) {
        auto x = v.get<int64_t>();
        if (x >= 0 && static_cast<uint64_t>(x) <= limit) return static_cast<uint64_t>(x);
    }
    return std::nullopt;
}

TensorInfo parse_entry(const std::string& name, const json& entry, size_t data_size, const std::string& file) {
    NIBBLE_CHECK(entry.is_object(), "{}: tensor {}: header entry is a {}, not an object", file, name,
                 entry.type_name());
    TensorInfo t;
    t.name = name;
    t.file = file;

    auto dt = entry.find("dtype");
    NIBBLE_CHECK(dt != entry.end(), "{}: tensor {}: no \"dtype\"", file, name);
    NIBBLE_CHECK(dt->is_string(), "{}: tensor {}: \"dtype\" is a {}, not a string", file, name, dt->type_name());
    auto dtype = dtype_from_name(dt->get_ref<const std::string&>());
    NIBBLE_CHECK(dtype.has_value(), "{}: tensor {}: unknown dtype \"{}\"", file, name,
                 dt->get_ref<const std::string&>());
    t.dtype = *dtype;

    auto sh = entry.find("shape");
    NIBBLE_CHECK(sh != entry.end(), "{}: tensor {}: no \"shape\"", file, name);
    NIBBLE_CHECK(sh->is_array(), "{}: tensor {}: \"shape\" is a {}, not an array", file, name, sh->type_name());
    NIBBLE_CHECK(sh->size() <= static_cast<size_t>(Shape::kMaxDims),
                 "{}: tensor {}: shape has {} dimensions, at most {} are supported", file, name, sh->size(),
                 Shape::kMaxDims);
    uint64_t numel = 1;
    bool overflow = false;
    for (const auto& d : *sh) {
        auto dim = as_count(d, static_cast<uint64_t>(std::numeric_limits<int64_t>::max()));
        NIBBLE_CHECK(dim.has_value(), "{}: tensor {}: shape {} holds {}, not a non-negative integer", file, name,
                     sh->dump(), d.dump());
        t.shape.push_back(static_cast<int64_t>(*dim));
        // Checked at every step against int64 (what Shape::numel() multiplies in), so a zero dim after
        // an overflowing product is still refused.
        overflow = overflow || __builtin_mul_overflow(numel, *dim, &numel) ||
                   numel > static_cast<uint64_t>(std::numeric_limits<int64_t>::max());
    }
    uint64_t nbytes = 0;
    overflow = overflow || __builtin_mul_overflow(numel, static_cast<uint64_t>(dtype_size(t.dtype)), &nbytes);
    NIBBLE_CHECK(!overflow, "{}: tensor {}: shape {} has too many elements", file, name, sh->dump());

    auto off = entry.find("data_offsets");
    NIBBLE_CHECK(off != entry.end(), "{}: tensor {}: no \"data_offsets\"", file, name);
    NIBBLE_CHECK(off->is_array() && off->size() == 2, "{}: tensor {}: \"data_offsets\" is {}, not [begin, end]",
                 file, name, off->dump());
    auto begin = as_count((*off)[0], std::numeric_limits<uint64_t>::max());
    auto end = as_count((*off)[1], std::numeric_limits<uint64_t>::max());
    NIBBLE_CHECK(begin && end, "{}: tensor {}: \"data_offsets\" {} must be non-negative integers", file, name,
                 off->dump());
    NIBBLE_CHECK(*begin <= *end, "{}: tensor {}: data_offsets [{}, {}] begin after end", file, name, *begin,
                 *end);
    NIBBLE_CHECK(*end <= data_size, "{}: tensor {}: data_offsets [{}, {}] run past the data section ({} bytes)",
                 file, name, *begin, *end, data_size);
    NIBBLE_CHECK(*end - *begin == nbytes,
                 "{}: tensor {}: data_offsets [{}, {}] span {} bytes, but {} {} needs {} bytes", file, name,
                 *begin, *end, *end - *begin, dtype_name(t.dtype), t.shape.str(), nbytes);
    t.offset = static_cast<size_t>(*begin);
    t.nbytes = static_cast<size_t>(nbytes);
    return t;
}

}  // namespace

std::vector<TensorInfo> parse_safetensors_header(const char* text, size_t text_size, size_t data_size,
                                                 const std::string& file,
                                                 std::map<std::string, std::string>* metadata) {
    json header = parse_json_strict(text, text_size, file + ": header", kMaxHeaderDepth, kMaxHeaderArray);
    NIBBLE_CHECK(header.is_object(), "{}: header is a JSON {}, not an object", file, header.type_name());

    std::vector<TensorInfo> tensors;
    tensors.reserve(header.size());
    for (const auto& [name, entry] : header.items()) {
        if (name == "__metadata__") {
            NIBBLE_CHECK(entry.is_object(), "{}: \"__metadata__\" is a {}, not an object", file, entry.type_name());
            for (const auto& [key, value] : entry.items()) {
                NIBBLE_CHECK(value.is_string(), "{}: \"__metadata__\" key \"{}\" is a {}, not a string", file, key,
                             value.type_name());
                if (metadata) (*metadata)[key] = value.get<std::string>();
            }
            continue;
        }
        tensors.push_back(parse_entry(name, entry, data_size, file));
    }

    // Overlaps: after sorting by (begin, end) each range must start at or after the previous one's end.
    std::sort(tensors.begin(), tensors.end(), [](const TensorInfo& a, const TensorInfo& b) {
        return a.offset != b.offset ? a.offset < b.offset : a.nbytes < b.nbytes;
    });
    for (size_t i = 1; i < tensors.size(); ++i) {
        const auto& prev = tensors[i - 1];
        const auto& cur = tensors[i];
        NIBBLE_CHECK(cur.offset >= prev.offset + prev.nbytes,
                     "{}: tensor {} (bytes [{}, {})) overlaps tensor {} (bytes [{}, {}))", file, cur.name,
                     cur.offset, cur.offset + cur.nbytes, prev.name, prev.offset, prev.offset + prev.nbytes);
    }
    return tensors;
}

std::vector<TensorInfo> parse_safetensors_bytes(const uint8_t* bytes, size_t size, const std::string& file,
                                                std::map<std::string, std::string>* metadata) {
    NIBBLE_CHECK(size >= 8, "{}: file is {} bytes, shorter than the 8-byte header length", file, size);
    uint64_t n = 0;
    for (int i = 7; i >= 0; --i) n = (n << 8) | bytes[i];  // little-endian whatever the host
    NIBBLE_CHECK(n <= kMaxSafetensorsHeaderBytes, "{}: header length {} exceeds the {}-byte limit", file, n,
                 kMaxSafetensorsHeaderBytes);
    NIBBLE_CHECK(n <= size - 8, "{}: header length {} is larger than the rest of the file ({} bytes)", file, n,
                 size - 8);
    const uint8_t* data = bytes + 8 + n;
    size_t data_size = size - 8 - static_cast<size_t>(n);
    auto tensors = parse_safetensors_header(reinterpret_cast<const char*>(bytes + 8), static_cast<size_t>(n),
                                            data_size, file, metadata);
    for (auto& t : tensors) t.data = data + t.offset;
    return tensors;
}

SafetensorsFile::SafetensorsFile(const std::string& path) : file_(path) {
    tensors_ = parse_safetensors_bytes(file_.data(), file_.size(), path, &metadata_);
    for (size_t i = 0; i < tensors_.size(); ++i) index_.emplace(tensors_[i].name, i);
}

const TensorInfo* SafetensorsFile::find(const std::string& name) const {
    auto it = index_.find(name);
    return it == index_.end() ? nullptr : &tensors_[it->second];
}

}  // namespace nibble
