// Routes and the life of one generation request: parse -> render -> tokenize -> Engine::submit -> outputs
// through per-choice OutputProcessors -> JSON or SSE. Outputs reach the HTTP thread through a Channel
// (the engine's sink only queues them), so the engine thread never waits on a client.
#include "server/http_server.h"

#include <httplib.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <mutex>
#include <random>

#include "base/error.h"
#include "base/log.h"
#include "server/api_error.h"
#include "server/metrics.h"
#include "server/openai_request.h"
#include "server/openai_response.h"
#include "server/output_processor.h"

namespace nibble::server {

namespace {

using Clock = std::chrono::steady_clock;

double seconds_between(Clock::time_point a, Clock::time_point b) {
    return std::chrono::duration<double>(b - a).count();
}

int64_t unix_time() {
    return std::chrono::duration_cast<std::chrono::seconds>(std::chrono::system_clock::now().time_since_epoch())
        .count();
}

// Engine thread -> HTTP thread.
class Channel {
public:
    void push(const RequestOutput& output) {
        {
            std::lock_guard lock(mutex_);
            queue_.push_back(output);
        }
        ready_.notify_one();
    }
    // Everything queued, waiting up to `timeout` for the first.
    std::vector<RequestOutput> take(std::chrono::milliseconds timeout) {
        std::unique_lock lock(mutex_);
        ready_.wait_for(lock, timeout, [&] { return !queue_.empty(); });
        std::vector<RequestOutput> out(std::make_move_iterator(queue_.begin()), std::make_move_iterator(queue_.end()));
        queue_.clear();
        return out;
    }

private:
    std::mutex mutex_;
    std::condition_variable ready_;
    std::deque<RequestOutput> queue_;
};

struct ChoiceState {
    std::string content, reasoning;
    ojson tool_calls = ojson::array();
    std::vector<TokenLogprobEntry> logprobs;
    std::string finish_reason;
    int n_calls = 0;
    bool sent_role = false;
    std::optional<Clock::time_point> last_token;
};

void set_json(httplib::Response& res, int status, const ojson& body) {
    res.status = status;
    res.set_content(body.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace), "application/json");
}

std::string sse(const ojson& body) {
    return "data: " + body.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace) + "\n\n";
}

}  // namespace

struct HttpServer::Impl {
    Engine& engine;
    const tokenizer::Tokenizer& tok;
    ServerConfig config;
    Metrics metrics;
    httplib::Server http;
    std::atomic<uint64_t> next_id{0};
    uint64_t id_salt;
    int bound_port = -1;

    Impl(Engine& engine, const tokenizer::Tokenizer& tok, ServerConfig cfg)
        : engine(engine), tok(tok), config(std::move(cfg)), metrics(config.model_names.at(0)) {
        std::random_device rd;
        id_salt = (uint64_t{rd()} << 32) ^ rd();
        routes();
    }

    RequestLimits limits() const {
        RequestLimits l;
        l.vocab_size = static_cast<int64_t>(tok.vocab_size());
        return l;
    }

    std::string new_id(const char* prefix) {
        return fmt::format("{}-{:016x}{:08x}", prefix, id_salt, next_id.fetch_add(1));
    }

    void check_auth(const httplib::Request& req) const {
        if (config.api_key.empty()) return;
        const std::string header = req.get_header_value("Authorization");
        const std::string expected = "Bearer " + config.api_key;
        // Constant-time compare: the key's bytes do not show in the timing.
        bool ok = header.size() == expected.size();
        unsigned char diff = 0;
        for (size_t i = 0; i < header.size() && i < expected.size(); ++i)
            diff |= static_cast<unsigned char>(header[i] ^ expected[i]);
        if (!ok || diff != 0)
            throw ApiError(401, "Incorrect or missing API key: send \"Authorization: Bearer <key>\"", "",
                           "invalid_api_key", "authentication_error");
    }

