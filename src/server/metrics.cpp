// Prometheus text format: "# HELP", "# TYPE", then samples; histogram buckets are cumulative and end in
// le="+Inf", followed by _sum and _count. Counters end in _total.
#include "server/metrics.h"

#include <fmt/format.h>

namespace nibble::server {

namespace {

std::string escape_label(const std::string& s) {
    std::string out;
    for (char c : s) {
        if (c == '\\' || c == '"') out += '\\';
        if (c == '\n') {
            out += "\\n";
            continue;
        }
        out += c;
    }
    return out;
}

void header(std::string& out, const std::string& name, const char* type, const char* help) {
    out += fmt::format("# HELP {} {}\n# TYPE {} {}\n", name, help, name, type);
}

std::string number(double v) { return fmt::format("{}", v); }

}  // namespace

Histogram::Histogram(std::vector<double> bounds) : bounds_(std::move(bounds)), counts_(bounds_.size() + 1, 0) {}

void Histogram::observe(double value) {
    size_t i = 0;
    while (i < bounds_.size() && value > bounds_[i]) ++i;
    ++counts_[i];
    sum_ += value;
    ++count_;
}

void Histogram::render(std::string& out, const std::string& name, const std::string& labels) const {
    uint64_t cumulative = 0;
    for (size_t i = 0; i < bounds_.size(); ++i) {
        cumulative += counts_[i];
        out += fmt::format("{}_bucket{{{},le=\"{}\"}} {}\n", name, labels, number(bounds_[i]), cumulative);
    }
    cumulative += counts_.back();
    out += fmt::format("{}_bucket{{{},le=\"+Inf\"}} {}\n", name, labels, cumulative);
    out += fmt::format("{}_sum{{{}}} {}\n", name, labels, number(sum_));
    out += fmt::format("{}_count{{{}}} {}\n", name, labels, count_);
}

Metrics::Metrics(std::string model_name)
    : labels_(fmt::format("model_name=\"{}\"", escape_label(model_name))),
      // vLLM's buckets for the same histograms.
      ttft_({0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
             80.0, 160.0, 640.0, 2560.0}),
      itl_({0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
            80.0}),
      e2e_({0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0,
            960.0, 1920.0, 7680.0}) {}

void Metrics::observe_time_to_first_token(double seconds) {
    std::lock_guard lock(mutex_);
    ttft_.observe(seconds);
}

void Metrics::observe_inter_token_latency(double seconds) {
    std::lock_guard lock(mutex_);
    itl_.observe(seconds);
}

void Metrics::observe_request_latency(double seconds) {
    std::lock_guard lock(mutex_);
    e2e_.observe(seconds);
}

void Metrics::count_finished(const std::string& finish_reason) {
    std::lock_guard lock(mutex_);
    ++finished_[finish_reason];
}

std::string Metrics::render(const EngineStats& s) const {
    std::string out;
    auto gauge = [&](const char* name, const char* help, double v) {
        header(out, name, "gauge", help);
        out += fmt::format("{}{{{}}} {}\n", name, labels_, number(v));
    };
    auto counter = [&](const char* name, const char* help, double v) {
        header(out, name, "counter", help);
        out += fmt::format("{}{{{}}} {}\n", name, labels_, number(v));
    };
    gauge("nibble:num_requests_running", "Requests whose sequences are scheduled (prefilling or decoding).",
          static_cast<double>(s.num_running));
    gauge("nibble:num_requests_waiting", "Requests waiting to be scheduled.", static_cast<double>(s.num_waiting));
    gauge("nibble:kv_cache_usage_perc", "Fraction of KV-cache blocks in use (1 = full).",
          s.kv_blocks_total > 0 ? static_cast<double>(s.kv_blocks_used) / static_cast<double>(s.kv_blocks_total) : 0.0);
    counter("nibble:prefix_cache_queries_total", "Prompt tokens looked up in the prefix cache.",
            static_cast<double>(s.prefix_cache_queries));
    counter("nibble:prefix_cache_hits_total", "Prompt tokens found in the prefix cache.",
            static_cast<double>(s.prefix_cache_hits));
    gauge("nibble:prefix_cache_hit_rate", "Prefix-cache hits over queries since start, in tokens.",
          s.prefix_cache_queries > 0
              ? static_cast<double>(s.prefix_cache_hits) / static_cast<double>(s.prefix_cache_queries) : 0.0);
    counter("nibble:prompt_tokens_total", "Prompt tokens processed.", static_cast<double>(s.prompt_tokens_total));
    counter("nibble:generation_tokens_total", "Tokens generated.", static_cast<double>(s.generation_tokens_total));
    counter("nibble:num_preemptions_total", "Sequences preempted for lack of KV blocks.",
            static_cast<double>(s.num_preemptions));
    std::lock_guard lock(mutex_);
    header(out, "nibble:request_success_total", "counter", "Requests finished, by finish reason.");
    for (const char* reason : {"stop", "length", "tool_calls", "abort"}) {
        auto it = finished_.find(reason);
        out += fmt::format("nibble:request_success_total{{{},finished_reason=\"{}\"}} {}\n", labels_, reason,
                           it == finished_.end() ? 0 : it->second);
    }
    header(out, "nibble:time_to_first_token_seconds", "histogram", "Time from request arrival to its first token.");
    ttft_.render(out, "nibble:time_to_first_token_seconds", labels_);
    header(out, "nibble:inter_token_latency_seconds", "histogram", "Time between two tokens of a sequence.");
    itl_.render(out, "nibble:inter_token_latency_seconds", labels_);
    header(out, "nibble:e2e_request_latency_seconds", "histogram", "Time from request arrival to its end.");
    e2e_.render(out, "nibble:e2e_request_latency_seconds", labels_);
    return out;
}

}  // namespace nibble::server
