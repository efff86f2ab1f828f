// Helpers of the device tests: fresh random inputs (a new seed per run, printed so a failure can be
// replayed with NIBBLE_TEST_SEED), BF16 rounding on the host, NaN-poisoned device outputs, and an
// element-wise comparison against a CPU reference with a per-element tolerance.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "cuda/device_buffer.h"
#include "cuda/device_info.h"
#include "tensor/dtype.h"
#include "tensor/float_formats.h"

namespace nibble::test {

#define NIBBLE_REQUIRE_GPU()                                                         \
    do {                                                                             \
        if (::nibble::cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";   \
    } while (0)

// Seed: NIBBLE_TEST_SEED if set, else from std::random_device; recorded in the test's output.
inline uint64_t fresh_seed() {
    uint64_t seed;
    if (const char* s = std::getenv("NIBBLE_TEST_SEED")) {
        seed = std::strtoull(s, nullptr, 0);
    } else {
        std::random_device rd;
        seed = (static_cast<uint64_t>(rd()) << 32) ^ rd();
    }
    ::testing::Test::RecordProperty("seed", std::to_string(seed));
    std::printf("[   seed   ] %llu\n", static_cast<unsigned long long>(seed));
    return seed;
}

// Normal(0, sigma) values; never all zeros.
inline std::vector<float> random_normal(std::mt19937_64& rng, size_t n, float sigma = 1.0f) {
    std::normal_distribution<float> dist(0.0f, sigma);
    std::vector<float> v(n);
    for (auto& x : v) x = dist(rng);
    return v;
}

inline float round_bf16(float x) { return bf16_to_float(bf16_from_float(x)); }

// Values as the raw bytes of an F32 or BF16 buffer (BF16 rounded to nearest even), and such bytes as values.
inline std::vector<uint8_t> bytes_of(const std::vector<float>& v, DType dtype) {
    std::vector<uint8_t> out(v.size() * dtype_size(dtype));
    for (size_t i = 0; i < v.size(); ++i) {
        if (dtype == DType::F32) {
            std::memcpy(out.data() + 4 * i, &v[i], 4);
        } else {
            const uint16_t b = bf16_from_float(v[i]);
            std::memcpy(out.data() + 2 * i, &b, 2);
        }
    }
    return out;
}
inline std::vector<float> values_of(const std::vector<uint8_t>& b, DType dtype) {
    std::vector<float> out(b.size() / dtype_size(dtype));
    for (size_t i = 0; i < out.size(); ++i) {
        if (dtype == DType::F32) {
            std::memcpy(&out[i], b.data() + 4 * i, 4);
        } else {
            uint16_t h = 0;
            std::memcpy(&h, b.data() + 2 * i, 2);
            out[i] = bf16_to_float(h);
        }
    }
    return out;
}

// Activations as the device sees them: F32 as is, or rounded to BF16 (host copy updated to the rounded
// values, so the CPU reference computes on exactly what the device reads).
struct DeviceActs {
    cuda::DeviceBuffer buf;
    void upload(std::vector<float>& host, bool bf16) {
        if (bf16) {
            std::vector<uint16_t> bits(host.size());
            for (size_t i = 0; i < host.size(); ++i) {
                bits[i] = bf16_from_float(host[i]);
                host[i] = bf16_to_float(bits[i]);
            }
            buf = cuda::DeviceBuffer(bits.size() * 2);
            buf.upload(bits.data(), bits.size() * 2);
        } else {
            buf = cuda::DeviceBuffer(host.size() * 4);
            buf.upload(host.data(), host.size() * 4);
        }
    }
};

// A device output of n elements (F32 or BF16), poisoned with 0xff bytes (NaN in both) before the kernel.
struct DeviceOut {
    cuda::DeviceBuffer buf;
    size_t n = 0;
    bool bf16 = false;
    DeviceOut(size_t n_, bool bf16_) : buf(n_ * (bf16_ ? 2 : 4)), n(n_), bf16(bf16_) { buf.fill_bytes(0xff); }
    std::vector<float> download() const {
        std::vector<float> out(n);
        if (bf16) {
            std::vector<uint16_t> bits(n);
            buf.download(bits.data(), n * 2);
            for (size_t i = 0; i < n; ++i) out[i] = bf16_to_float(bits[i]);
        } else {
            buf.download(out.data(), n * 4);
        }
        return out;
    }
};

// Every element written (no NaN left from the poison) and |got - ref| <= tol[i]. Reports the first
// failures with their index, and the relative L2 error.
inline void expect_close(const std::vector<float>& got, const std::vector<float>& ref, const std::vector<double>& tol,
                         const std::string& what) {
    ASSERT_EQ(got.size(), ref.size());
    int bad = 0;
    double err2 = 0, ref2 = 0;
    for (size_t i = 0; i < got.size(); ++i) {
        const double d = static_cast<double>(got[i]) - ref[i];
        err2 += d * d;
        ref2 += static_cast<double>(ref[i]) * ref[i];
        if (!std::isfinite(got[i]) || !(std::fabs(d) <= tol[i])) {
            if (++bad <= 5)
                ADD_FAILURE() << what << ": element " << i << " got " << got[i] << " expected " << ref[i]
                              << " (tolerance " << tol[i] << ")";
        }
    }
    EXPECT_EQ(bad, 0) << what << ": " << bad << " of " << got.size() << " elements wrong";
    std::printf("[  detail  ] %s: relative L2 error %.3g over %zu elements\n", what.c_str(),
                ref2 > 0 ? std::sqrt(err2 / ref2) : std::sqrt(err2), got.size());
}

// A host vector in a device buffer (at least one element's bytes, so empty vectors get a valid pointer), and
// the first n elements of a device buffer back.
template <class T>
cuda::DeviceBuffer upload_vec(const std::vector<T>& v) {
    cuda::DeviceBuffer b(std::max<size_t>(v.size(), 1) * sizeof(T));
    if (!v.empty()) b.upload(v.data(), v.size() * sizeof(T));
    return b;
}

template <class T>
std::vector<T> download_vec(const cuda::DeviceBuffer& b, size_t n) {
    std::vector<T> v(n);
    if (n > 0) b.download(v.data(), n * sizeof(T));
    return v;
}

constexpr double kEpsF32 = 0x1p-24;  // unit roundoff of float32 (half an ulp at 1)
constexpr double kEpsBf16 = 0x1p-8;  // unit roundoff of bfloat16 (8 significant bits: ulp(1) = 2^-7)

}  // namespace nibble::test
