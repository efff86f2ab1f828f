#include "checkpoint/json_fields.h"

#include <fstream>
#include <limits>
#include <sstream>

#include "base/error.h"

namespace nibble {

std::string describe_json_value(const nlohmann::json& value) {
    constexpr size_t kMaxShown = 60;
    auto shown = [&](const std::string& text) {
        return text.size() <= kMaxShown ? text : text.substr(0, kMaxShown) + "...";
    };
    switch (value.type()) {
    case nlohmann::json::value_t::null: return "null";
    case nlohmann::json::value_t::boolean: return value.get<bool>() ? "boolean true" : "boolean false";
    case nlohmann::json::value_t::number_integer:
    case nlohmann::json::value_t::number_unsigned: return "integer " + value.dump();
    case nlohmann::json::value_t::number_float: return "number " + value.dump();
    case nlohmann::json::value_t::string: return "string " + shown(value.dump());
    case nlohmann::json::value_t::array: return "array";
    case nlohmann::json::value_t::object: return "object";
    default: return "value of an unexpected kind";
    }
}

JsonObject::JsonObject(const nlohmann::json& value, std::string source, std::string path)
    : value_(&value), source_(std::move(source)), path_(std::move(path)) {
    if (!value.is_object()) {
        if (path_.empty()) fail("{}: expected a JSON object at the top level, got {}", source_,
                                describe_json_value(value));
        fail("{}: field '{}' must be an object, got {}", source_, path_, describe_json_value(value));
    }
}

std::string JsonObject::field(std::string_view key) const {
    return path_.empty() ? std::string(key) : path_ + "." + std::string(key);
}

const nlohmann::json* JsonObject::find(std::string_view key) const {
    auto it = value_->find(key);
    return it == value_->end() ? nullptr : &*it;
}

bool JsonObject::is_null(std::string_view key) const {
    const auto* v = find(key);
    return v != nullptr && v->is_null();
}

void JsonObject::fail_field(std::string_view key, std::string_view message) const {
    fail("{}: field '{}' {}", source_, field(key), message);
}

const nlohmann::json& JsonObject::required(std::string_view key) const {
    const auto* v = find(key);
    if (v == nullptr) fail_field(key, "is missing");
    return *v;
}

const nlohmann::json* JsonObject::present(std::string_view key, NullIs null) const {
    const auto* v = find(key);
    if (v != nullptr && v->is_null() && null == NullIs::Absent) return nullptr;
    return v;
}

int64_t JsonObject::as_int(std::string_view key, const nlohmann::json& v) const {
    if (v.is_number_unsigned()) {
        if (v.get<uint64_t>() > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()))
            fail_field(key, "is too large: " + v.dump());
        return static_cast<int64_t>(v.get<uint64_t>());
    }
    if (v.is_number_integer()) return v.get<int64_t>();
    fail_field(key, "must be an integer, got " + describe_json_value(v));
}

double JsonObject::as_number(std::string_view key, const nlohmann::json& v) const {
    if (v.is_number()) return v.get<double>();
    fail_field(key, "must be a number, got " + describe_json_value(v));
}

bool JsonObject::as_bool(std::string_view key, const nlohmann::json& v) const {
    if (v.is_boolean()) return v.get<bool>();
    fail_field(key, "must be true or false, got " + describe_json_value(v));
}

std::string JsonObject::as_string(std::string_view key, const nlohmann::json& v) const {
    if (v.is_string()) return v.get<std::string>();
    fail_field(key, "must be a string, got " + describe_json_value(v));
}

std::vector<std::string> JsonObject::as_string_list(std::string_view key, const nlohmann::json& v) const {
    if (!v.is_array()) fail_field(key, "must be a list of strings, got " + describe_json_value(v));
    std::vector<std::string> out;
    out.reserve(v.size());
    for (size_t i = 0; i < v.size(); ++i) {
        if (!v[i].is_string())
            fail("{}: field '{}[{}]' must be a string, got {}", source_, field(key), i,
                 describe_json_value(v[i]));
        out.push_back(v[i].get<std::string>());
    }
    return out;
}

int64_t JsonObject::get_int(std::string_view key) const { return as_int(key, required(key)); }
double JsonObject::get_number(std::string_view key) const { return as_number(key, required(key)); }
bool JsonObject::get_bool(std::string_view key) const { return as_bool(key, required(key)); }
std::string JsonObject::get_string(std::string_view key) const { return as_string(key, required(key)); }
JsonObject JsonObject::get_object(std::string_view key) const {
    return JsonObject(required(key), source_, field(key));
}
std::vector<std::string> JsonObject::get_string_list(std::string_view key) const {
    return as_string_list(key, required(key));
}

std::optional<int64_t> JsonObject::opt_int(std::string_view key, NullIs null) const {
    const auto* v = present(key, null);
    if (v == nullptr) return std::nullopt;
    return as_int(key, *v);
}
std::optional<double> JsonObject::opt_number(std::string_view key, NullIs null) const {
    const auto* v = present(key, null);
    if (v == nullptr) return std::nullopt;
    return as_number(key, *v);
}
std::optional<bool> JsonObject::opt_bool(std::string_view key, NullIs null) const {
    const auto* v = present(key, null);
    if (v == nullptr) return std::nullopt;
    return as_bool(key, *v);
}
std::optional<std::string> JsonObject::opt_string(std::string_view key, NullIs null) const {
    const auto* v = present(key, null);
    if (v == nullptr) return std::nullopt;
    return as_string(key, *v);
}
std::optional<JsonObject> JsonObject::opt_object(std::string_view key, NullIs null) const {
    const auto* v = present(key, null);
    if (v == nullptr) return std::nullopt;
    return JsonObject(*v, source_, field(key));
}
std::optional<std::vector<std::string>> JsonObject::opt_string_list(std::string_view key, NullIs null) const {
    const auto* v = present(key, null);
    if (v == nullptr) return std::nullopt;
    return as_string_list(key, *v);
}

nlohmann::json read_json_file(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    if (!in) fail("{}: cannot open file", path);
    std::ostringstream text;
    text << in.rdbuf();
    if (in.bad()) fail("{}: read error", path);
    try {
        return nlohmann::json::parse(text.str());
    } catch (const nlohmann::json::exception& e) {
        fail("{}: invalid JSON: {}", path, e.what());
    }
}

}  // namespace nibble
