// Launches `nibble serve` four times on free ports of 127.0.0.1 (the golden llama_gqa model with canned
// tokens, twice with different parsers and options; the built-in default model once; the golden nemotron_h
// hybrid model once, for prefix caching from Mamba state snapshots), waits for /health,
// runs the node tests (serve.test.mjs, with the `openai` npm client installed by `npm ci`), then stops the
// servers with SIGTERM and expects each to exit cleanly.
#include <gtest/gtest.h>

#include <httplib.h>

#include <chrono>
#include <csignal>
#include <fcntl.h>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <regex>
#include <spawn.h>
#include <sstream>
#include <string>
#include <sys/wait.h>
#include <thread>
#include <unistd.h>
#include <vector>

extern char** environ;

namespace {

namespace fs = std::filesystem;
using namespace std::chrono_literals;

const fs::path kSource = NIBBLE_SOURCE_DIR;
const fs::path kE2e = kSource / "tests" / "e2e";

// Runs a shell command, returning its exit status and output (stdout and stderr).
int shell(const std::string& command, std::string& output) {
    output.clear();
    FILE* pipe = popen((command + " 2>&1").c_str(), "r");
    if (!pipe) return -1;
    char buf[4096];
    size_t n;
    while ((n = fread(buf, 1, sizeof buf, pipe)) > 0) output.append(buf, n);
    const int status = pclose(pipe);
    return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

std::string read_file(const fs::path& path) {
    std::ifstream in(path, std::ios::binary);
    std::stringstream s;
    s << in.rdbuf();
    return s.str();
}

struct Server {
    pid_t pid = -1;
    int port = 0;
    fs::path log;
    std::string url() const { return "http://127.0.0.1:" + std::to_string(port); }
};

// Starts `nibble serve ARGS --port 0` with its log in LOG; returns once /health answers.
Server start_server(const std::vector<std::string>& args, const fs::path& log, const std::vector<std::string>& env) {
    Server s;
    s.log = log;
    std::vector<std::string> argv = {NIBBLE_BINARY, "serve"};
    argv.insert(argv.end(), args.begin(), args.end());
    argv.insert(argv.end(), {"--host", "127.0.0.1", "--port", "0"});
    std::vector<char*> cargv;
    for (auto& a : argv) cargv.push_back(a.data());
    cargv.push_back(nullptr);
    std::vector<std::string> envs;
    for (char** e = environ; *e; ++e) envs.emplace_back(*e);
    envs.insert(envs.end(), env.begin(), env.end());
    std::vector<char*> cenv;
    for (auto& e : envs) cenv.push_back(e.data());
    cenv.push_back(nullptr);
    posix_spawn_file_actions_t actions;
    posix_spawn_file_actions_init(&actions);
    posix_spawn_file_actions_addopen(&actions, 1, log.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    posix_spawn_file_actions_adddup2(&actions, 1, 2);
    const int rc = posix_spawn(&s.pid, argv[0].c_str(), &actions, nullptr, cargv.data(), cenv.data());
    posix_spawn_file_actions_destroy(&actions);
    if (rc != 0) throw std::runtime_error("cannot start " + argv[0]);
    // The server logs the port it bound ("... on http://127.0.0.1:PORT ...").
    const std::regex bound(R"(on http://127\.0\.0\.1:(\d+))");
    const auto deadline = std::chrono::steady_clock::now() + 180s;
    while (std::chrono::steady_clock::now() < deadline) {
        int status = 0;
        if (waitpid(s.pid, &status, WNOHANG) == s.pid)
            throw std::runtime_error("nibble serve exited at start:\n" + read_file(log));
        std::smatch m;
        const std::string text = read_file(log);
        if (s.port == 0 && std::regex_search(text, m, bound)) s.port = std::stoi(m[1]);
        if (s.port != 0) {
            httplib::Client client("127.0.0.1", s.port);
            auto res = client.Get("/health");
            if (res && res->status == 200) return s;
        }
        std::this_thread::sleep_for(100ms);
    }
    kill(s.pid, SIGKILL);
    waitpid(s.pid, nullptr, 0);
    throw std::runtime_error("nibble serve did not become healthy:\n" + read_file(log));
}

// SIGTERM, then the exit status (-1 if it had to be killed).
int stop_server(Server& s) {
    if (s.pid <= 0) return -1;
    kill(s.pid, SIGTERM);
    for (int i = 0; i < 300; ++i) {
        int status = 0;
        if (waitpid(s.pid, &status, WNOHANG) == s.pid) {
            s.pid = -1;
            return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
        }
        std::this_thread::sleep_for(100ms);
    }
    kill(s.pid, SIGKILL);
    waitpid(s.pid, nullptr, 0);
    s.pid = -1;
    return -1;
}

TEST(E2e, OpenAiClientAgainstNibbleServe) {
    std::string out;
    if (shell("node --version", out) != 0) GTEST_SKIP() << "node is not installed (scripts/install-deps.sh installs it)";
    // Install the pinned npm packages unless node_modules already matches the lock file.
    const fs::path installed = kE2e / "node_modules" / ".package-lock.json";
    if (!fs::exists(installed) || read_file(installed).find("\"node_modules/openai\"") == std::string::npos ||
        fs::last_write_time(installed) < fs::last_write_time(kE2e / "package-lock.json")) {
        ASSERT_EQ(shell("cd '" + kE2e.string() + "' && npm ci --no-audit --no-fund", out), 0) << out;
    }

    const fs::path work = fs::temp_directory_path() / ("nibble-e2e-" + std::to_string(getpid()));
    fs::remove_all(work);
    fs::create_directories(work);
    const fs::path model = work / "model";
    ASSERT_EQ(shell("node '" + (kE2e / "make_model.mjs").string() + "' '" + model.string() + "'", out), 0) << out;
    const std::string canned_ids = out.substr(0, out.find('\n'));
    const std::string tmpl = (kE2e / "chat_template.jinja").string();

    std::vector<Server> servers;
    try {
        servers.push_back(start_server({model.string(), "--served-model-name", "tiny", "--max-model-len", "128",
                                        "--max-num-seqs", "64", "--reasoning-parser", "qwen3", "--tool-call-parser",
                                        "hermes", "--enable-auto-tool-choice", "--chat-template", tmpl},
                                       work / "main.log", {}));
        servers.push_back(start_server({model.string(), "--served-model-name", "tiny", "--max-model-len", "128",
                                        "--api-key", "sk-e2e", "--no-enable-prefix-caching", "--reasoning-parser",
                                        "deepseek_r1", "--tool-call-parser", "qwen3_coder", "--enable-auto-tool-choice",
                                        "--chat-template", tmpl},
                                       work / "coder.log", {}));
        // The default model is created under XDG_CACHE_HOME; a fresh one proves creation works.
        servers.push_back(start_server({"--max-model-len", "256", "--max-num-seqs", "8"}, work / "default.log",
                                       {"XDG_CACHE_HOME=" + (work / "cache").string()}));
        servers.push_back(start_server({(kSource / "tests/golden/fixtures/nemotron_h/model").string(),
                                        "--served-model-name", "hybrid", "--max-model-len", "128", "--max-num-seqs",
                                        "8"},
                                       work / "hybrid.log", {}));
    } catch (const std::exception& e) {
        for (auto& s : servers) stop_server(s);
        FAIL() << e.what();
    }
    EXPECT_NE(read_file(work / "default.log").find("MEANINGLESS"), std::string::npos)
        << "the default model must say its text is meaningless";

    const std::string env = "NIBBLE_MAIN=" + servers[0].url() + " NIBBLE_CODER=" + servers[1].url() +
                            " NIBBLE_DEFAULT=" + servers[2].url() + " NIBBLE_HYBRID=" + servers[3].url() +
                            " CANNED_IDS='" + canned_ids + "' GOLDEN='" +
                            (kSource / "tests/golden/fixtures/llama_gqa/expected.safetensors").string() + "'";
    const int rc = shell("cd '" + kE2e.string() + "' && " + env + " node --test --test-concurrency=1 serve.test.mjs", out);
    EXPECT_EQ(rc, 0) << out << "\n--- main server log (tail) ---\n"
                     << read_file(work / "main.log").substr(read_file(work / "main.log").size() > 4000
                                                                ? read_file(work / "main.log").size() - 4000 : 0);
    if (rc == 0) std::printf("%s\n", out.substr(out.rfind("# tests") == std::string::npos ? 0 : out.rfind("# tests")).c_str());

    for (auto& s : servers) EXPECT_EQ(stop_server(s), 0) << "nibble serve did not exit cleanly on SIGTERM:\n"
                                                          << read_file(s.log);
    if (!HasFailure()) fs::remove_all(work);
}

}  // namespace
