// Server metrics and their Prometheus text exposition (format 0.0.4) for GET /metrics. Gauges of the
// engine (running, waiting, KV usage, prefix-cache counters) are read from EngineStats at scrape time;
// latencies are observed by the HTTP layer into histograms. Names follow vLLM's with the nibble: prefix.
#pragma once

#include <cstdint>
#include <map>
#include <mutex>
#include <string>
#include <vector>

#include "engine/engine.h"

namespace nibble::server {

class Histogram {
public:
    explicit Histogram(std::vector<double> bounds);  // upper bounds, ascending; +Inf is implied
    void observe(double value);
    // Appends NAME_bucket{le=...}, NAME_sum and NAME_count lines with `labels` (e.g. model_name="m").
    void render(std::string& out, const std::string& name, const std::string& labels) const;

private:
    std::vector<double> bounds_;
    std::vector<uint64_t> counts_;  // [bounds_.size() + 1], not cumulative
    double sum_ = 0.0;
    uint64_t count_ = 0;
};

class Metrics {
public:
    explicit Metrics(std::string model_name);

    void observe_time_to_first_token(double seconds);
    void observe_inter_token_latency(double seconds);
    void observe_request_latency(double seconds);
    void count_finished(const std::string& finish_reason);

    std::string render(const EngineStats& stats) const;

private:
    std::string labels_;
    mutable std::mutex mutex_;
    Histogram ttft_, itl_, e2e_;
    std::map<std::string, uint64_t> finished_;  // by finish reason
};

}  // namespace nibble::server
