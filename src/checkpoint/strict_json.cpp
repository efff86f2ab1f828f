// Strict JSON: nlohmann's parse callback sees every key and container start/end, which is where duplicate
// keys and excessive nesting are caught (by throwing, which stops the parse at once).
#include "checkpoint/strict_json.h"

#include <set>
#include <vector>

#include "base/error.h"

namespace nibble {

nlohmann::json parse_json_strict(const char* text, size_t size, const std::string& what, int max_depth,
                                 size_t max_array_size) {
    using json = nlohmann::json;
    struct Open {
        bool is_array = false;
        size_t n_elements = 0;
        std::set<std::string> keys;  // objects only
    };
    std::vector<Open> open;
    // Counts one element of the innermost open array.
    auto count_element = [&] {
        if (open.empty() || !open.back().is_array) return;
        NIBBLE_CHECK(++open.back().n_elements <= max_array_size, "{}: JSON array longer than {} elements", what,
                     max_array_size);
    };
    auto callback = [&](int depth, json::parse_event_t event, json& parsed) -> bool {
        switch (event) {
            case json::parse_event_t::object_start:
            case json::parse_event_t::array_start:
                NIBBLE_CHECK(depth < max_depth, "{}: JSON nests deeper than {} levels", what, max_depth);
                count_element();
                open.push_back({event == json::parse_event_t::array_start, 0, {}});
                break;
            case json::parse_event_t::object_end:
            case json::parse_event_t::array_end:
                if (!open.empty()) open.pop_back();
                break;
            case json::parse_event_t::key: {
                const auto& key = parsed.get_ref<const std::string&>();
                NIBBLE_CHECK(!open.empty() && open.back().keys.insert(key).second, "{}: duplicate key \"{}\"",
                             what, key);
                break;
            }
            case json::parse_event_t::value:
                count_element();
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
