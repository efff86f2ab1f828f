#pragma once
// Aggregation of kernel activity records into the report of libnibble_trace.so (tools/kernel_trace):
// a per-kernel-name table and a timeline summary (busy time vs idle gaps). Plain C++ with no CUPTI
// dependency, so the CPU test suite checks it with hand-made records.

#include <array>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

namespace nibble::trace {

// Which kernels the collector keeps, by how they were launched.
enum class GraphFilter {
    all,   // every kernel
    only,  // kernels launched from a CUDA graph (graph id != 0): a decode step under `nibble bench`
    none,  // kernels launched directly on a stream: prefill, setup, eager decode
};

struct TraceWindow {
    // The first `skip` kernels by start time are left out of the report (warm-up, loading).
    std::size_t skip = 0;
    // At most this many records are stored (memory stays bounded: ~32 bytes each); later ones are counted
    // as dropped. The report covers the stored records minus the skipped ones.
    std::size_t max_records = 2'000'000;
    GraphFilter graphs = GraphFilter::all;
};

// One kernel execution; times in nanoseconds on the device's timestamp clock.
struct KernelRecord {
    std::uint64_t start_ns = 0;
    std::uint64_t end_ns = 0;
    std::uint32_t stream = 0;
    std::uint32_t graph_id = 0;   // 0: not launched from a graph
    // The launching API call's correlation id: every kernel of one cudaGraphLaunch shares it, which tells
    // one replay of a graph from the next (the graph id is the same for both).
    std::uint32_t correlation_id = 0;
    std::uint32_t name_id = 0;    // index into TraceCollector::names()
};

// Idle gaps are binned by length: <1 us, [1, 2), [2, 4), [4, 8), >= 8 us.
inline constexpr std::size_t kGapBins = 5;

struct Timeline {
    std::size_t kernels = 0;
    std::uint64_t span_ns = 0;   // first kernel's start to last kernel's end
    std::uint64_t busy_ns = 0;   // union of the kernels' intervals (overlapping kernels count once)
    std::uint64_t idle_ns = 0;   // span - busy: the sum of the gaps
    std::size_t gaps = 0;        // intervals inside the span where no kernel runs
    std::array<std::size_t, kGapBins> gap_histogram{};
    double mean_gap_us() const { return gaps == 0 ? 0.0 : static_cast<double>(idle_ns) / gaps / 1000.0; }
};

// Busy/idle statistics of `records`, which must be sorted by start_ns.
Timeline timeline_of(std::span<const KernelRecord> records);
// Adds b's kernels, busy/idle time, gaps and histogram to a (spans add up too: a sum of segments).
void accumulate(Timeline& a, const Timeline& b);
std::size_t gap_bin(std::uint64_t gap_ns);

struct KernelStats {
    std::string name;   // the short display name
    std::size_t count = 0;
    std::uint64_t total_ns = 0;
};

struct TraceReport {
    std::size_t received = 0;         // records handed to the collector
    std::size_t filtered = 0;         // left out by the graph filter
    std::size_t untimed = 0;          // records without valid timestamps
    std::size_t over_max = 0;         // dropped because max_records were stored
    std::size_t skipped = 0;          // the first `skip` by start time
    std::vector<KernelStats> kernels; // sorted by total time, largest first
    std::uint64_t kernel_ns = 0;      // summed kernel time (overlaps count twice)
    Timeline timeline;                // over every reported kernel
    // Graph launches: maximal runs of consecutive kernels (by start) with the same nonzero graph id and
    // correlation id; the timeline sums them, so its gaps are the idle time inside launches, not between.
    std::size_t graph_launches = 0;
    Timeline graph_timeline;
};

// Collects records (from CUPTI's buffer callbacks in the injection library) and builds the report.
// Not thread-safe: the caller serializes add() and report().
class TraceCollector {
public:
    explicit TraceCollector(TraceWindow window = {});

    // Keeps the record unless filtered, untimed (start 0 or end < start) or over the window's maximum.
    void add(std::uint64_t start_ns, std::uint64_t end_ns, std::uint32_t stream, std::uint32_t graph_id,
             std::uint32_t correlation_id, std::string_view name);

    // Sorts the stored records by start time and aggregates everything after the skipped ones.
    TraceReport report();
    // The reported records (sorted, after the skip) as CSV, at most `max_rows` rows from the first one:
    // start_ns,end_ns,stream,graph_id,correlation_id,name (the short name, quoted).
    std::string csv(std::size_t max_rows);

    const std::vector<std::string>& names() const { return names_; }

private:
    std::size_t sort_and_window();   // returns the index of the first reported record

    TraceWindow window_;
    std::vector<KernelRecord> records_;
    std::vector<std::string> names_;   // raw (mangled) names, by name_id
    std::unordered_map<std::string, std::uint32_t> name_ids_;
    std::size_t received_ = 0, filtered_ = 0, untimed_ = 0, over_max_ = 0;
};

// A readable kernel name: demangled when mangled, without the return type and the parameter list, and cut
// to `max_length` characters (template arguments are what gets long) with "..." marking the cut.
std::string short_kernel_name(std::string_view name, std::size_t max_length = 100);

// The text report: the kernel table (at most `max_rows` rows) and the timeline summary.
std::string format_report(const TraceReport& report, std::size_t max_rows = 200);

// Parses a window from the environment's strings (null: not set): NIBBLE_TRACE_SKIP, NIBBLE_TRACE_MAX,
// NIBBLE_TRACE_GRAPHS (all|only|none). A malformed value keeps the default and appends a line to `errors`.
TraceWindow parse_window(const char* skip, const char* max_records, const char* graphs, std::string& errors);

}  // namespace nibble::trace
