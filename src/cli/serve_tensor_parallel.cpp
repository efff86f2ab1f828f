#include "cli/serve_tensor_parallel.h"

#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <climits>
#include <cstring>
#include <exception>
#include <nlohmann/json.hpp>
#include <thread>

#include "base/error.h"
#include "base/log.h"
#include "base/thread_pool.h"
#include "cli/backend.h"
#include "cli/tune_session.h"
#include "parallel/tensor_parallel.h"
#if defined(NIBBLE_HAVE_CUDA)
#include <cuda_runtime.h>

#include "cuda/device_info.h"
#include "gpu/cuda_model_runner.h"
#include "gpu/tensor_parallel_runner.h"
#include "gpu/weight_upload.h"
#include "tune/device_profile.h"
#endif

namespace nibble::cli {

namespace {

using server::ServeOptions;
using Clock = std::chrono::steady_clock;

std::string log_level_name() {
    switch (spdlog::get_level()) {
        case spdlog::level::trace: return "trace";
        case spdlog::level::debug: return "debug";
        case spdlog::level::info: return "info";
        case spdlog::level::warn: return "warn";
        default: return "error";
    }
}

std::string exit_text(int status) {
    if (WIFEXITED(status)) return "exited with status " + std::to_string(WEXITSTATUS(status));
    if (WIFSIGNALED(status)) return "was killed by signal " + std::to_string(WTERMSIG(status)) + " (" + strsignal(WTERMSIG(status)) + ")";
    return "stopped (status " + std::to_string(status) + ")";
}

#if defined(NIBBLE_HAVE_CUDA)
using ojson = nlohmann::ordered_json;

std::vector<uint8_t> bytes_of(const ojson& j) {
    const std::string s = j.dump();
    return {s.begin(), s.end()};
}

ojson json_of(const std::vector<uint8_t>& bytes, const std::string& what) {
    try {
        return ojson::parse(bytes.begin(), bytes.end());
    } catch (const nlohmann::json::exception& e) {
        fail("tensor parallel: {} is not valid JSON: {}", what, e.what());
    }
}

// What every rank's runner must share, decided by rank 0 (the memory plan and the serve flags), with the
// model's shape so that a follower that loaded another model says so.
ojson setup_message(const ModelConfig& mc, const gpu::CudaRunnerOptions& ro, int64_t tp_size) {
    return {{"tensor_parallel_size", tp_size},
            {"architecture", mc.arch_name},
            {"n_layers", mc.n_layers},
            {"n_embd", mc.n_embd},
            {"vocab_size", mc.vocab_size},
            {"kv_dtype", std::string(kv_dtype_name(ro.kv_dtype))},
            {"num_blocks", ro.num_blocks},
            {"block_size", ro.block_size},
            {"max_model_len", ro.max_model_len},
            {"max_num_batched_tokens", ro.max_num_batched_tokens},
            {"max_num_seqs", ro.max_num_seqs},
            {"max_cudagraph_capture_size", ro.max_cudagraph_capture_size}};
}

gpu::CudaRunnerOptions runner_options(const ojson& setup, const ModelConfig& mc, int64_t tp_size) {
    try {
        NIBBLE_CHECK(setup.at("tensor_parallel_size").get<int64_t>() == tp_size,
                     "rank 0 runs tensor-parallel size {}, this rank {} (check --tensor-parallel-size on every node)",
                     setup.at("tensor_parallel_size").get<int64_t>(), tp_size);
        const std::string arch = setup.at("architecture").get<std::string>();
        const int64_t layers = setup.at("n_layers").get<int64_t>(), embd = setup.at("n_embd").get<int64_t>(),
                      vocab = setup.at("vocab_size").get<int64_t>();
        NIBBLE_CHECK(arch == mc.arch_name && layers == mc.n_layers && embd == mc.n_embd && vocab == mc.vocab_size,
                     "rank 0 serves a {} of {} layers, hidden {}, vocabulary {}; this rank loaded a {} of {}, {}, {} "
                     "(MODEL_DIR must hold the same model on every node)",
                     arch, layers, embd, vocab, mc.arch_name, mc.n_layers, mc.n_embd, mc.vocab_size);
        const std::string kv = setup.at("kv_dtype").get<std::string>();
        const std::optional<KvDtype> kv_dtype = kv_dtype_from_name(kv);
        NIBBLE_CHECK(kv_dtype.has_value(), "rank 0 asks for KV cache dtype '{}'", kv);
        return gpu::CudaRunnerOptions{.kv_dtype = *kv_dtype,
                                      .num_blocks = setup.at("num_blocks").get<int64_t>(),
                                      .block_size = setup.at("block_size").get<int64_t>(),
                                      .max_model_len = setup.at("max_model_len").get<int64_t>(),
                                      .max_num_batched_tokens = setup.at("max_num_batched_tokens").get<int64_t>(),
                                      .max_num_seqs = setup.at("max_num_seqs").get<int64_t>(),
                                      .act_dtype = DType::BF16,
                                      .max_cudagraph_capture_size = setup.at("max_cudagraph_capture_size").get<int64_t>()};
    } catch (const nlohmann::json::exception& e) {
        fail("tensor parallel: rank 0's setup lacks a field or has a wrong type: {}", e.what());
    }
}

// This GPU's kernel choices from the tune cache (null without one).
std::shared_ptr<tune::KernelChoices> kernel_choices(const tune::TuneCache* cache, int device) {
    if (cache == nullptr) return nullptr;
    return std::make_shared<tune::KernelChoices>(cache, tune::profile_from_device(cuda::query_device(device)),
                                                 tune::BuildTargets::configured());
}

// Uploads `rank`'s shard of the model; the checks name what does not split.
std::shared_ptr<const gpu::DeviceDecoder> upload_shard(Model& model, int64_t tp_size, int64_t rank) {
    const ModelConfig& mc = model.config();
    check_tensor_parallel(mc, tp_size);
    check_tensor_parallel_quant(mc, model.quant_config(), tp_size);
    DecoderView view;
    NIBBLE_CHECK(model.decoder_view(view), "tensor parallel: the CUDA backend does not run {}", mc.arch_name);
    const auto t0 = Clock::now();
    auto weights = std::make_shared<const gpu::DeviceDecoder>(
        gpu::upload_decoder_rank(mc, model.quant_config(), view, tp_size, rank));
    log::info("tensor parallel: rank {} of {}: {:.2f} GB of weights (its shard) uploaded in {:.1f} s", rank, tp_size,
              static_cast<double>(weights->device_bytes()) / 1e9,
              std::chrono::duration<double>(Clock::now() - t0).count());
    return weights;
}
#endif

}  // namespace

void check_tensor_parallel_serving(const ServeOptions& o) {
    const ParallelOptions& p = o.parallel;
    if (p.tensor_parallel_size == 1 && p.nnodes == 1) {
        NIBBLE_CHECK(o.tp_local_rank < 0, "--tp-local-rank is for the processes nibble serve starts itself under "
                                          "--tensor-parallel-size > 1");
        return;
    }
    NIBBLE_CHECK(o.device != "cpu",
                 "--tensor-parallel-size {} with --device cpu: the CPU backend has no tensor parallelism, and nibble "
                 "serve will not run tensor-parallel size 1 instead (use --device cuda or auto, or "
                 "--tensor-parallel-size 1)",
                 p.tensor_parallel_size);
    NIBBLE_CHECK(!o.model_dir.empty(),
                 "--tensor-parallel-size {}: give a MODEL_DIR (the built-in tiny model is served on one device only)",
                 p.tensor_parallel_size);
#if defined(NIBBLE_HAVE_CUDA)
    (void)step_channel_options(p, 0);  // --master-port + 1 must be a port too
    const int gpus = cuda::device_count();
    NIBBLE_CHECK(gpus >= p.gpus_per_node(),
                 "--tensor-parallel-size {} over --nnodes {} needs {} GPUs on this node; it has {} (nibble serve will "
                 "not run a smaller tensor-parallel size instead)",
                 p.tensor_parallel_size, p.nnodes, p.gpus_per_node(), gpus);
#else
    fail("--tensor-parallel-size {} (--nnodes {}): tensor parallelism runs on the CUDA backend (one process per GPU, "
         "NCCL all-reduce), and this build has none; nibble serve will not run tensor-parallel size 1 instead. Build "
         "with CUDA, serve with --tensor-parallel-size 1, or see the per-GPU memory of the split with `nibble plan "
         "MODEL_DIR --tensor-parallel-size {}`",
         p.tensor_parallel_size, p.nnodes, p.tensor_parallel_size);
#endif
}

bool is_tensor_parallel_follower(const ServeOptions& o) {
    return o.parallel.tensor_parallel_size > 1 && (o.tp_local_rank >= 0 || o.parallel.node_rank > 0);
}

std::vector<std::string> local_rank_command(const std::string& program, const std::string& log_level,
                                            const std::vector<std::string>& serve_args, int64_t local_rank) {
    std::vector<std::string> args = {program, "--log-level", log_level, "serve"};
    args.insert(args.end(), serve_args.begin(), serve_args.end());
    args.push_back("--tp-local-rank");
    args.push_back(std::to_string(local_rank));
    return args;
}

namespace {

std::vector<std::vector<std::string>> local_rank_commands(const std::vector<std::string>& serve_args,
                                                          int64_t gpus_per_node) {
    char exe[PATH_MAX] = {};
    const ssize_t n = ::readlink("/proc/self/exe", exe, sizeof exe - 1);
    const std::string program = n > 0 ? std::string(exe, static_cast<size_t>(n)) : std::string("nibble");
    std::vector<std::vector<std::string>> commands;
    for (int64_t r = 1; r < gpus_per_node; ++r)
        commands.push_back(local_rank_command(program, log_level_name(), serve_args, r));
    return commands;
}

}  // namespace

LocalRankProcesses::LocalRankProcesses(const std::vector<std::string>& serve_args, int64_t gpus_per_node)
    : LocalRankProcesses("/proc/self/exe", local_rank_commands(serve_args, gpus_per_node)) {}

LocalRankProcesses::LocalRankProcesses(const std::string& exec_path,
                                       const std::vector<std::vector<std::string>>& commands) {
    const pid_t parent = ::getpid();
    for (size_t i = 0; i < commands.size(); ++i) {
        const int64_t r = static_cast<int64_t>(i) + 1;
        std::vector<std::string> args = commands[i];
        std::vector<char*> argv;
        for (std::string& a : args) argv.push_back(a.data());
        argv.push_back(nullptr);
        const pid_t pid = ::fork();
        NIBBLE_CHECK(pid >= 0, "tensor parallel: cannot start the process of local GPU {}: fork: {}", r,
                     std::strerror(errno));
        if (pid == 0) {
            // The child: only async-signal-safe calls until exec.
            ::prctl(PR_SET_PDEATHSIG, SIGKILL);
            if (::getppid() != parent) ::_exit(1);
            sigset_t none;
            sigemptyset(&none);
            ::sigprocmask(SIG_SETMASK, &none, nullptr);
            ::signal(SIGINT, SIG_IGN);
            ::execv(exec_path.c_str(), argv.data());
            ::_exit(127);
        }
        children_.push_back({.local_rank = r, .pid = pid});
        log::info("tensor parallel: started the process of local GPU {} (pid {})", r, pid);
    }
}

void LocalRankProcesses::check_alive() {
    for (Child& c : children_) {
        if (c.exited) continue;
        int status = 0;
        if (::waitpid(c.pid, &status, WNOHANG) != c.pid) continue;
        c.exited = true;
        c.status = status;
        fail("tensor parallel: the process of local GPU {} (pid {}) {} before it was ready; its error is above",
             c.local_rank, c.pid, exit_text(status));
    }
}

LocalRankProcesses::~LocalRankProcesses() {
    // Once rank 0 has told them to stop (or closed the step channel) they exit within moments; an error on
    // the way out does not wait for children still loading.
    const bool unwinding = std::uncaught_exceptions() > 0;
    const Clock::time_point deadline = Clock::now() + std::chrono::seconds(unwinding ? 0 : 20);
    for (Child& c : children_) {
        while (!c.exited) {
            int status = 0;
            const pid_t got = ::waitpid(c.pid, &status, WNOHANG);
            if (got == c.pid || (got < 0 && errno == ECHILD)) {
                c.exited = true;
                if (got == c.pid && status != 0)
                    log::warn("tensor parallel: the process of local GPU {} (pid {}) {}", c.local_rank, c.pid,
                              exit_text(status));
                break;
            }
            if (Clock::now() >= deadline) {
                if (!unwinding)
                    log::warn("tensor parallel: the process of local GPU {} (pid {}) did not stop; killing it",
                              c.local_rank, c.pid);
                ::kill(c.pid, SIGKILL);
                ::waitpid(c.pid, &status, 0);
                c.exited = true;
                break;
            }
            std::this_thread::sleep_for(std::chrono::milliseconds(20));
        }
    }
}

TensorParallelRank0::TensorParallelRank0(const ServeOptions& o, const std::vector<std::string>& serve_args)
    : options_(o), children_(serve_args, o.parallel.gpus_per_node()) {
    channel_ = std::make_unique<StepChannelLeader>(step_channel_options(o.parallel, 0));
}

TensorParallelRank0::~TensorParallelRank0() = default;

std::unique_ptr<ModelRunner> TensorParallelRank0::make_runner(Model& model, const MemoryPlan& plan,
                                                              int64_t max_model_len, const tune::TuneCache* tune_cache) {
#if defined(NIBBLE_HAVE_CUDA)
    NIBBLE_CHECK(channel_ != nullptr, "tensor parallel: rank 0's runner is made once");
    NIBBLE_CHECK(plan.kv_dtype != KvDtype::F32, "--kv-cache-dtype: the CUDA backend's cache is bf16, fp8 or nvfp4");
    const int64_t tp = options_.parallel.tensor_parallel_size;
    const ServeOptions& o = options_;
    auto weights = upload_shard(model, tp, 0);
    log::info("tensor parallel: waiting for ranks 1 .. {} (step channel on port {})", tp - 1, channel_->port());
    const auto tick = [this] { children_.check_alive(); };
    channel_->accept_followers(tick);
    gpu::CudaRunnerOptions ro{.kv_dtype = plan.kv_dtype,
                              .num_blocks = plan.kv_blocks,
                              .block_size = o.block_size,
                              .max_model_len = max_model_len,
                              .max_num_batched_tokens = plan.max_num_batched_tokens,
                              .max_num_seqs = o.max_num_seqs,
                              .act_dtype = DType::BF16,
                              .max_cudagraph_capture_size = o.enforce_eager ? 0 : o.max_cudagraph_capture_size};
    const ojson setup = setup_message(model.config(), ro, tp);
    for (int r = 1; r < tp; ++r) channel_->send(r, bytes_of(setup));
    // Rank 0 reads its options back from the same message as the followers: one source for every rank.
    ro = runner_options(setup, model.config(), tp);
    ro.kernel_choices = kernel_choices(tune_cache, 0);
    auto runner = std::make_unique<gpu::CudaModelRunner>(weights, ro);
    for (int r = 1; r < tp; ++r) {
        const ojson reply = json_of(channel_->receive(r, tick), "rank " + std::to_string(r) + "'s answer");
        if (reply.contains("error"))
            fail("tensor parallel: rank {} could not start: {}", r, reply["error"].get<std::string>());
        NIBBLE_CHECK(reply.value("ready", false), "tensor parallel: rank {} answered {}", r, reply.dump());
    }
    log::info("tensor parallel: every rank is ready; joining NCCL (--master-port {})", o.parallel.master_port);
    auto comm = gpu::join_tensor_parallel_group(*runner, nccl_bootstrap(o.parallel, 0));
    log::info("CUDA backend, tensor-parallel size {} on {} x {}: KV cache {} ({} blocks per GPU)", tp, tp,
              cuda::query_device(0).name, kv_dtype_name(plan.kv_dtype), plan.kv_blocks);
    return gpu::make_tensor_parallel_leader(std::move(channel_), std::move(runner), std::move(comm));
#else
    (void)model, (void)plan, (void)max_model_len, (void)tune_cache;
    fail("tensor parallelism needs the CUDA backend, and this build has none");
#endif
}

void run_tensor_parallel_follower_process(const ServeOptions& o, const std::vector<std::string>& serve_args) {
#if defined(NIBBLE_HAVE_CUDA)
    const int64_t local = std::max<int64_t>(o.tp_local_rank, 0);
    const int64_t tp = o.parallel.tensor_parallel_size, rank = o.parallel.global_rank(local);
    // This process's GPU, before anything touches CUDA.
    const cudaError_t set = cudaSetDevice(static_cast<int>(local));
    NIBBLE_CHECK(set == cudaSuccess, "tensor parallel: rank {} cannot use GPU {} of this node: {}", rank, local,
                 cudaGetErrorString(set));
    spdlog::set_pattern(fmt::format("[%H:%M:%S.%e] [rank {}] [%^%l%$] %v", rank));
    ::signal(SIGPIPE, SIG_IGN);
    // On a node other than 0 the serve process is local rank 0 and starts the node's other GPUs itself.
    std::unique_ptr<LocalRankProcesses> children;
    if (o.tp_local_rank < 0) children = std::make_unique<LocalRankProcesses>(serve_args, o.parallel.gpus_per_node());

    StepChannelFollower channel(step_channel_options(o.parallel, rank));
    std::unique_ptr<gpu::CudaModelRunner> runner;
    std::optional<tune::TuneCache> tune_cache;
    try {
        // --tune full tunes on rank 0; the others read the cache it writes, as --tune cached does.
        tune_cache = serve_tune_cache(o.tune == server::TuneMode::Off ? server::TuneMode::Off : server::TuneMode::Cached,
                                      o.model_dir,
                                      {.max_num_seqs = o.max_num_seqs,
                                       .max_num_batched_tokens = o.max_num_batched_tokens.value_or(2048),
                                       .max_model_len = o.max_model_len.value_or(0),
                                       .kv_cache_dtype = o.kv_cache_dtype});
        std::shared_ptr<const gpu::DeviceDecoder> weights;
        ModelConfig mc;
        {
            ThreadPool pool(0);
            std::unique_ptr<Model> model = load_model(o.model_dir, pool);
            NIBBLE_CHECK(use_cuda_backend("cuda", *model), "tensor parallel: rank {} cannot run {} on CUDA", rank,
                         model->config().arch_name);
            weights = upload_shard(*model, tp, rank);
            mc = model->config();
        }  // the host copy of the weights is not needed any more
        std::vector<uint8_t> bytes;
        NIBBLE_CHECK(channel.receive(bytes), "tensor parallel: rank 0 closed the step channel before sending the setup "
                                             "(it has stopped or failed: its log says why)");
        gpu::CudaRunnerOptions ro = runner_options(json_of(bytes, "rank 0's setup"), mc, tp);
        ro.kernel_choices = kernel_choices(tune_cache ? &*tune_cache : nullptr, static_cast<int>(local));
        runner = std::make_unique<gpu::CudaModelRunner>(weights, ro);
        log::info("tensor parallel: rank {} of {} on GPU {}: KV cache {} ({} blocks)", rank, tp, local,
                  kv_dtype_name(ro.kv_dtype), ro.num_blocks);
        channel.send(bytes_of(ojson{{"ready", true}}));
    } catch (const std::exception& e) {
        try {
            channel.send(bytes_of(ojson{{"error", e.what()}}));
        } catch (const std::exception&) {
            // rank 0 is gone too; the error below is this process's last word
        }
        throw;
    }
    std::unique_ptr<NcclCommunicator> comm = gpu::join_tensor_parallel_group(*runner, nccl_bootstrap(o.parallel, local));
    int64_t steps = 0;
    try {
        steps = gpu::run_tensor_parallel_follower(*runner, channel);
    } catch (const std::exception&) {
        // The group is out of step: the runner's stream may hold a collective that never completes, and NCCL's
        // teardown talks to peers that may be gone. Leave both to the process's exit.
        (void)runner.release();
        (void)comm.release();
        throw;
    }
    log::info("tensor parallel: rank {} stopping after {} steps", rank, steps);
    runner.reset();  // before the communicator its forward uses
    comm.reset();
#else
    (void)serve_args;
    check_tensor_parallel_serving(o);  // refuses: this build has no CUDA backend
#endif
}

}  // namespace nibble::cli
