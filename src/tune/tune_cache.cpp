#include "tune/tune_cache.h"

#include <fmt/format.h>

#include <cctype>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <system_error>
#include <unistd.h>

#include "base/error.h"
#include "base/log.h"
#include "base/version.h"

#ifndef NIBBLE_GIT_COMMIT
#define NIBBLE_GIT_COMMIT ""
#endif

namespace nibble::tune {

namespace {

constexpr std::string_view kFormat = "nibble-tune-cache";
constexpr int kVersion = 1;

// FNV-1a, 64 bit: a stable fingerprint (std::hash may differ between standard libraries).
struct Fnv {
    uint64_t h = 1469598103934665603ull;
    void add(std::string_view s) {
        for (unsigned char c : s) h = (h ^ c) * 1099511628211ull;
        h = (h ^ 0xff) * 1099511628211ull;  // separator
    }
    void add(int64_t v) { add(std::to_string(v)); }
};

std::optional<OpKind> op_from_name(std::string_view name) {
    for (OpKind op : kAllOps)
        if (op_name(op) == name) return op;
    return std::nullopt;
}

nlohmann::json key_json(const CacheKey& k) {
    return {{"gpu", k.gpu_name},
            {"compute_capability", fmt::format("{}.{}", k.cc_major, k.cc_minor)},
            {"sm_count", k.sm_count},
            {"driver_version", k.driver_version},
            {"runtime_version", k.runtime_version},
            {"build_id", k.build_id}};
}

CacheKey key_from_json(const nlohmann::json& j) {
    CacheKey k;
    k.gpu_name = j.at("gpu").get<std::string>();
    const std::string cc = j.at("compute_capability").get<std::string>();
    const size_t dot = cc.find('.');
    if (dot == std::string::npos) throw std::invalid_argument("compute_capability '" + cc + "' is not MAJOR.MINOR");
    k.cc_major = std::stoi(cc.substr(0, dot));
    k.cc_minor = std::stoi(cc.substr(dot + 1));
    k.sm_count = j.at("sm_count").get<int>();
    k.driver_version = j.at("driver_version").get<int>();
    k.runtime_version = j.at("runtime_version").get<int>();
    k.build_id = j.at("build_id").get<std::string>();
    return k;
}

// What differs between two keys, for the warning ("driver_version 12080 != 13000").
std::string key_difference(const CacheKey& got, const CacheKey& want) {
    std::vector<std::string> d;
    if (got.gpu_name != want.gpu_name) d.push_back(fmt::format("GPU '{}', this device is '{}'", got.gpu_name, want.gpu_name));
    if (got.cc_major != want.cc_major || got.cc_minor != want.cc_minor)
        d.push_back(fmt::format("compute capability {}.{}, this device has {}.{}", got.cc_major, got.cc_minor,
                                want.cc_major, want.cc_minor));
    if (got.sm_count != want.sm_count) d.push_back(fmt::format("{} SMs, this device has {}", got.sm_count, want.sm_count));
    if (got.driver_version != want.driver_version)
        d.push_back(fmt::format("driver {}, now {}", got.driver_version, want.driver_version));
    if (got.runtime_version != want.runtime_version)
        d.push_back(fmt::format("CUDA runtime {}, now {}", got.runtime_version, want.runtime_version));
    if (got.build_id != want.build_id) d.push_back(fmt::format("build {}, this is {}", got.build_id, want.build_id));
    return fmt::format("{}", fmt::join(d, "; "));
}

}  // namespace

std::string CacheKey::describe() const {
    return fmt::format("{} (cc {}.{}, {} SMs, driver {}, runtime {}, build {})", gpu_name, cc_major, cc_minor, sm_count,
                       driver_version, runtime_version, build_id);
}

std::string build_id() {
    Fnv f;
    for (const KernelVariant& v : kernel_registry()) {
        f.add(op_name(v.op));
        f.add(v.name);
        f.add(v.kernel);
        f.add(v.needs.threads_per_block);
        f.add(v.needs.static_smem_bytes);
        f.add(v.needs.dynamic_smem_bytes);
        f.add(v.needs.regs_per_thread);
        f.add(v.needs.min_cc);
        f.add(static_cast<int64_t>(v.needs.isa));
    }
    const std::string_view commit = NIBBLE_GIT_COMMIT;
    return fmt::format("{}{}{}.r{:016x}", kNibbleVersion, commit.empty() ? "" : "+", commit, f.h);
}

CacheKey cache_key_for(const DeviceProfile& d) {
    return {d.name, d.cc_major, d.cc_minor, d.sm_count, d.driver_version, d.runtime_version, build_id()};
}

void TuneCache::put(const TuneChoice& choice) {
    for (TuneChoice& c : choices_) {
        if (c.op == choice.op && c.bucket == choice.bucket && c.dtype == choice.dtype) {
            c = choice;
            return;
        }
    }
    choices_.push_back(choice);
}

const TuneChoice* TuneCache::find(OpKind op, std::string_view bucket, std::string_view dtype) const {
    for (const TuneChoice& c : choices_)
        if (c.op == op && c.bucket == bucket && c.dtype == dtype) return &c;
    return nullptr;
}

std::string TuneCache::to_json() const {
    nlohmann::json choices = nlohmann::json::array();
    for (const TuneChoice& c : choices_)
        choices.push_back({{"op", op_name(c.op)},
                           {"bucket", c.bucket},
                           {"dtype", c.dtype},
                           {"variant", c.variant},
                           {"splits", c.splits},
                           {"median_us", c.median_us}});
    const nlohmann::json j = {{"format", kFormat}, {"version", kVersion}, {"key", key_json(key_)}, {"choices", choices}};
    return j.dump(2) + "\n";
}

std::optional<TuneCache> TuneCache::from_json(std::string_view text, const CacheKey& expected, std::string& why) {
    why.clear();
    nlohmann::json j;
    try {
        j = nlohmann::json::parse(text);
    } catch (const nlohmann::json::exception& e) {
        why = fmt::format("not valid JSON ({})", e.what());
        return std::nullopt;
    }
    try {
        if (!j.is_object() || j.value("format", std::string()) != kFormat) {
            why = fmt::format("not a nibble tune cache (no \"format\": \"{}\")", kFormat);
            return std::nullopt;
        }
        if (j.at("version").get<int>() != kVersion) {
            why = fmt::format("cache format version {}, this build reads {}", j.at("version").dump(), kVersion);
            return std::nullopt;
        }
        const CacheKey got = key_from_json(j.at("key"));
        if (!(got == expected)) {
            why = fmt::format("written for another key: {}", key_difference(got, expected));
            return std::nullopt;
        }
        TuneCache cache(got);
        std::vector<std::string> dropped;
        for (const nlohmann::json& c : j.at("choices")) {
            TuneChoice choice;
            const std::string op = c.at("op").get<std::string>();
            const auto kind = op_from_name(op);
            choice.variant = c.at("variant").get<std::string>();
            if (!kind || !find_variant(*kind, choice.variant)) {
                dropped.push_back(fmt::format("{} {}", op, choice.variant));
                continue;
            }
            choice.op = *kind;
            choice.bucket = c.at("bucket").get<std::string>();
            choice.dtype = c.at("dtype").get<std::string>();
            choice.splits = c.value("splits", 1);
            choice.median_us = c.value("median_us", 0.0);
            if (choice.splits < 1) {
                dropped.push_back(fmt::format("{} {} (splits {})", op, choice.variant, choice.splits));
                continue;
            }
            cache.put(choice);
        }
        if (!dropped.empty()) why = fmt::format("dropped unknown variants: {}", fmt::join(dropped, ", "));
        return cache;
    } catch (const std::exception& e) {  // nlohmann's type / out_of_range errors, std::stoi
        why = fmt::format("malformed ({})", e.what());
        return std::nullopt;
    }
}

std::string tune_cache_dir() {
    const char* xdg = std::getenv("XDG_CACHE_HOME");
    // The XDG base directory spec: a relative path is invalid and must be ignored.
    if (xdg && xdg[0] == '/') return std::string(xdg) + "/nibble/tune";
    const char* home = std::getenv("HOME");
    NIBBLE_CHECK(home && home[0] != '\0',
                 "cannot place the tune cache: neither XDG_CACHE_HOME nor HOME is set to a directory");
    return std::string(home) + "/.cache/nibble/tune";
}

std::string tune_cache_path(const std::string& dir, const CacheKey& key) {
    std::string name;
    for (char c : key.gpu_name) {
        const unsigned char u = static_cast<unsigned char>(c);
        if (std::isalnum(u)) name += static_cast<char>(std::tolower(u));
        else if (!name.empty() && name.back() != '-') name += '-';
    }
    while (!name.empty() && name.back() == '-') name.pop_back();
    if (name.empty()) name = "gpu";
    return fmt::format("{}/{}-cc{}{}-sm{}.json", dir, name, key.cc_major, key.cc_minor, key.sm_count);
}

std::optional<TuneCache> load_tune_cache(const std::string& path, const CacheKey& expected) {
    std::error_code ec;
    if (!std::filesystem::exists(path, ec)) return std::nullopt;
    std::ifstream in(path, std::ios::binary);
    if (!in) {
        log::warn("tune cache {}: cannot be read; ignoring it (kernels will use built-in choices)", path);
        return std::nullopt;
    }
    std::ostringstream text;
    text << in.rdbuf();
    std::string why;
    auto cache = TuneCache::from_json(text.str(), expected, why);
    if (!cache) {
        log::warn("tune cache {}: {}; ignoring it (run `nibble tune` or `nibble serve --tune full` to rebuild it)",
                  path, why);
        return std::nullopt;
    }
    if (!why.empty()) log::warn("tune cache {}: {}", path, why);
    return cache;
}

void save_tune_cache(const TuneCache& cache, const std::string& path) {
    const std::filesystem::path p(path);
    std::error_code ec;
    if (p.has_parent_path()) std::filesystem::create_directories(p.parent_path(), ec);
    NIBBLE_CHECK(!ec, "tune cache {}: cannot create its directory: {}", path, ec.message());
    const std::string tmp = fmt::format("{}.tmp.{}", path, static_cast<long>(getpid()));
    {
        std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
        NIBBLE_CHECK(out.good(), "tune cache {}: cannot write {}", path, tmp);
        out << cache.to_json();
        out.flush();
        NIBBLE_CHECK(out.good(), "tune cache {}: writing {} failed", path, tmp);
    }
    std::filesystem::rename(tmp, p, ec);
    if (ec) {
        std::filesystem::remove(tmp);
        fail("tune cache {}: cannot rename {} into place: {}", path, tmp, ec.message());
    }
}

}  // namespace nibble::tune
