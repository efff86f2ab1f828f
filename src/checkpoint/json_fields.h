// Typed, checked reads of fields of a JSON object (config.json, hf_quant_config.json), so every missing
// field or wrong type ends in a nibble::Error naming the file and the dotted field path, e.g.
// "model/config.json: field 'rope_scaling.factor' must be a number, got string \"8\"".
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

namespace nibble {

// Whether a JSON null counts as "absent" (Python None, a legal value for the field) or is an error.
enum class NullIs { Absent, Error };

class JsonObject {
public:
    // `value` must be an object (else an error naming `path`, or "top level" when it is empty). The JSON
    // must outlive this view.
    JsonObject(const nlohmann::json& value, std::string source, std::string path = {});

    const nlohmann::json& json() const { return *value_; }
    const std::string& source() const { return source_; }
    // Dotted path of this object ("rope_scaling"); empty for the top level.
    const std::string& path() const { return path_; }
    // Dotted path of a field of this object: "rope_scaling.factor".
    std::string field(std::string_view key) const;

    // nullptr when the key is absent.
    const nlohmann::json* find(std::string_view key) const;
    bool has(std::string_view key) const { return find(key) != nullptr; }
    // True when the key is present with value null.
    bool is_null(std::string_view key) const;

    // Required fields: missing or null or of the wrong type is an error.
    int64_t get_int(std::string_view key) const;
    double get_number(std::string_view key) const;
    bool get_bool(std::string_view key) const;
    std::string get_string(std::string_view key) const;
    JsonObject get_object(std::string_view key) const;
    std::vector<std::string> get_string_list(std::string_view key) const;

    // Optional fields: nullopt when absent (or null, when `null` is NullIs::Absent).
    std::optional<int64_t> opt_int(std::string_view key, NullIs null = NullIs::Error) const;
    std::optional<double> opt_number(std::string_view key, NullIs null = NullIs::Error) const;
    std::optional<bool> opt_bool(std::string_view key, NullIs null = NullIs::Error) const;
    std::optional<std::string> opt_string(std::string_view key, NullIs null = NullIs::Error) const;
    std::optional<JsonObject> opt_object(std::string_view key, NullIs null = NullIs::Error) const;
    std::optional<std::vector<std::string>> opt_string_list(std::string_view key,
                                                            NullIs null = NullIs::Error) const;

    // Throws "<source>: field '<path.key>' <message>".
    [[noreturn]] void fail_field(std::string_view key, std::string_view message) const;

private:
    const nlohmann::json& required(std::string_view key) const;
    // Present and not a null that counts as absent.
    const nlohmann::json* present(std::string_view key, NullIs null) const;
    int64_t as_int(std::string_view key, const nlohmann::json& v) const;
    double as_number(std::string_view key, const nlohmann::json& v) const;
    bool as_bool(std::string_view key, const nlohmann::json& v) const;
    std::string as_string(std::string_view key, const nlohmann::json& v) const;
    std::vector<std::string> as_string_list(std::string_view key, const nlohmann::json& v) const;

    const nlohmann::json* value_;
    std::string source_;
    std::string path_;
};

// "string \"abc\"", "integer 3", "null", "object", ... for messages about a value of the wrong type.
std::string describe_json_value(const nlohmann::json& value);

// Reads and parses a JSON file; a missing file or a syntax error is a nibble::Error naming `path`.
nlohmann::json read_json_file(const std::string& path);

}  // namespace nibble
