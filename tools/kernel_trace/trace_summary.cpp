#include "kernel_trace/trace_summary.h"

#include <cxxabi.h>

#include <algorithm>
#include <charconv>
#include <cstdio>
#include <cstdlib>
#include <memory>

namespace nibble::trace {

std::size_t gap_bin(std::uint64_t gap_ns) {
    if (gap_ns < 1000) return 0;
    if (gap_ns < 2000) return 1;
    if (gap_ns < 4000) return 2;
    if (gap_ns < 8000) return 3;
    return 4;
}

Timeline timeline_of(std::span<const KernelRecord> records) {
    Timeline t;
    t.kernels = records.size();
    if (records.empty()) return t;
    // Sweep the kernels in start order, merging overlapping intervals; a kernel starting after the merged
    // interval's end opens a gap.
    const std::uint64_t first_start = records.front().start_ns;
    std::uint64_t merged_start = first_start, merged_end = records.front().end_ns;
    for (std::size_t i = 1; i < records.size(); ++i) {
        const KernelRecord& r = records[i];
        if (r.start_ns > merged_end) {
            t.busy_ns += merged_end - merged_start;
            const std::uint64_t gap = r.start_ns - merged_end;
            ++t.gaps;
            t.idle_ns += gap;
            ++t.gap_histogram[gap_bin(gap)];
            merged_start = r.start_ns;
            merged_end = r.end_ns;
        } else {
            merged_end = std::max(merged_end, r.end_ns);
        }
    }
    t.busy_ns += merged_end - merged_start;
    t.span_ns = merged_end - first_start;   // the last merged interval holds the latest end
    return t;
}

void accumulate(Timeline& a, const Timeline& b) {
    a.kernels += b.kernels;
    a.span_ns += b.span_ns;
    a.busy_ns += b.busy_ns;
    a.idle_ns += b.idle_ns;
    a.gaps += b.gaps;
    for (std::size_t i = 0; i < kGapBins; ++i) a.gap_histogram[i] += b.gap_histogram[i];
}

TraceCollector::TraceCollector(TraceWindow window) : window_(window) {}

void TraceCollector::add(std::uint64_t start_ns, std::uint64_t end_ns, std::uint32_t stream,
                         std::uint32_t graph_id, std::uint32_t correlation_id, std::string_view name) {
    ++received_;
    const bool in_graph = graph_id != 0;
    if ((window_.graphs == GraphFilter::only && !in_graph) || (window_.graphs == GraphFilter::none && in_graph)) {
        ++filtered_;
        return;
    }
    // CUPTI leaves timestamps at 0 when it had no device memory to record them.
    if (start_ns == 0 || end_ns < start_ns) {
        ++untimed_;
        return;
    }
    if (records_.size() >= window_.max_records) {
        ++over_max_;
        return;
    }
    auto [it, inserted] = name_ids_.try_emplace(std::string(name), static_cast<std::uint32_t>(names_.size()));
    if (inserted) names_.emplace_back(name);
    records_.push_back({.start_ns = start_ns, .end_ns = end_ns, .stream = stream, .graph_id = graph_id,
                        .correlation_id = correlation_id, .name_id = it->second});
}

std::size_t TraceCollector::sort_and_window() {
    std::stable_sort(records_.begin(), records_.end(),
                     [](const KernelRecord& a, const KernelRecord& b) { return a.start_ns < b.start_ns; });
    return std::min(window_.skip, records_.size());
}

TraceReport TraceCollector::report() {
    TraceReport rep;
    rep.received = received_;
    rep.filtered = filtered_;
    rep.untimed = untimed_;
    rep.over_max = over_max_;
    const std::size_t first = sort_and_window();
    rep.skipped = first;
    const std::span<const KernelRecord> reported(records_.data() + first, records_.size() - first);

    std::vector<KernelStats> by_name(names_.size());
    for (const KernelRecord& r : reported) {
        KernelStats& s = by_name[r.name_id];
        ++s.count;
        s.total_ns += r.end_ns - r.start_ns;
        rep.kernel_ns += r.end_ns - r.start_ns;
    }
    for (std::size_t id = 0; id < by_name.size(); ++id) {
        if (by_name[id].count == 0) continue;
        by_name[id].name = short_kernel_name(names_[id]);
        rep.kernels.push_back(std::move(by_name[id]));
    }
    std::stable_sort(rep.kernels.begin(), rep.kernels.end(),
                     [](const KernelStats& a, const KernelStats& b) { return a.total_ns > b.total_ns; });

    rep.timeline = timeline_of(reported);
    for (std::size_t begin = 0; begin < reported.size();) {
        const KernelRecord& head = reported[begin];
        std::size_t end = begin + 1;
        while (end < reported.size() && reported[end].graph_id == head.graph_id &&
               reported[end].correlation_id == head.correlation_id) {
            ++end;
        }
        if (head.graph_id != 0) {
            ++rep.graph_launches;
            accumulate(rep.graph_timeline, timeline_of(reported.subspan(begin, end - begin)));
        }
        begin = end;
    }
    return rep;
}

std::string TraceCollector::csv(std::size_t max_rows) {
    const std::size_t first = sort_and_window();
    const std::size_t last = std::min(records_.size(), first + max_rows);
    std::string out = "start_ns,end_ns,stream,graph_id,correlation_id,name\n";
    std::vector<std::string> short_names(names_.size());
    for (std::size_t i = first; i < last; ++i) {
        const KernelRecord& r = records_[i];
        std::string& name = short_names[r.name_id];
        if (name.empty()) name = short_kernel_name(names_[r.name_id]);
        out += std::to_string(r.start_ns) + ',' + std::to_string(r.end_ns) + ',' + std::to_string(r.stream) + ',' +
               std::to_string(r.graph_id) + ',' + std::to_string(r.correlation_id) + ",\"";
        for (char c : name) {
            if (c == '"') out += '"';   // CSV escapes a quote by doubling it
            out += c;
        }
        out += "\"\n";
    }
    return out;
}

std::string short_kernel_name(std::string_view name, std::size_t max_length) {
    std::string text(name);
    if (text.starts_with("_Z")) {
        int status = 0;
        std::unique_ptr<char, decltype(&std::free)> demangled(
            abi::__cxa_demangle(text.c_str(), nullptr, nullptr, &status), &std::free);
        if (status == 0 && demangled) text = demangled.get();
    }
    if (text.starts_with("void ")) text.erase(0, 5);   // every __global__ function returns void
    // Drop the trailing parameter list: the '(' that matches the final ')'.
    if (text.ends_with(')')) {
        int depth = 0;
        for (std::size_t i = text.size(); i-- > 0;) {
            if (text[i] == ')') ++depth;
            else if (text[i] == '(' && --depth == 0) {
                if (i > 0) text.resize(i);
                break;
            }
        }
    }
    if (max_length >= 4 && text.size() > max_length) {
        text.resize(max_length - 3);
        text += "...";
    }
    return text;
}

namespace {

std::string format_histogram(const Timeline& t) {
    static constexpr const char* kLabels[kGapBins] = {"<1us", "1-2us", "2-4us", "4-8us", ">8us"};
    std::string out = "gap histogram:";
    for (std::size_t i = 0; i < kGapBins; ++i) {
        out += (i == 0 ? " " : " | ");
        out += kLabels[i];
        out += ' ';
        out += std::to_string(t.gap_histogram[i]);
    }
    return out + '\n';
}

double us(std::uint64_t ns) { return static_cast<double>(ns) / 1000.0; }
double percent(std::uint64_t part, std::uint64_t whole) {
    return whole == 0 ? 0.0 : 100.0 * static_cast<double>(part) / static_cast<double>(whole);
}

}  // namespace

std::string format_report(const TraceReport& report, std::size_t max_rows) {
    std::string out;
    char line[512];
    std::size_t reported = 0;
    for (const KernelStats& k : report.kernels) reported += k.count;
    std::snprintf(line, sizeof line,
                  "== nibble kernel trace: %zu kernels reported (received %zu; skipped %zu, graph filter %zu, "
                  "untimed %zu, over max %zu) ==\n",
                  reported, report.received, report.skipped, report.filtered, report.untimed, report.over_max);
    out += line;
    std::snprintf(line, sizeof line, "summed kernel time %.1f us in %zu distinct kernels\n", us(report.kernel_ns),
                  report.kernels.size());
    out += line;
    out += "    total_us    count    mean_us   share  kernel\n";
    for (std::size_t i = 0; i < report.kernels.size() && i < max_rows; ++i) {
        const KernelStats& k = report.kernels[i];
        std::snprintf(line, sizeof line, "%12.1f %8zu %10.2f %6.1f%%  %s\n", us(k.total_ns), k.count,
                      us(k.total_ns) / static_cast<double>(k.count), percent(k.total_ns, report.kernel_ns),
                      k.name.c_str());
        out += line;
    }
    if (report.kernels.size() > max_rows) {
        std::snprintf(line, sizeof line, "(%zu more kernels)\n", report.kernels.size() - max_rows);
        out += line;
    }

    const Timeline& t = report.timeline;
    out += "== timeline summary (first kernel's start to last kernel's end) ==\n";
    std::snprintf(line, sizeof line,
                  "kernels %zu, span %.1f us: busy %.1f us (%.1f%%), idle %.1f us (%.1f%%)\n"
                  "gaps %zu, mean gap %.2f us\n",
                  t.kernels, us(t.span_ns), us(t.busy_ns), percent(t.busy_ns, t.span_ns), us(t.idle_ns),
                  percent(t.idle_ns, t.span_ns), t.gaps, t.mean_gap_us());
    out += line;
    out += format_histogram(t);

    const Timeline& g = report.graph_timeline;
    out += "== graph launches (idle time inside a launch; gaps between launches excluded) ==\n";
    if (report.graph_launches == 0) {
        out += "no graph-launched kernels\n";
        return out;
    }
    const double n = static_cast<double>(report.graph_launches);
    std::snprintf(line, sizeof line,
                  "launches %zu, kernels %zu (%.1f per launch); per launch: span %.1f us, busy %.1f us (%.1f%%), "
                  "idle %.1f us, gaps %.1f, mean gap %.2f us\n",
                  report.graph_launches, g.kernels, static_cast<double>(g.kernels) / n, us(g.span_ns) / n,
                  us(g.busy_ns) / n, percent(g.busy_ns, g.span_ns), us(g.idle_ns) / n,
                  static_cast<double>(g.gaps) / n, g.mean_gap_us());
    out += line;
    out += format_histogram(g);
    return out;
}

namespace {

bool parse_count(const char* text, std::size_t& value) {
    const char* end = text + std::char_traits<char>::length(text);
    std::size_t parsed = 0;
    auto [ptr, ec] = std::from_chars(text, end, parsed);
    if (ec != std::errc() || ptr != end || ptr == text) return false;
    value = parsed;
    return true;
}

}  // namespace

TraceWindow parse_window(const char* skip, const char* max_records, const char* graphs, std::string& errors) {
    TraceWindow window;
    if (skip && *skip && !parse_count(skip, window.skip)) {
        errors += "NIBBLE_TRACE_SKIP='" + std::string(skip) + "' is not a count; using 0\n";
        window.skip = 0;
    }
    if (max_records && *max_records) {
        std::size_t parsed = 0;
        if (!parse_count(max_records, parsed) || parsed == 0) {
            errors += "NIBBLE_TRACE_MAX='" + std::string(max_records) + "' is not a positive count; using " +
                      std::to_string(window.max_records) + '\n';
        } else {
            window.max_records = parsed;
        }
    }
    if (graphs && *graphs) {
        const std::string_view mode(graphs);
        if (mode == "all") window.graphs = GraphFilter::all;
        else if (mode == "only") window.graphs = GraphFilter::only;
        else if (mode == "none") window.graphs = GraphFilter::none;
        else errors += "NIBBLE_TRACE_GRAPHS='" + std::string(mode) + "' is not all, only or none; using all\n";
    }
    return window;
}

}  // namespace nibble::trace
