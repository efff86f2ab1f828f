// Reasoning parsers on canned outputs in the shapes the models' own documentation shows (Qwen3's
// "<think>\n...\n</think>\n\n" blocks, DeepSeek-R1's output after a template-opened <think>), fed whole and
// in arbitrary chunk splits: the streamed pieces must add up to the same reasoning and content.
#include <gtest/gtest.h>

#include <random>

#include "base/error.h"
#include "server/reasoning_parser.h"

namespace nibble::server {
namespace {

struct Split {
    std::string reasoning, content;
};

Split run(ReasoningParserKind kind, const std::string& prompt, const std::vector<std::string>& pieces) {
    ReasoningParser p(kind, prompt);
    Split s;
    for (const auto& piece : pieces) {
        auto d = p.push(piece);
        s.reasoning += d.reasoning;
        s.content += d.content;
    }
    auto d = p.finish();
    s.reasoning += d.reasoning;
    s.content += d.content;
    return s;
}

// Whole, one byte at a time, and 200 random partitions.
void expect_split(ReasoningParserKind kind, const std::string& prompt, const std::string& output,
                  const std::string& reasoning, const std::string& content) {
    Split whole = run(kind, prompt, {output});
    EXPECT_EQ(whole.reasoning, reasoning) << output;
    EXPECT_EQ(whole.content, content) << output;
    std::vector<std::string> bytes;
    for (char c : output) bytes.emplace_back(1, c);
    Split by_byte = run(kind, prompt, bytes);
    EXPECT_EQ(by_byte.reasoning, reasoning);
    EXPECT_EQ(by_byte.content, content);
    std::mt19937 rng(1234);
    for (int trial = 0; trial < 200; ++trial) {
        std::vector<std::string> pieces;
        size_t at = 0;
        while (at < output.size()) {
            const size_t n = std::uniform_int_distribution<size_t>(0, 12)(rng);
            pieces.push_back(output.substr(at, n));
            at += n;
        }
        Split s = run(kind, prompt, pieces);
        ASSERT_EQ(s.reasoning, reasoning) << "trial " << trial;
        ASSERT_EQ(s.content, content) << "trial " << trial;
    }
}

// Qwen3's chat template ends the generation prompt with "<|im_start|>assistant\n".
const std::string kQwenPrompt = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n";

TEST(ReasoningParser, Qwen3ThinkingBlockThenAnswer) {
    expect_split(ReasoningParserKind::Qwen3, kQwenPrompt,
                 "<think>\nThe user asks for the capital of France. That is Paris.\n</think>\n\nThe capital of France is Paris.",
                 "\nThe user asks for the capital of France. That is Paris.\n", "\n\nThe capital of France is Paris.");
}

TEST(ReasoningParser, Qwen3WithoutThinkingIsAllContent) {
    expect_split(ReasoningParserKind::Qwen3, kQwenPrompt, "The capital of France is Paris.", "",
                 "The capital of France is Paris.");
    // enable_thinking=false: the template writes an empty block into the prompt; output is plain content.
    expect_split(ReasoningParserKind::Qwen3, kQwenPrompt + "<think>\n\n</think>\n\n", "Paris.", "", "Paris.");
}

TEST(ReasoningParser, Qwen3TemplateOpenedThink) {
    // Qwen3-2507 thinking templates end the prompt with "<think>\n": the output has only the closing tag.
    expect_split(ReasoningParserKind::Qwen3, kQwenPrompt + "<think>\n", "Paris, surely.\n</think>\n\nParis.",
                 "Paris, surely.\n", "\n\nParis.");
}

TEST(ReasoningParser, DeepSeekR1StartsInReasoning) {
    const std::string prompt = "<｜begin▁of▁sentence｜><｜User｜>1+1?<｜Assistant｜><think>\n";
    expect_split(ReasoningParserKind::DeepSeekR1, prompt, "Adding one and one gives two.\n</think>\n\n**2**",
                 "Adding one and one gives two.\n", "\n\n**2**");
    // Older R1 templates do not open the block; the model then writes <think> itself, which is dropped.
    expect_split(ReasoningParserKind::DeepSeekR1, "<｜User｜>1+1?<｜Assistant｜>", "<think>\nTwo.\n</think>\n\n2",
                 "\nTwo.\n", "\n\n2");
    // Without </think> (max_tokens hit while thinking) everything is reasoning.
    expect_split(ReasoningParserKind::DeepSeekR1, prompt, "Still thinking about </thi", "Still thinking about </thi", "");
}

TEST(ReasoningParser, NemotronV3ThinkingOnAndOff) {
    const std::string on = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\n";
    expect_split(ReasoningParserKind::NemotronV3, on, "Greet back.\n</think>\nHello!", "Greet back.\n", "\nHello!");
    // enable_thinking=false renders "<think></think>" into the prompt.
    const std::string off = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think></think>";
    expect_split(ReasoningParserKind::NemotronV3, off, "Hello!", "", "Hello!");
}

TEST(ReasoningParser, Names) {
    EXPECT_EQ(reasoning_parser_kind("qwen3"), ReasoningParserKind::Qwen3);
    EXPECT_EQ(reasoning_parser_kind("deepseek_r1"), ReasoningParserKind::DeepSeekR1);
    EXPECT_EQ(reasoning_parser_kind("nemotron_v3"), ReasoningParserKind::NemotronV3);
    EXPECT_THROW(reasoning_parser_kind("granite"), Error);
}

}  // namespace
}  // namespace nibble::server
