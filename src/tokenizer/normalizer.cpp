// Normalizer steps (see normalizer.h).
#include "tokenizer/normalizer.h"

#include <nlohmann/json.hpp>

#include "base/error.h"

namespace nibble::tokenizer {

std::string replace_all(std::string_view text, std::string_view from, std::string_view to) {
    std::string out;
    out.reserve(text.size());
    size_t prev = 0;
    while (true) {
        size_t pos = text.find(from, prev);
        if (pos == std::string_view::npos) break;
        out.append(text.substr(prev, pos - prev));
        out.append(to);
        prev = pos + from.size();
    }
    out.append(text.substr(prev));
    return out;
}

Normalizer Normalizer::from_json(const nlohmann::json& j) {
    Normalizer n;
    if (!j.is_null()) parse(j, n.steps_);
    return n;
}

void Normalizer::parse(const nlohmann::json& j, std::vector<Step>& steps) {
    NIBBLE_CHECK(j.is_object() && j.contains("type"), "tokenizer.json: normalizer without a 'type'");
    const std::string type = j.at("type").get<std::string>();
    if (type == "Sequence") {
        for (const auto& sub : j.at("normalizers")) parse(sub, steps);
    } else if (type == "NFC") {
        steps.emplace_back(Unicode{NormalForm::nfc});
    } else if (type == "NFD") {
        steps.emplace_back(Unicode{NormalForm::nfd});
    } else if (type == "NFKC") {
        steps.emplace_back(Unicode{NormalForm::nfkc});
    } else if (type == "NFKD") {
        steps.emplace_back(Unicode{NormalForm::nfkd});
    } else if (type == "Prepend") {
        steps.emplace_back(Prepend{j.at("prepend").get<std::string>()});
    } else if (type == "Replace") {
        const auto& pattern = j.at("pattern");
        std::string content = j.at("content").get<std::string>();
        if (pattern.contains("String")) {
            std::string from = pattern.at("String").get<std::string>();
            NIBBLE_CHECK(!from.empty(), "tokenizer.json: normalizer Replace with an empty String pattern");
            steps.emplace_back(ReplaceString{std::move(from), std::move(content)});
        } else if (pattern.contains("Regex")) {
            auto re = std::make_shared<const Regex>(pattern.at("Regex").get<std::string>(), "tokenizer.json: normalizer Replace");
            steps.emplace_back(ReplaceRegex{std::move(re), std::move(content)});
        } else {
            fail("tokenizer.json: normalizer Replace pattern is neither String nor Regex");
        }
    } else if (type == "Strip") {
        steps.emplace_back(Strip{j.value("strip_left", false), j.value("strip_right", false)});
    } else if (type == "Lowercase") {
        steps.emplace_back(Lowercase{});
    } else {
        fail("tokenizer.json: normalizer type '{}' is not supported", type);
    }
}

std::string Normalizer::apply(std::string_view text) const {
    std::string s(text);
    for (const auto& step : steps_) {
        if (s.empty()) break;
        if (const auto* u = std::get_if<Unicode>(&step)) {
            s = normalize(s, u->form);
        } else if (const auto* p = std::get_if<Prepend>(&step)) {
            s.insert(0, p->prefix);
        } else if (const auto* r = std::get_if<ReplaceString>(&step)) {
            if (s.find(r->from) != std::string::npos) s = replace_all(s, r->from, r->to);
        } else if (const auto* rr = std::get_if<ReplaceRegex>(&step)) {
            s = rr->regex->replace_all(s, rr->to);
        } else if (const auto* st = std::get_if<Strip>(&step)) {
            s = std::string(trim_whitespace(s, st->left, st->right));
        } else if (std::holds_alternative<Lowercase>(step)) {
            s = to_lower(s);
        }
    }
    return s;
}

}  // namespace nibble::tokenizer