    void check_model(const std::string& model) const {
        if (model.empty()) return;
        for (const auto& name : config.model_names)
            if (name == model) return;
        throw ApiError(404, fmt::format("The model `{}` does not exist (served: {})", model, config.model_names[0]),
                       "model", "model_not_found");
    }

    // Defaults from generation_config.json apply to fields the request leaves out.
    void apply_defaults(ojson& body) const {
        if (!body.is_object()) return;
        for (const auto& [key, value] : config.sampling_defaults.items())
            if (!body.contains(key) || body.at(key).is_null()) body[key] = value;
    }

    // Wraps a handler: API errors and library errors become OpenAI error objects.
    template <class F>
    httplib::Server::Handler guarded(F f) {
        return [this, f](const httplib::Request& req, httplib::Response& res) {
            try {
                f(req, res);
            } catch (const ApiError& e) {
                set_json(res, e.status, e.body());
            } catch (const Error& e) {
                set_json(res, 400, ApiError(400, e.what()).body());
            } catch (const std::exception& e) {
                log::error("{} {}: {}", req.method, req.path, e.what());
                set_json(res, 500, ApiError(500, e.what(), "", "", "server_error").body());
            }
        };
    }

    void routes() {
        http.set_payload_max_length(config.max_body_bytes);
        const int threads = config.http_threads;
        http.new_task_queue = [threads] { return new httplib::ThreadPool(static_cast<size_t>(threads)); };
        // Errors httplib answers by itself (unknown route, body too large ...) get an OpenAI error body too.
        http.set_error_handler(httplib::Server::HandlerWithResponse([](const httplib::Request& req,
                                                                        httplib::Response& res) {
            if (!res.body.empty()) return httplib::Server::HandlerResponse::Unhandled;
            std::string message;
            if (res.status == 404) message = fmt::format("no route {} {}", req.method, req.path);
            else if (res.status == 413) message = "the request body is larger than the server accepts";
            else message = fmt::format("HTTP {}", res.status);
            set_json(res, res.status, ApiError(res.status, message).body());
            return httplib::Server::HandlerResponse::Handled;
        }));
        http.Get("/health", [](const httplib::Request&, httplib::Response& res) { res.status = 200; });
        http.Get("/metrics", [this](const httplib::Request&, httplib::Response& res) {
            res.set_content(metrics.render(engine.stats()), "text/plain; version=0.0.4; charset=utf-8");
        });
        http.Get("/v1/models", guarded([this](const httplib::Request& req, httplib::Response& res) {
            check_auth(req);
            ojson data = ojson::array();
            for (const auto& name : config.model_names)
                data.push_back({{"id", name},
                                {"object", "model"},
                                {"created", unix_time()},
                                {"owned_by", "nibble"},
                                {"root", config.model_root},
                                {"parent", nullptr},
                                {"max_model_len", config.max_model_len}});
            set_json(res, 200, ojson{{"object", "list"}, {"data", std::move(data)}});
        }));
        http.Post("/v1/chat/completions", guarded([this](const httplib::Request& req, httplib::Response& res) {
            check_auth(req);
            chat(req, res);
        }));
        http.Post("/v1/completions", guarded([this](const httplib::Request& req, httplib::Response& res) {
            check_auth(req);
            completion(req, res);
        }));
        http.Post("/tokenize", guarded([this](const httplib::Request& req, httplib::Response& res) {
            check_auth(req);
            tokenize(req, res);
        }));
        http.Post("/detokenize", guarded([this](const httplib::Request& req, httplib::Response& res) {
            check_auth(req);
            detokenize(req, res);
        }));
    }

