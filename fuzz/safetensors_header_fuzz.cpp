// libFuzzer target for the safetensors reader: arbitrary bytes go through the header parser and through
// the whole-file path (length prefix, header, data section) over a memory buffer. Anything but a clean
// return or a nibble::Error is a bug (ASan/UBSan catch out-of-bounds reads and overflows; libFuzzer's
// -rss_limit_mb catches allocations driven by sizes the input claims).
// Build: cmake -S . -B build-fuzz -G Ninja -DCMAKE_CXX_COMPILER=clang++ -DNIBBLE_FUZZ=ON -DNIBBLE_CUDA=OFF
// Run:   build-fuzz/safetensors_header_fuzz fuzz/corpus/safetensors_header -max_total_time=60
#include <cstddef>
#include <cstdint>
#include <map>
#include <string>

#include "base/error.h"
#include "checkpoint/safetensors.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    // Whole file: the tensors' byte ranges must lie inside the buffer; touching every byte proves it.
    try {
        std::map<std::string, std::string> metadata;
        auto tensors = nibble::parse_safetensors_bytes(data, size, "fuzz.safetensors", &metadata);
        volatile uint8_t sink = 0;
        for (const auto& t : tensors) {
            for (size_t i = 0; i < t.nbytes; ++i) sink = sink ^ t.data[i];
            (void)t.view().nbytes();
        }
    } catch (const nibble::Error&) {
    }
    // Header only, against a data section whose size comes from the first byte (so both in-range and
    // out-of-range offsets are explored) and the rest as JSON.
    if (size >= 1) {
        try {
            size_t data_size = static_cast<size_t>(data[0]) * 4;
            nibble::parse_safetensors_header(reinterpret_cast<const char*>(data + 1), size - 1, data_size,
                                             "fuzz-header", nullptr);
        } catch (const nibble::Error&) {
        }
    }
    return 0;
}
