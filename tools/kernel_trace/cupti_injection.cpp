// libnibble_trace.so: a CUPTI injection library that records every kernel's execution interval (graph
// replays included) and, at process exit, writes the report of trace_summary.h. The CUDA driver loads it
// at cuInit when CUDA_INJECTION64_PATH names it and calls InitializeInjection; no code of the traced
// program changes. Settings (environment):
//   NIBBLE_TRACE_OUT=path      the report (default: stderr)
//   NIBBLE_TRACE_SKIP=N        leave out the first N kernels by start time
//   NIBBLE_TRACE_MAX=N         store at most N records (default 2,000,000)
//   NIBBLE_TRACE_GRAPHS=mode   all (default), only (graph-launched kernels), none (stream-launched ones)
//   NIBBLE_TRACE_CSV=path      raw records after the skip: start_ns,end_ns,stream,graph_id,correlation_id,name
//   NIBBLE_TRACE_CSV_ROWS=N    rows of that CSV (default 5,000)

#include <cupti.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <new>
#include <string>

#include "kernel_trace/trace_summary.h"

namespace {

using nibble::trace::TraceCollector;

constexpr std::size_t kBufferBytes = 8u << 20;   // CUPTI fills these with records; 8 MiB ~ 30k kernels
constexpr std::size_t kBufferAlign = 8;          // CUPTI requires 8-byte aligned buffers

std::mutex g_mutex;
TraceCollector* g_collector = nullptr;   // leaked on purpose: it must outlive every CUPTI callback
std::size_t g_cupti_dropped = 0;         // records CUPTI dropped for lack of buffer space
bool g_reported = false;

// Prints a failed CUPTI call with its name and CUPTI's message; returns whether it succeeded.
bool cupti_ok(CUptiResult result, const char* call) {
    if (result == CUPTI_SUCCESS) return true;
    const char* message = nullptr;
    if (cuptiGetResultString(result, &message) != CUPTI_SUCCESS || message == nullptr) message = "unknown error";
    std::fprintf(stderr, "nibble-trace: %s failed: %s (CUptiResult %d)\n", call, message, static_cast<int>(result));
    return false;
}

void CUPTIAPI buffer_requested(uint8_t** buffer, size_t* size, size_t* max_records) {
    *buffer = static_cast<uint8_t*>(::operator new(kBufferBytes, std::align_val_t(kBufferAlign), std::nothrow));
    *size = *buffer ? kBufferBytes : 0;   // a zero size makes CUPTI drop records rather than write anywhere
    *max_records = 0;                     // as many as fit
    if (!*buffer) std::fprintf(stderr, "nibble-trace: cannot allocate a %zu-byte activity buffer\n", kBufferBytes);
}

void CUPTIAPI buffer_completed(CUcontext context, uint32_t stream_id, uint8_t* buffer, size_t size,
                               size_t valid_size) {
    if (!buffer) return;
    {
        std::lock_guard lock(g_mutex);
        CUpti_Activity* record = nullptr;
        for (;;) {
            const CUptiResult result = cuptiActivityGetNextRecord(buffer, valid_size, &record);
            if (result == CUPTI_ERROR_MAX_LIMIT_REACHED) break;   // the end of the valid records
            if (!cupti_ok(result, "cuptiActivityGetNextRecord")) break;
            if (record->kind != CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL) continue;
            const auto* kernel = reinterpret_cast<const CUpti_ActivityKernel10*>(record);
            g_collector->add(kernel->start, kernel->end, kernel->streamId, kernel->graphId, kernel->correlationId,
                             kernel->name ? kernel->name : "(unnamed)");
        }
        size_t dropped = 0;
        if (cupti_ok(cuptiActivityGetNumDroppedRecords(context, stream_id, &dropped),
                     "cuptiActivityGetNumDroppedRecords")) {
            g_cupti_dropped += dropped;
        }
    }
    ::operator delete(buffer, std::align_val_t(kBufferAlign));
}

bool write_file(const char* path, const std::string& text, const char* what) {
    std::FILE* file = std::fopen(path, "w");
    if (!file) {
        std::fprintf(stderr, "nibble-trace: cannot open %s '%s' for writing\n", what, path);
        return false;
    }
    const bool ok = std::fwrite(text.data(), 1, text.size(), file) == text.size();
    if (std::fclose(file) != 0 || !ok) {
        std::fprintf(stderr, "nibble-trace: writing %s '%s' failed\n", what, path);
        return false;
    }
    return true;
}

void write_report_at_exit() {
    // Hand over the records still in CUPTI's buffers (forced: those of kernels still in flight too).
    cupti_ok(cuptiActivityFlushAll(CUPTI_ACTIVITY_FLAG_FLUSH_FORCED), "cuptiActivityFlushAll");
    std::lock_guard lock(g_mutex);
    if (g_reported) return;
    g_reported = true;
    std::string text = nibble::trace::format_report(g_collector->report());
    if (g_cupti_dropped > 0) {
        text += "warning: CUPTI dropped " + std::to_string(g_cupti_dropped) + " records (buffers full)\n";
    }
    if (const char* csv_path = std::getenv("NIBBLE_TRACE_CSV"); csv_path && *csv_path) {
        std::size_t rows = 5000;
        if (const char* rows_text = std::getenv("NIBBLE_TRACE_CSV_ROWS"); rows_text && *rows_text) {
            char* end = nullptr;
            const unsigned long long parsed = std::strtoull(rows_text, &end, 10);
            if (end && *end == '\0' && parsed > 0) rows = static_cast<std::size_t>(parsed);
            else std::fprintf(stderr, "nibble-trace: NIBBLE_TRACE_CSV_ROWS='%s' is not a positive count; using 5000\n",
                              rows_text);
        }
        if (write_file(csv_path, g_collector->csv(rows), "the CSV")) text += std::string("raw records: ") + csv_path + '\n';
    }
    const char* out_path = std::getenv("NIBBLE_TRACE_OUT");
    if (out_path && *out_path) {
        if (write_file(out_path, text, "the report")) return;
        std::fprintf(stderr, "nibble-trace: the report follows on stderr instead\n");
    }
    std::fputs(text.c_str(), stderr);
}

}  // namespace

// Called once by the CUDA driver during cuInit (CUDA_INJECTION64_PATH). Returns nonzero on success.
extern "C" __attribute__((visibility("default"))) int InitializeInjection(void) {
    std::lock_guard lock(g_mutex);
    if (g_collector) return 1;
    std::string errors;
    const nibble::trace::TraceWindow window = nibble::trace::parse_window(
        std::getenv("NIBBLE_TRACE_SKIP"), std::getenv("NIBBLE_TRACE_MAX"), std::getenv("NIBBLE_TRACE_GRAPHS"), errors);
    if (!errors.empty()) std::fprintf(stderr, "nibble-trace: %s", errors.c_str());
    g_collector = new TraceCollector(window);
    if (!cupti_ok(cuptiActivityRegisterCallbacks(buffer_requested, buffer_completed),
                  "cuptiActivityRegisterCallbacks") ||
        !cupti_ok(cuptiActivityEnable(CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL),
                  "cuptiActivityEnable(CONCURRENT_KERNEL)")) {
        std::fprintf(stderr, "nibble-trace: kernel tracing is off for this process\n");
        return 0;
    }
    if (std::atexit(write_report_at_exit) != 0) {
        std::fprintf(stderr, "nibble-trace: cannot register the exit handler; no report will be written\n");
        return 0;
    }
    std::fprintf(stderr, "nibble-trace: recording kernels (skip %zu, max %zu records)\n", window.skip,
                 window.max_records);
    return 1;
}