    // The rendered prompt of a chat request.
    std::string render(const ChatRequest& r, const ojson& messages, const std::optional<ojson>& tools) const {
        const std::optional<ChatTemplate>& tmpl =
            tools && config.chat_template_with_tools ? config.chat_template_with_tools : config.chat_template;
        if (!tmpl) throw ApiError(400, "the model has no chat template; start the server with --chat-template FILE");
        ChatInputs inputs;
        inputs.messages = messages;
        inputs.tools = tools;
        inputs.add_generation_prompt = r.add_generation_prompt;
        inputs.special_tokens = config.special_tokens;
        inputs.extra = r.chat_template_kwargs;
        std::string text;
        try {
            text = render_chat(*tmpl, inputs);
        } catch (const Error& e) {
            throw ApiError(400, fmt::format("chat template: {}", e.what()), "messages");
        }
        if (r.continue_final_message) {
            // As transformers does: cut after the final message's content, so generation continues it.
            const ojson& last = messages.back();
            const std::string content = last.contains("content") && last.at("content").is_string()
                                            ? last.at("content").get<std::string>() : "";
            const size_t at = content.empty() ? std::string::npos : text.rfind(content);
            if (at == std::string::npos)
                throw ApiError(400, "continue_final_message: the final message's content is not in the rendered prompt",
                               "continue_final_message");
            text.resize(at + content.size());
        }
        return text;
    }

    std::vector<int32_t> encode(const std::string& text, bool add_special_tokens) const {
        std::vector<int32_t> ids;
        for (uint32_t id : tok.encode(text, add_special_tokens)) ids.push_back(static_cast<int32_t>(id));
        return ids;
    }

    // max_tokens against the context; fills generation.max_tokens.
    void fit_context(CommonRequest& r, size_t prompt_tokens) const {
        const int64_t p = static_cast<int64_t>(prompt_tokens);
        if (p >= config.max_model_len)
            throw ApiError(400,
                           fmt::format("This model's maximum context length is {} tokens. However, your prompt has {} "
                                       "tokens, leaving no room for completion tokens.",
                                       config.max_model_len, p),
                           "messages", "context_length_exceeded");
        const int64_t max_tokens = r.max_tokens.value_or(config.max_model_len - p);
        if (p + max_tokens > config.max_model_len)
            throw ApiError(400,
                           fmt::format("This model's maximum context length is {} tokens. However, you requested {} "
                                       "tokens ({} in the prompt, {} in the completion). Please reduce the length of "
                                       "the prompt or completion.",
                                       config.max_model_len, p + max_tokens, p, max_tokens),
                           "max_tokens", "context_length_exceeded");
        r.generation.max_tokens = max_tokens;
    }

    OutputOptions output_options(const CommonRequest& r) const {
        OutputOptions o;
        o.stop = r.stop;
        o.skip_special_tokens = r.skip_special_tokens;
        o.tokens_as_ids = r.tokens_as_ids;
        for (int32_t id : r.generation.stop_token_ids) o.stop_token_ids.insert(id);
        if (!r.generation.ignore_eos)
            for (int32_t id : config.eos_token_ids) o.stop_token_ids.insert(id);
        return o;
    }

    // --- one generation request -------------------------------------------------------------------------

    struct Generation {
        std::string id;
        bool chat = false;
        bool stream = false;
        bool include_usage = false;
        bool logprobs = false;
        std::string model;
        int64_t created = 0;
        std::shared_ptr<Channel> channel = std::make_shared<Channel>();
        std::vector<OutputProcessor> processors;
        std::vector<ChoiceState> choices;
        int64_t prompt_tokens = 0, cached_tokens = 0;
        bool done = false;
        std::string error;
        Clock::time_point start = Clock::now();
        bool first_token_seen = false;
        std::vector<int64_t> completion_offsets;  // completions logprobs text_offset per choice
        std::string echo;                         // completions echo: the prompt text
    };

    void submit(Generation& g, GenerationRequest request) {
        request.id = g.id;
        std::weak_ptr<Channel> weak = g.channel;
        try {
            engine.submit(std::move(request), [weak](const RequestOutput& out) {
                if (auto ch = weak.lock()) ch->push(out);
            });
        } catch (const Error& e) {
            throw ApiError(400, e.what());
        }
    }

