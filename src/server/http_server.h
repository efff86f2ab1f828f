// The OpenAI-compatible HTTP server: routes on cpp-httplib, one engine behind them.
//   POST /v1/chat/completions, /v1/completions   (JSON, or SSE with stream: true)
//   GET  /v1/models, /health, /metrics
//   POST /tokenize, /detokenize                  (vLLM's extra endpoints)
// Each request is parsed and validated (OpenAI error objects with 4xx on bad input), rendered and
// tokenized on its HTTP thread, submitted to the engine, and its outputs turned into text there too; the
// engine thread only queues outputs. A streaming client that goes away has its request aborted at once.
#pragma once

#include <filesystem>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "engine/engine.h"
#include "server/reasoning_parser.h"
#include "server/tool_parser.h"
#include "tokenizer/chat_template.h"
#include "tokenizer/tokenizer.h"

namespace nibble::server {

struct ServerConfig {
    std::string host = "127.0.0.1";
    int port = 8000;                      // 0: any free port (see HttpServer::port())
    std::string api_key;                  // "" for none
    std::vector<std::string> model_names; // names accepted in "model"; the first is reported
    std::string model_root;               // shown as "root" in /v1/models
    int64_t max_model_len = 4096;
    size_t max_body_bytes = size_t{32} << 20;
    int http_threads = 64;                // concurrent connections served (a stream holds one)
    std::optional<ReasoningParserKind> reasoning_parser;
    std::optional<ToolParserKind> tool_call_parser;
    bool enable_auto_tool_choice = false;
    std::optional<ChatTemplate> chat_template;             // used without tools
    std::optional<ChatTemplate> chat_template_with_tools;  // used when the request has tools
    std::vector<std::pair<std::string, nlohmann::ordered_json>> special_tokens;  // for templates
    nlohmann::ordered_json sampling_defaults = nlohmann::ordered_json::object();  // from generation_config.json
    std::vector<int32_t> eos_token_ids;
};

class HttpServer {
public:
    HttpServer(Engine& engine, const tokenizer::Tokenizer& tokenizer, ServerConfig config);
    ~HttpServer();
    HttpServer(const HttpServer&) = delete;
    HttpServer& operator=(const HttpServer&) = delete;

    // Binds host:port (nibble::Error when it cannot); returns the port bound.
    int bind();
    int port() const;
    // Serves until stop() (from another thread or a signal handler's helper thread).
    void run();
    void stop();

private:
    struct Impl;
    std::unique_ptr<Impl> impl_;
};

}  // namespace nibble::server
