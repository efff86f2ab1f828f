// The kernel tracer's aggregation (tools/kernel_trace/trace_summary.h) on hand-made records: the numbers
// the CUPTI injection library reports on the GPU machine come from exactly this code.

#include <gtest/gtest.h>

#include <string>

#include "kernel_trace/trace_summary.h"

namespace nibble::trace {
namespace {

// Two streams: stream 2's kernels overlap stream 1's (one sits entirely inside another), then single kernels
// separated by one gap in each histogram bin. Added out of start order, as CUPTI's buffers may deliver them.
void add_two_stream_trace(TraceCollector& c) {
    c.add(3500, 5000, 1, 0, 2, "b");
    c.add(1000, 3000, 1, 0, 1, "a");
    c.add(2000, 4000, 2, 0, 3, "c");     // overlaps a and b
    c.add(1200, 1500, 2, 0, 4, "c");     // inside a
    c.add(10000, 10500, 1, 0, 5, "a");   // gap 5000 ns after 5000: bin 4-8 us
    c.add(10800, 11000, 1, 0, 6, "a");   // gap 300 ns: bin <1 us
    c.add(12500, 13000, 1, 0, 7, "a");   // gap 1500 ns: bin 1-2 us
    c.add(15500, 16000, 1, 0, 8, "b");   // gap 2500 ns: bin 2-4 us
    c.add(30000, 30100, 1, 0, 9, "b");   // gap 14000 ns: bin >8 us
}

TEST(KernelTrace, TimelineMergesOverlappingKernelsAndBinsTheGaps) {
    TraceCollector c;
    add_two_stream_trace(c);
    const TraceReport r = c.report();
    const Timeline& t = r.timeline;
    EXPECT_EQ(t.kernels, 9u);
    EXPECT_EQ(t.span_ns, 30100u - 1000u);
    // Union: [1000, 5000] + 500 + 200 + 500 + 500 + 100.
    EXPECT_EQ(t.busy_ns, 4000u + 500u + 200u + 500u + 500u + 100u);
    EXPECT_EQ(t.idle_ns, 5000u + 300u + 1500u + 2500u + 14000u);
    EXPECT_EQ(t.busy_ns + t.idle_ns, t.span_ns);
    EXPECT_EQ(t.gaps, 5u);
    for (std::size_t bin = 0; bin < kGapBins; ++bin) EXPECT_EQ(t.gap_histogram[bin], 1u) << "bin " << bin;
    EXPECT_DOUBLE_EQ(t.mean_gap_us(), 23.3 / 5.0);
    EXPECT_EQ(r.graph_launches, 0u);
}

TEST(KernelTrace, AdjacentKernelsLeaveNoGap) {
    TraceCollector c;
    c.add(100, 200, 1, 0, 1, "a");
    c.add(200, 300, 1, 0, 2, "a");   // starts exactly where the previous one ends
    const Timeline t = c.report().timeline;
    EXPECT_EQ(t.gaps, 0u);
    EXPECT_EQ(t.busy_ns, 200u);
    EXPECT_EQ(t.span_ns, 200u);
}

TEST(KernelTrace, GapBinEdges) {
    EXPECT_EQ(gap_bin(1), 0u);
    EXPECT_EQ(gap_bin(999), 0u);
    EXPECT_EQ(gap_bin(1000), 1u);
    EXPECT_EQ(gap_bin(1999), 1u);
    EXPECT_EQ(gap_bin(2000), 2u);
    EXPECT_EQ(gap_bin(4000), 3u);
    EXPECT_EQ(gap_bin(7999), 3u);
    EXPECT_EQ(gap_bin(8000), 4u);
}

TEST(KernelTrace, NameTableSumsByKernelAndSortsByTotalTime) {
    TraceCollector c;
    add_two_stream_trace(c);
    const TraceReport r = c.report();
    ASSERT_EQ(r.kernels.size(), 3u);
    // a: 2000 + 500 + 200 + 500 = 3200; c: 2000 + 300 = 2300; b: 1500 + 500 + 100 = 2100.
    EXPECT_EQ(r.kernels[0].name, "a");
    EXPECT_EQ(r.kernels[0].count, 4u);
    EXPECT_EQ(r.kernels[0].total_ns, 3200u);
    EXPECT_EQ(r.kernels[1].name, "c");
    EXPECT_EQ(r.kernels[1].count, 2u);
    EXPECT_EQ(r.kernels[1].total_ns, 2300u);
    EXPECT_EQ(r.kernels[2].name, "b");
    EXPECT_EQ(r.kernels[2].count, 3u);
    EXPECT_EQ(r.kernels[2].total_ns, 2100u);
    EXPECT_EQ(r.kernel_ns, 3200u + 2300u + 2100u);   // overlapping kernels count in full here
}

TEST(KernelTrace, SkipLeavesOutTheFirstKernelsByStartTime) {
    TraceCollector c({.skip = 2});
    add_two_stream_trace(c);   // the earliest two: a [1000, 3000] and c [1200, 1500], though added 2nd and 4th
    const TraceReport r = c.report();
    EXPECT_EQ(r.skipped, 2u);
    EXPECT_EQ(r.timeline.kernels, 7u);
    EXPECT_EQ(r.timeline.span_ns, 30100u - 2000u);
    EXPECT_EQ(r.timeline.busy_ns, 3000u + 500u + 200u + 500u + 500u + 100u);   // [2000, 5000] first
    EXPECT_EQ(r.timeline.gaps, 5u);
    std::size_t reported = 0;
    for (const KernelStats& k : r.kernels) reported += k.count;
    EXPECT_EQ(reported, 7u);
    // a [1000, 3000] and c [1200, 1500] skipped: b 2100 ns, c 2000 ns, a 1200 ns.
    ASSERT_EQ(r.kernels.size(), 3u);
    EXPECT_EQ(r.kernels[0].name, "b");
    EXPECT_EQ(r.kernels[2].name, "a");
    EXPECT_EQ(r.kernels[2].count, 3u);
    EXPECT_EQ(r.kernels[2].total_ns, 1200u);
}

TEST(KernelTrace, SkipBeyondTheRecordsReportsNothing) {
    TraceCollector c({.skip = 100});
    add_two_stream_trace(c);
    const TraceReport r = c.report();
    EXPECT_EQ(r.skipped, 9u);
    EXPECT_TRUE(r.kernels.empty());
    EXPECT_EQ(r.timeline.kernels, 0u);
    EXPECT_EQ(r.timeline.span_ns, 0u);
    EXPECT_NE(format_report(r).find("no graph-launched kernels"), std::string::npos);
}

TEST(KernelTrace, MaxRecordsBoundsWhatIsStored) {
    TraceCollector c({.max_records = 4});
    add_two_stream_trace(c);
    const TraceReport r = c.report();
    EXPECT_EQ(r.received, 9u);
    EXPECT_EQ(r.over_max, 5u);
    EXPECT_EQ(r.timeline.kernels, 4u);   // the first four delivered: b, a, c, c
    EXPECT_EQ(r.timeline.span_ns, 4000u);
}

TEST(KernelTrace, UntimedRecordsAreCountedNotReported) {
    TraceCollector c;
    c.add(0, 0, 1, 0, 1, "a");         // CUPTI had no memory for the timestamps
    c.add(500, 400, 1, 0, 2, "a");     // ends before it starts
    c.add(1000, 1100, 1, 0, 3, "a");
    const TraceReport r = c.report();
    EXPECT_EQ(r.untimed, 2u);
    EXPECT_EQ(r.timeline.kernels, 1u);
}

// Two replays of graph 7 (correlation ids 100 and 101: one per cudaGraphLaunch) around an eager kernel.
void add_graph_trace(TraceCollector& c) {
    c.add(1000, 2000, 1, 7, 100, "g1");
    c.add(2500, 3000, 1, 7, 100, "g2");    // 500 ns idle inside the launch
    c.add(9000, 9500, 1, 0, 200, "eager");
    c.add(20000, 21000, 1, 7, 101, "g1");  // the next launch: 11 us after the eager kernel
    c.add(21000, 22000, 1, 7, 101, "g2");  // back to back
    c.add(22100, 22200, 1, 7, 101, "g3");  // 100 ns idle
}

TEST(KernelTrace, GraphLaunchesCountIdleTimeOnlyInsideALaunch) {
    TraceCollector c;
    add_graph_trace(c);
    const TraceReport r = c.report();
    EXPECT_EQ(r.graph_launches, 2u);
    const Timeline& g = r.graph_timeline;
    EXPECT_EQ(g.kernels, 5u);
    EXPECT_EQ(g.span_ns, 2000u + 2200u);
    EXPECT_EQ(g.busy_ns, 1500u + 2100u);
    EXPECT_EQ(g.idle_ns, 600u);
    EXPECT_EQ(g.gaps, 2u);
    EXPECT_EQ(g.gap_histogram[0], 2u);
    // The whole timeline also sees the gaps between launches and around the eager kernel.
    EXPECT_EQ(r.timeline.gaps, 4u);
    EXPECT_EQ(r.timeline.gap_histogram[3], 1u);   // 6000 ns
    EXPECT_EQ(r.timeline.gap_histogram[4], 1u);   // 10500 ns
}

TEST(KernelTrace, GraphFilterKeepsOneKindOfLaunch) {
    TraceCollector only({.graphs = GraphFilter::only});
    add_graph_trace(only);
    const TraceReport graphs = only.report();
    EXPECT_EQ(graphs.filtered, 1u);
    EXPECT_EQ(graphs.timeline.kernels, 5u);
    EXPECT_EQ(graphs.graph_launches, 2u);

    TraceCollector none({.graphs = GraphFilter::none});
    add_graph_trace(none);
    const TraceReport eager = none.report();
    EXPECT_EQ(eager.filtered, 5u);
    ASSERT_EQ(eager.kernels.size(), 1u);
    EXPECT_EQ(eager.kernels[0].name, "eager");
    EXPECT_EQ(eager.graph_launches, 0u);
}

TEST(KernelTrace, ShortNamesAreDemangledWithoutParametersAndCut) {
    // void nibble::gemv_kernel<4, float>(float const*, float*, int, nibble::Tile<4, float>)
    const char* mangled = "_ZN6nibble11gemv_kernelILi4EfEEvPKT0_PS1_iNS_4TileIXT_ES1_EE";
    EXPECT_EQ(short_kernel_name(mangled), "nibble::gemv_kernel<4, float>");
    EXPECT_EQ(short_kernel_name(mangled, 16), "nibble::gemv_...");
    EXPECT_EQ(short_kernel_name("void k(int (*)(int))"), "k");   // nested parentheses in the parameters
    EXPECT_EQ(short_kernel_name("plain_kernel"), "plain_kernel");
    EXPECT_EQ(short_kernel_name("_Znot_really_mangled"), "_Znot_really_mangled");
}

TEST(KernelTrace, CsvStartsAfterTheSkipAndQuotesNames) {
    TraceCollector c({.skip = 1});
    c.add(300, 400, 2, 7, 11, "k\"q");
    c.add(100, 200, 1, 0, 10, "first");
    c.add(500, 600, 1, 0, 12, "last");
    EXPECT_EQ(c.csv(1), "start_ns,end_ns,stream,graph_id,correlation_id,name\n300,400,2,7,11,\"k\"\"q\"\n");
    EXPECT_EQ(c.csv(10), "start_ns,end_ns,stream,graph_id,correlation_id,name\n300,400,2,7,11,\"k\"\"q\"\n"
                         "500,600,1,0,12,\"last\"\n");
}

TEST(KernelTrace, ReportShowsTheTableAndTheTimeline) {
    TraceCollector c;
    add_graph_trace(c);
    const std::string text = format_report(c.report(), 2);
    // g1: 2000 ns of 4100 summed = 48.8%; eager (500 ns) and g3 (100 ns) are past the 2 rows shown.
    EXPECT_NE(text.find("         2.0        2       1.00   48.8%  g1\n"), std::string::npos) << text;
    EXPECT_NE(text.find("(2 more kernels)"), std::string::npos) << text;
    EXPECT_NE(text.find("kernels 6, span 21.2 us: busy 4.1 us (19.3%), idle 17.1 us (80.7%)"), std::string::npos)
        << text;
    EXPECT_NE(text.find("gap histogram: <1us 2 | 1-2us 0 | 2-4us 0 | 4-8us 1 | >8us 1"), std::string::npos) << text;
    EXPECT_NE(text.find("launches 2, kernels 5 (2.5 per launch)"), std::string::npos) << text;
}

TEST(KernelTrace, WindowFromTheEnvironment) {
    std::string errors;
    TraceWindow w = parse_window("12", "3000", "only", errors);
    EXPECT_TRUE(errors.empty()) << errors;
    EXPECT_EQ(w.skip, 12u);
    EXPECT_EQ(w.max_records, 3000u);
    EXPECT_EQ(w.graphs, GraphFilter::only);

    w = parse_window(nullptr, nullptr, nullptr, errors);
    EXPECT_TRUE(errors.empty()) << errors;
    EXPECT_EQ(w.skip, 0u);
    EXPECT_EQ(w.max_records, 2'000'000u);
    EXPECT_EQ(w.graphs, GraphFilter::all);

    w = parse_window("-1", "0", "graphs", errors);
    EXPECT_EQ(w.skip, 0u);
    EXPECT_EQ(w.max_records, 2'000'000u);
    EXPECT_EQ(w.graphs, GraphFilter::all);
    EXPECT_NE(errors.find("NIBBLE_TRACE_SKIP='-1'"), std::string::npos) << errors;
    EXPECT_NE(errors.find("NIBBLE_TRACE_MAX='0'"), std::string::npos) << errors;
    EXPECT_NE(errors.find("NIBBLE_TRACE_GRAPHS='graphs'"), std::string::npos) << errors;
}

}  // namespace
}  // namespace nibble::trace