    // Applies the engine's outputs; returns the changed choices' deltas in order.
    std::vector<std::pair<int, ChoiceDelta>> apply(Generation& g, const std::vector<RequestOutput>& outputs) {
        std::vector<std::pair<int, ChoiceDelta>> deltas;
        const auto now = Clock::now();
        for (const auto& out : outputs) {
            g.prompt_tokens = std::max(g.prompt_tokens, out.prompt_tokens);
            g.cached_tokens = std::max(g.cached_tokens, out.cached_prompt_tokens);
            if (!out.error.empty()) g.error = out.error;
            for (const auto& seq : out.outputs) {
                if (seq.index < 0 || seq.index >= static_cast<int>(g.processors.size())) continue;
                ChoiceState& c = g.choices[seq.index];
                if (!seq.tokens.empty()) {
                    if (!g.first_token_seen) {
                        g.first_token_seen = true;
                        metrics.observe_time_to_first_token(seconds_between(g.start, now));
                    } else if (c.last_token) {
                        metrics.observe_inter_token_latency(seconds_between(*c.last_token, now) /
                                                            static_cast<double>(seq.tokens.size()));
                    }
                    c.last_token = now;
                }
                ChoiceDelta d = g.processors[seq.index].process(seq);
                if (d.stop_string_hit) engine.finish_sequence(g.id, seq.index, FinishReason::Stop);
                if (d.finish_reason) {
                    c.finish_reason = *d.finish_reason;
                    metrics.count_finished(*d.finish_reason);
                }
                if (!d.empty()) deltas.emplace_back(seq.index, std::move(d));
            }
            if (out.finished) g.done = true;
        }
        if (g.done) {
            // Choices the engine ended without a final output (it failed) still need a finish reason.
            for (size_t i = 0; i < g.choices.size(); ++i) {
                if (!g.choices[i].finish_reason.empty()) continue;
                SequenceOutput end;
                end.index = static_cast<int>(i);
                end.finish = FinishReason::Abort;
                ChoiceDelta d = g.processors[i].process(end);
                g.choices[i].finish_reason = d.finish_reason.value_or("abort");
                metrics.count_finished(g.choices[i].finish_reason);
                deltas.emplace_back(static_cast<int>(i), std::move(d));
            }
            metrics.observe_request_latency(seconds_between(g.start, now));
        }
        return deltas;
    }

    Usage usage(const Generation& g) const {
        Usage u;
        u.prompt_tokens = g.prompt_tokens;
        u.cached_tokens = g.cached_tokens;
        for (const auto& p : g.processors) u.completion_tokens += p.num_tokens();
        return u;
    }

    std::string tool_call_id(const Generation& g, int choice, int k) const {
        return fmt::format("call_{}_{}_{}", g.id.substr(g.id.find('-') + 1), choice, k);
    }

    // Accumulates deltas for a whole (non-streamed) response.
    void accumulate(Generation& g, std::vector<std::pair<int, ChoiceDelta>>& deltas) {
        for (auto& [i, d] : deltas) {
            ChoiceState& c = g.choices[i];
            c.content += d.content;
            c.reasoning += d.reasoning;
            for (const auto& call : d.tool_calls) c.tool_calls.push_back(tool_call_json(call, tool_call_id(g, i, c.n_calls++), -1));
            for (auto& e : d.logprobs) c.logprobs.push_back(std::move(e));
        }
    }

    ojson chunk_base(const Generation& g) const {
        return ojson{{"id", g.id},
                     {"object", g.chat ? "chat.completion.chunk" : "text_completion"},
                     {"created", g.created},
                     {"model", g.model}};
    }

