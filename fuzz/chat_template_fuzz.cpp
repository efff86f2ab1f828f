// libFuzzer target for the chat-template interpreter: random bytes are parsed as a template and, if
// they parse, rendered against a small conversation with tools. Any outcome but a clean render or a
// nibble::Error is a bug (crash, sanitizer report, hang: the limits below bound steps and output).
// Seeds: fuzz/corpus/chat_template/ (the real templates of tests/tokenizer/templates/).
//   cmake -S . -B build-fuzz -G Ninja -DNIBBLE_FUZZ=ON -DCMAKE_CXX_COMPILER=clang++ -DCMAKE_C_COMPILER=clang
//   cmake --build build-fuzz --target chat_template_fuzz && build-fuzz/chat_template_fuzz fuzz/corpus/chat_template
#include "base/error.h"
#include "tokenizer/chat_template.h"

#include <cstddef>
#include <cstdint>
#include <string>

namespace {

const nlohmann::ordered_json& context() {
    static const nlohmann::ordered_json ctx = nlohmann::ordered_json::parse(R"({
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Weather in Zürich? 👋"},
            {"role": "assistant", "content": "", "reasoning_content": "call the tool",
             "tool_calls": [{"id": "call_000000001", "type": "function",
                             "function": {"name": "get_weather", "arguments": {"city": "Zürich"}}}]},
            {"role": "tool", "tool_call_id": "call_000000001", "content": "{\"t\": 21.5}"},
            {"role": "assistant", "content": "21.5 °C", "thinking": "ok"}
        ],
        "tools": [{"type": "function", "function": {"name": "get_weather", "description": "Weather",
                   "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                   "days": {"type": "integer", "default": 1}, "tags": {"type": "array", "items": {"type": "string"}}},
                   "required": ["city"]}}}],
        "documents": null,
        "add_generation_prompt": true,
        "bos_token": "<s>",
        "eos_token": "</s>",
        "enable_thinking": false,
        "reasoning_effort": "low"
    })");
    return ctx;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    std::string source(reinterpret_cast<const char*>(data), size);
    nibble::ChatTemplateLimits limits;
    limits.max_output_bytes = 1 << 20;
    limits.max_steps = 200'000;
    limits.max_call_depth = 50;
    try {
        auto tmpl = nibble::ChatTemplate::parse(std::move(source), "fuzz");
        tmpl.render(context(), limits);
    } catch (const nibble::Error&) {
        // Refusing bad input with a message is the expected outcome.
    }
    return 0;
}
