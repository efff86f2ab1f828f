// The child processes `nibble serve -tp N` starts for a node's other GPUs (cli/serve_tensor_parallel.h), with
// /bin/sh standing in for nibble: the command line a local rank gets; a child that exits or is killed before
// it is ready is named (its local GPU, pid and status); children are waited for when the set is destroyed, and
// killed at once when it is destroyed by an error; a child ignores SIGINT (the terminal's Ctrl-C is rank 0's to
// handle) and dies with its parent.
#include <gtest/gtest.h>

#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <fstream>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "base/error.h"
#include "cli/serve_tensor_parallel.h"

namespace nibble::cli {
namespace {

using Clock = std::chrono::steady_clock;

std::vector<std::string> sh(const std::string& script) { return {"sh", "-c", script}; }

// Whether pid is a live process: not gone, not a zombie (a reparented child may wait for a reaper).
bool running(pid_t pid) {
    std::ifstream stat("/proc/" + std::to_string(pid) + "/stat");
    std::string line;
    if (!std::getline(stat, line)) return false;
    const size_t paren = line.rfind(')');
    return paren != std::string::npos && paren + 2 < line.size() && line[paren + 2] != 'Z';
}

// check_alive's error once a child has exited (polling for up to 10 s), or "" if none did.
std::string first_exit(LocalRankProcesses& p) {
    for (int i = 0; i < 500; ++i) {
        try {
            p.check_alive();
        } catch (const Error& e) {
            return e.what();
        }
        std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    return "";
}

TEST(LocalRankProcesses, TheCommandIsServesOwnWithTheLocalRank) {
    EXPECT_EQ(local_rank_command("/opt/nibble", "debug", {"/models/llama", "--tensor-parallel-size", "4", "--port", "9000"}, 3),
              (std::vector<std::string>{"/opt/nibble", "--log-level", "debug", "serve", "/models/llama",
                                        "--tensor-parallel-size", "4", "--port", "9000", "--tp-local-rank", "3"}));
}

TEST(LocalRankProcesses, AChildThatExitsOrIsKilledIsNamed) {
    {
        LocalRankProcesses p("/bin/sh", {sh("sleep 1"), sh("exit 3")});
        const std::string e = first_exit(p);
        EXPECT_NE(e.find("the process of local GPU 2 (pid "), std::string::npos) << e;
        EXPECT_NE(e.find("exited with status 3 before it was ready"), std::string::npos) << e;
    }
    {
        LocalRankProcesses p("/bin/sh", {sh("kill -9 $$")});
        const std::string e = first_exit(p);
        EXPECT_NE(e.find("local GPU 1"), std::string::npos) << e;
        EXPECT_NE(e.find("was killed by signal 9"), std::string::npos) << e;
    }
    {
        LocalRankProcesses p("/nonexistent/nibble", {{"nibble"}});
        EXPECT_NE(first_exit(p).find("exited with status 127"), std::string::npos);  // exec failed
    }
}

TEST(LocalRankProcesses, DestroyedItWaitsForChildrenAndOnAnErrorKillsThem) {
    auto start = Clock::now();
    {
        LocalRankProcesses p("/bin/sh", {sh("sleep 0.3"), sh("sleep 0.5")});
    }
    const auto waited = Clock::now() - start;
    EXPECT_GE(waited, std::chrono::milliseconds(450));  // both ran to their end
    EXPECT_LT(waited, std::chrono::seconds(10));
    start = Clock::now();
    try {
        LocalRankProcesses p("/bin/sh", {sh("sleep 60")});
        throw std::runtime_error("rank 0 failed");
    } catch (const std::runtime_error&) {
    }
    EXPECT_LT(Clock::now() - start, std::chrono::seconds(5));  // killed, not waited for
}

TEST(LocalRankProcesses, AChildIgnoresSigintAndDiesWithItsParent) {
    const std::string pid_file = ::testing::TempDir() + "/nibble-local-rank-child.pid";
    std::remove(pid_file.c_str());
    // An intermediate process owns the set, so that its death can be watched; its child writes its pid.
    const pid_t owner = ::fork();
    ASSERT_GE(owner, 0);
    if (owner == 0) {
        LocalRankProcesses* p = new LocalRankProcesses("/bin/sh", {sh("echo $$ > " + pid_file + "; exec sleep 60")});
        (void)p;   // never destroyed: the owner's exit must take the child with it
        ::pause();  // until the test kills this process
        ::_exit(0);
    }
    pid_t child = 0;
    for (int i = 0; i < 500 && child == 0; ++i) {
        std::ifstream in(pid_file);
        if (!(in >> child)) child = 0;
        if (child == 0) std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    ASSERT_GT(child, 0) << "the child never wrote its pid";
    ::kill(child, SIGINT);
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
    EXPECT_TRUE(running(child)) << "SIGINT ended the child";
    ::kill(owner, SIGKILL);
    ::waitpid(owner, nullptr, 0);
    bool gone = false;
    for (int i = 0; i < 250 && !gone; ++i) {
        gone = !running(child);
        if (!gone) std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    EXPECT_TRUE(gone) << "the child (pid " << child << ") outlived its parent";
    if (!gone) ::kill(child, SIGKILL);
    std::remove(pid_file.c_str());
}

}  // namespace
}  // namespace nibble::cli