    // SSE events for streamed deltas.
    std::string stream_events(Generation& g, std::vector<std::pair<int, ChoiceDelta>>& deltas) {
        std::string out;
        for (auto& [i, d] : deltas) {
            ChoiceState& c = g.choices[i];
            ojson choice = ojson::object();
            choice["index"] = i;
            if (g.chat) {
                ojson delta = ojson::object();
                if (!c.sent_role) {
                    delta["role"] = "assistant";
                    c.sent_role = true;
                }
                if (!d.content.empty() || (delta.contains("role") && d.reasoning.empty() && d.tool_calls.empty()))
                    delta["content"] = d.content;
                if (!d.reasoning.empty()) delta["reasoning_content"] = d.reasoning;
                if (!d.tool_calls.empty()) {
                    ojson calls = ojson::array();
                    for (const auto& call : d.tool_calls) {
                        const int k = c.n_calls++;
                        calls.push_back(tool_call_json(call, tool_call_id(g, i, k), k));
                    }
                    delta["tool_calls"] = std::move(calls);
                }
                choice["delta"] = std::move(delta);
                choice["logprobs"] = g.logprobs && !d.logprobs.empty() ? chat_logprobs_json(d.logprobs) : ojson(nullptr);
            } else {
                std::string text = d.content;
                if (!c.sent_role) {
                    text = g.echo + text;  // echo goes out with the first chunk
                    c.sent_role = true;
                }
                choice["text"] = text;
                choice["logprobs"] = g.logprobs && !d.logprobs.empty()
                                         ? completion_logprobs_json(d.logprobs, g.completion_offsets[i]) : ojson(nullptr);
            }
            choice["finish_reason"] = d.finish_reason ? ojson(*d.finish_reason) : ojson(nullptr);
            ojson chunk = chunk_base(g);
            chunk["choices"] = ojson::array({std::move(choice)});
            if (g.include_usage) chunk["usage"] = nullptr;
            out += sse(chunk);
        }
        return out;
    }

    ojson whole_response(Generation& g) {
        ojson choices = ojson::array();
        for (size_t i = 0; i < g.choices.size(); ++i) {
            ChoiceState& c = g.choices[i];
            ojson choice = ojson::object();
            choice["index"] = i;
            if (g.chat) {
                ojson message = {{"role", "assistant"}};
                message["content"] = c.content.empty() && !c.tool_calls.empty() ? ojson(nullptr) : ojson(c.content);
                if (config.reasoning_parser) message["reasoning_content"] = c.reasoning.empty() ? ojson(nullptr) : ojson(c.reasoning);
                message["tool_calls"] = c.tool_calls;
                choice["message"] = std::move(message);
                choice["logprobs"] = g.logprobs ? chat_logprobs_json(c.logprobs) : ojson(nullptr);
            } else {
                choice["text"] = g.echo + c.content;
                int64_t offset = static_cast<int64_t>(g.echo.size());
                choice["logprobs"] = g.logprobs ? completion_logprobs_json(c.logprobs, offset) : ojson(nullptr);
            }
            choice["finish_reason"] = c.finish_reason;
            choices.push_back(std::move(choice));
        }
        ojson body = {{"id", g.id},
                      {"object", g.chat ? "chat.completion" : "text_completion"},
                      {"created", g.created},
                      {"model", g.model},
                      {"choices", std::move(choices)},
                      {"usage", usage_json(usage(g))}};
        return body;
    }

    // Runs a submitted generation to its end and answers: JSON, or an SSE stream.
    void respond(std::shared_ptr<Generation> g, httplib::Response& res) {
        if (!g->stream) {
            while (!g->done) {
                auto deltas = apply(*g, g->channel->take(std::chrono::milliseconds(200)));
                accumulate(*g, deltas);
            }
            if (!g->error.empty()) throw ApiError(500, g->error, "", "", "server_error");
            set_json(res, 200, whole_response(*g));
            return;
        }
        res.set_header("Cache-Control", "no-cache");
        res.set_chunked_content_provider(
            "text/event-stream",
            [this, g](size_t, httplib::DataSink& sink) {
                auto outputs = g->channel->take(std::chrono::milliseconds(100));
                auto deltas = apply(*g, outputs);
                std::string events = stream_events(*g, deltas);
                if (g->done) {
                    if (!g->error.empty()) events += sse(ApiError(500, g->error, "", "", "server_error").body());
                    if (g->include_usage) {
                        ojson chunk = chunk_base(*g);
                        chunk["choices"] = ojson::array();
                        chunk["usage"] = usage_json(usage(*g));
                        events += sse(chunk);
                    }
                    events += "data: [DONE]\n\n";
                }
                if (!events.empty() && !sink.write(events.data(), events.size())) return false;  // releaser aborts
                if (g->done) sink.done();
                return true;
            },
            [this, g](bool success) {
                if (!success && !g->done) {
                    // The client went away: free its sequences now.
                    engine.abort(g->id);
                    metrics.count_finished("abort");
                    log::info("{}: client disconnected, request aborted", g->id);
                }
            });
    }

