// The tune cache: round trip, the key in every field, corrupt and mismatched files ignored with a warning
// that says why, unknown variants dropped, XDG_CACHE_HOME honoured.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <optional>
#include <string>

#include "base/version.h"
#include "tune/tune_cache.h"

namespace nibble::tune {
namespace {

CacheKey test_key() {
    DeviceProfile d = builtin_profile("h100");
    d.driver_version = 13000, d.runtime_version = 13000;
    return cache_key_for(d);
}

TuneCache sample_cache() {
    TuneCache c(test_key());
    c.put({OpKind::GemvNvfp4, "m1.n4096.k4096", "bf16", "cuda_core.mt1", 1, 9.5});
    c.put({OpKind::AttentionDecode, "hd128.g4.kvh8.kv4096.seqs1", "bf16/bf16", "decode_mma.bf16.hd128", 8, 21.25});
    return c;
}

// A fresh directory under the test's temporary folder, removed at the end.
struct TempDir {
    std::filesystem::path path;
    TempDir() {
        path = std::filesystem::temp_directory_path() / ("nibble_tune_test_" + std::to_string(getpid()) + "_" +
                                                         ::testing::UnitTest::GetInstance()->current_test_info()->name());
        std::filesystem::remove_all(path);
        std::filesystem::create_directories(path);
    }
    ~TempDir() { std::filesystem::remove_all(path); }
};

// Sets an environment variable for one scope.
struct ScopedEnv {
    std::string name;
    std::optional<std::string> old;
    ScopedEnv(const char* n, const char* value) : name(n) {
        if (const char* o = std::getenv(n)) old = o;
        if (value) setenv(n, value, 1);
        else unsetenv(n);
    }
    ~ScopedEnv() {
        if (old) setenv(name.c_str(), old->c_str(), 1);
        else unsetenv(name.c_str());
    }
};

TEST(TuneCache, RoundTrip) {
    const TuneCache c = sample_cache();
    std::string why;
    const auto back = TuneCache::from_json(c.to_json(), test_key(), why);
    ASSERT_TRUE(back) << why;
    EXPECT_TRUE(why.empty()) << why;
    ASSERT_EQ(back->choices().size(), 2u);
    const TuneChoice* g = back->find(OpKind::GemvNvfp4, "m1.n4096.k4096", "bf16");
    ASSERT_NE(g, nullptr);
    EXPECT_EQ(g->variant, "cuda_core.mt1");
    EXPECT_DOUBLE_EQ(g->median_us, 9.5);
    const TuneChoice* a = back->find(OpKind::AttentionDecode, "hd128.g4.kvh8.kv4096.seqs1", "bf16/bf16");
    ASSERT_NE(a, nullptr);
    EXPECT_EQ(a->splits, 8);
    EXPECT_EQ(back->find(OpKind::GemvNvfp4, "m1.n4096.k4096", "f32"), nullptr);
}

TEST(TuneCache, PutReplacesTheSameKey) {
    TuneCache c = sample_cache();
    c.put({OpKind::GemvNvfp4, "m1.n4096.k4096", "bf16", "mma.nt1", 1, 8.0});
    EXPECT_EQ(c.choices().size(), 2u);
    EXPECT_EQ(c.find(OpKind::GemvNvfp4, "m1.n4096.k4096", "bf16")->variant, "mma.nt1");
}

TEST(TuneCache, EveryKeyFieldInvalidates) {
    const std::string text = sample_cache().to_json();
    const CacheKey base = test_key();
    std::vector<std::pair<std::string, CacheKey>> variants;
    CacheKey k = base;
    k.gpu_name = "NVIDIA H200";
    variants.push_back({"GPU", k});
    k = base, k.cc_minor = 1;
    variants.push_back({"compute capability", k});
    k = base, k.sm_count = 114;
    variants.push_back({"SMs", k});
    k = base, k.driver_version = 13010;
    variants.push_back({"driver", k});
    k = base, k.runtime_version = 12080;
    variants.push_back({"CUDA runtime", k});
    k = base, k.build_id = "other";
    variants.push_back({"build", k});
    for (const auto& [field, key] : variants) {
        std::string why;
        EXPECT_FALSE(TuneCache::from_json(text, key, why)) << field;
        EXPECT_NE(why.find("another key"), std::string::npos) << why;
        EXPECT_NE(why.find(field), std::string::npos) << field << ": " << why;
    }
}

TEST(TuneCache, CorruptFilesAreRejectedWithAReason) {
    const CacheKey key = test_key();
    const std::string good = sample_cache().to_json();
    struct Case {
        std::string text, expect;
    };
    const Case cases[] = {
        {"", "not valid JSON"},
        {good.substr(0, good.size() / 2), "not valid JSON"},
        {"[1, 2]", "not a nibble tune cache"},
        {R"({"format": "something-else"})", "not a nibble tune cache"},
        {R"({"format": "nibble-tune-cache", "version": 99})", "format version 99"},
        {R"({"format": "nibble-tune-cache", "version": 1})", "malformed"},
        {R"({"format": "nibble-tune-cache", "version": 1, "key": {"gpu": 5}})", "malformed"},
    };
    for (const Case& c : cases) {
        std::string why;
        EXPECT_FALSE(TuneCache::from_json(c.text, key, why)) << c.text;
        EXPECT_NE(why.find(c.expect), std::string::npos) << c.text << " -> " << why;
    }
    // A choice with a wrong type inside an otherwise good file.
    std::string bad = good;
    const size_t at = bad.find("\"splits\": 8");
    ASSERT_NE(at, std::string::npos);
    bad.replace(at, 11, "\"splits\": \"x\"");
    std::string why;
    EXPECT_FALSE(TuneCache::from_json(bad, key, why));
    EXPECT_NE(why.find("malformed"), std::string::npos) << why;
}

TEST(TuneCache, UnknownVariantsAreDropped) {
    TuneCache c = sample_cache();
    c.put({OpKind::GemvNvfp4, "m2.n4096.k4096", "bf16", "no_such_variant", 1, 1.0});
    std::string why;
    const auto back = TuneCache::from_json(c.to_json(), test_key(), why);
    ASSERT_TRUE(back);
    EXPECT_EQ(back->choices().size(), 2u);
    EXPECT_NE(why.find("no_such_variant"), std::string::npos) << why;
}

TEST(TuneCache, SaveLoadAndIgnoreMismatch) {
    TempDir dir;
    const CacheKey key = test_key();
    const std::string path = tune_cache_path((dir.path / "deep" / "er").string(), key);
    EXPECT_NE(path.find("nvidia-h100-80gb-hbm3-cc90-sm132.json"), std::string::npos) << path;
    EXPECT_FALSE(load_tune_cache(path, key));  // absent: nothing, silently
    save_tune_cache(sample_cache(), path);
    const auto loaded = load_tune_cache(path, key);
    ASSERT_TRUE(loaded);
    EXPECT_EQ(loaded->choices().size(), 2u);
    CacheKey other = key;
    other.driver_version += 10;
    EXPECT_FALSE(load_tune_cache(path, other));
    {
        std::ofstream out(path, std::ios::trunc);
        out << "{ truncated";
    }
    EXPECT_FALSE(load_tune_cache(path, key));
    // No temporary file is left beside it.
    int files = 0;
    for (const auto& e : std::filesystem::directory_iterator(std::filesystem::path(path).parent_path())) {
        (void)e;
        ++files;
    }
    EXPECT_EQ(files, 1);
}

TEST(TuneCache, DirectoryHonoursXdg) {
    {
        ScopedEnv xdg("XDG_CACHE_HOME", "/tmp/xdg-test");
        EXPECT_EQ(tune_cache_dir(), "/tmp/xdg-test/nibble/tune");
    }
    {
        ScopedEnv xdg("XDG_CACHE_HOME", "relative/path");  // invalid per the spec: ignored
        ScopedEnv home("HOME", "/home/someone");
        EXPECT_EQ(tune_cache_dir(), "/home/someone/.cache/nibble/tune");
    }
    {
        ScopedEnv xdg("XDG_CACHE_HOME", nullptr);
        ScopedEnv home("HOME", "/home/someone");
        EXPECT_EQ(tune_cache_dir(), "/home/someone/.cache/nibble/tune");
    }
    {
        ScopedEnv xdg("XDG_CACHE_HOME", nullptr);
        ScopedEnv home("HOME", nullptr);
        EXPECT_THROW(tune_cache_dir(), std::exception);
    }
}

TEST(TuneCache, BuildIdNamesVersionAndRegistry) {
    const std::string id = build_id();
    EXPECT_EQ(id.rfind(kNibbleVersion, 0), 0u) << id;
    EXPECT_NE(id.find(".r"), std::string::npos) << id;
    EXPECT_EQ(id, build_id());  // stable
}

}  // namespace
}  // namespace nibble::tune
