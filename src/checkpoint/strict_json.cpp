// Strict JSON: nlohmann's parse callback sees every key and container start/end, which is where duplicate
// keys and excessive nesting are caught (by throwing, which stops the parse at once).
#include "checkpoint/strict_json.h"

#include <set>
#include <vector>

#include "base/error.h"

namespace nibble {

nlohmann::json parse_json_strict(const char* text, size_t size, const std::string& what, int max_depth) {
    using json = nlohmann::json;
    // One set of seen keys per open container (arrays get an unused set, which keeps push/pop simple).
    std::vector<std::set<std::string>> open;
    auto callback = [&](int depth, json::parse_event_t event, json& parsed) -> bool {
        switch (event) {
            case json::parse_event_t::object_start:
            case json::parse_event_t::array_start:
                NIBBLE_CHECK(depth < max_depth, "{}: JSON nests deeper than {} levels", what, max_depth);
                open.emplace_back();
                break;
            case json::parse_event_t::object_end:
            case json::parse_event_t::array_end:
                if (!open.empty()) open.pop_back();
                break;
            case json::parse_event_t::key: {
                const auto& key = parsed.get_ref<const std::string&>();
                NIBBLE_CHECK(!open.empty() && open.back().insert(key).second, "{}: duplicate key \"{}\"",
                             what, key);
                break;
            }
            case json::parse_event_t::value:
                break;
        }
        return true;
    };
    try {
        return json::parse(text, text + size, callback, /*allow_exceptions=*/true, /*ignore_comments=*/false);
    } catch (const json::exception& e) {
        fail("{}: not valid JSON: {}", what, e.what());
    }
}

}  // namespace nibble