    void chat(const httplib::Request& req, httplib::Response& res) {
        ojson body = parse_json_body(req.body);
        apply_defaults(body);
        ChatRequest r = parse_chat_request(body, limits());
        check_model(r.model);
        std::optional<ToolParserKind> parser;
        if (r.tools && r.tool_choice != ToolChoice::None) {
            if (!config.tool_call_parser)
                throw ApiError(400, "tool calls need the server to be started with --tool-call-parser", "tool_choice");
            if (r.tool_choice == ToolChoice::Auto && !config.enable_auto_tool_choice)
                throw ApiError(400,
                               "\"auto\" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set",
                               "tool_choice");
            parser = config.tool_call_parser;
        }
        std::string prompt = render(r, r.messages, r.tools);
        // required / named: the prompt ends with the opening of a call, so the model writes one (no grammar).
        std::string forced;
        if (parser && (r.tool_choice == ToolChoice::Required || r.tool_choice == ToolChoice::Named))
            forced = forced_call_prefix(*parser, r.tool_choice == ToolChoice::Named ? r.tool_choice_name : "");
        GenerationRequest gen = r.generation;
        gen.prompt = encode(prompt + forced, false);
        if (gen.prompt.empty()) throw ApiError(400, "the rendered prompt is empty", "messages");
        fit_context(r, gen.prompt.size());
        gen.max_tokens = r.generation.max_tokens;

        auto g = std::make_shared<Generation>();
        g->id = new_id("chatcmpl");
        g->chat = true;
        g->stream = r.stream;
        g->include_usage = r.include_usage;
        g->logprobs = r.logprobs;
        g->model = r.model.empty() ? config.model_names[0] : r.model;
        g->created = unix_time();
        OutputOptions options = output_options(r);
        options.reasoning = config.reasoning_parser;
        options.prompt_text = prompt;
        options.tools = parser;
        if (r.tools) options.tool_defs = *r.tools;
        if (r.tool_choice == ToolChoice::Named) options.only_tool = r.tool_choice_name;
        options.forced_prefix = forced;
        for (int i = 0; i < gen.n; ++i) g->processors.emplace_back(tok, options);
        g->choices.resize(static_cast<size_t>(gen.n));
        g->completion_offsets.assign(static_cast<size_t>(gen.n), 0);
        submit(*g, std::move(gen));
        respond(g, res);
    }

    void completion(const httplib::Request& req, httplib::Response& res) {
        ojson body = parse_json_body(req.body);
        apply_defaults(body);
        CompletionRequest r = parse_completion_request(body, limits());
        check_model(r.model);
        GenerationRequest gen = r.generation;
        std::string prompt_text;
        if (r.prompt_text) {
            prompt_text = *r.prompt_text;
            gen.prompt = encode(prompt_text, true);
            if (gen.prompt.empty()) throw ApiError(400, "the prompt encodes to no tokens", "prompt");
        } else {
            gen.prompt = r.prompt_ids;
            std::vector<uint32_t> ids(r.prompt_ids.begin(), r.prompt_ids.end());
            if (r.echo) prompt_text = tok.decode(ids, r.skip_special_tokens);
        }
        fit_context(r, gen.prompt.size());
        gen.max_tokens = r.generation.max_tokens;

        auto g = std::make_shared<Generation>();
        g->id = new_id("cmpl");
        g->stream = r.stream;
        g->include_usage = r.include_usage;
        g->logprobs = r.logprobs;
        g->model = r.model.empty() ? config.model_names[0] : r.model;
        g->created = unix_time();
        if (r.echo) g->echo = prompt_text;
        const OutputOptions options = output_options(r);
        for (int i = 0; i < gen.n; ++i) g->processors.emplace_back(tok, options);
        g->choices.resize(static_cast<size_t>(gen.n));
        g->completion_offsets.assign(static_cast<size_t>(gen.n), static_cast<int64_t>(g->echo.size()));
        submit(*g, std::move(gen));
        respond(g, res);
    }

    void tokenize(const httplib::Request& req, httplib::Response& res) {
        const ojson body = parse_json_body(req.body);
        if (!body.is_object()) throw ApiError(400, "the request body must be a JSON object");
        if (body.contains("model") && body.at("model").is_string()) check_model(body.at("model").get<std::string>());
        std::vector<int32_t> ids;
        if (body.contains("messages")) {
            ChatRequest r = parse_chat_request(body, limits());
            const bool add_special = body.value("add_special_tokens", false);
            ids = encode(render(r, r.messages, r.tools), add_special);
        } else {
            if (!body.contains("prompt") || !body.at("prompt").is_string())
                throw ApiError(400, "'prompt' (a string) or 'messages' is required", "prompt");
            const ojson& add = body.contains("add_special_tokens") ? body.at("add_special_tokens") : ojson(true);
            if (!add.is_boolean()) throw ApiError(400, "'add_special_tokens' must be a boolean", "add_special_tokens");
            ids = encode(body.at("prompt").get<std::string>(), add.get<bool>());
        }
        ojson out = {{"count", ids.size()}, {"max_model_len", config.max_model_len}, {"tokens", ids}};
        if (body.value("return_token_strs", false)) {
            ojson strs = ojson::array();
            for (int32_t id : ids) strs.push_back(std::string(tok.id_to_token(static_cast<uint32_t>(id)).value_or("")));
            out["token_strs"] = std::move(strs);
        } else {
            out["token_strs"] = nullptr;
        }
        set_json(res, 200, out);
    }

    void detokenize(const httplib::Request& req, httplib::Response& res) {
        const ojson body = parse_json_body(req.body);
        if (!body.is_object()) throw ApiError(400, "the request body must be a JSON object");
        if (body.contains("model") && body.at("model").is_string()) check_model(body.at("model").get<std::string>());
        if (!body.contains("tokens") || !body.at("tokens").is_array())
            throw ApiError(400, "'tokens' (an array of token ids) is required", "tokens");
        std::vector<uint32_t> ids;
        for (const auto& id : body.at("tokens")) {
            if (!id.is_number_integer() || id.get<int64_t>() < 0 || id.get<int64_t>() >= static_cast<int64_t>(tok.vocab_size()))
                throw ApiError(400, fmt::format("'tokens': {} is not a token id in [0, {})", id.dump(), tok.vocab_size()),
                               "tokens");
            ids.push_back(id.get<uint32_t>());
        }
        set_json(res, 200, ojson{{"prompt", tok.decode(ids, false)}});
    }
};

HttpServer::HttpServer(Engine& engine, const tokenizer::Tokenizer& tokenizer, ServerConfig config) {
    NIBBLE_CHECK(!config.model_names.empty(), "the server needs a model name");
    impl_ = std::make_unique<Impl>(engine, tokenizer, std::move(config));
}

HttpServer::~HttpServer() { stop(); }

int HttpServer::bind() {
    auto& im = *impl_;
    if (im.config.port == 0) {
        im.bound_port = im.http.bind_to_any_port(im.config.host);
    } else {
        im.bound_port = im.http.bind_to_port(im.config.host, im.config.port) ? im.config.port : -1;
    }
    NIBBLE_CHECK(im.bound_port > 0, "cannot listen on {}:{} (in use, or not an address of this machine)",
                 im.config.host, im.config.port);
    return im.bound_port;
}

int HttpServer::port() const { return impl_->bound_port; }

void HttpServer::run() {
    NIBBLE_CHECK(impl_->bound_port > 0, "HttpServer::run before bind");
    impl_->http.listen_after_bind();
}

void HttpServer::stop() {
    if (impl_) impl_->http.stop();
}

}  // namespace nibble::server
