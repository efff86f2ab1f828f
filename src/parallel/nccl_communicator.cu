// NcclCommunicator: NCCL collectives behind the Communicator interface. Host code only (no kernels); a .cu
// file so that it is built only when NIBBLE_CUDA is on. No fmt here (nvcc): errors are std::runtime_error.
#include "parallel/nccl_communicator.h"

#include <nccl.h>
#include <nccl_device.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "cuda/cuda_check.h"
#include "parallel/lsa_reduce_norm_cuda.h"
#include "parallel/tcp_rendezvous.h"

namespace nibble {

namespace {

[[noreturn]] void throw_nccl_error(ncclResult_t rc, const char* expr, const char* file, int line) {
    throw std::runtime_error(std::string("NCCL error ") + ncclGetErrorString(rc) + " in " + expr + " at " + file +
                             ":" + std::to_string(line));
}

#define NIBBLE_NCCL_CHECK(expr)                                                  \
    do {                                                                         \
        ncclResult_t nibble_nccl_rc_ = (expr);                                   \
        if (nibble_nccl_rc_ != ncclSuccess)                                      \
            throw_nccl_error(nibble_nccl_rc_, #expr, __FILE__, __LINE__);        \
    } while (0)

ncclDataType_t nccl_dtype(DType dtype, const char* what) {
    switch (dtype) {
        case DType::F32: return ncclFloat32;
        case DType::BF16: return ncclBfloat16;
        default: break;
    }
    throw std::runtime_error(std::string("NcclCommunicator::") + what + ": dtype " + std::string(dtype_name(dtype)) +
                             " is not supported (F32 or BF16)");
}

void check_count(int64_t count, const char* what) {
    if (count < 0) throw std::runtime_error(std::string("NcclCommunicator::") + what + ": negative count");
}

}  // namespace

NcclCommunicator::NcclCommunicator(const NcclBootstrap& b, cudaStream_t stream)
    : stream_(stream), rank_(b.rank), world_size_(b.world_size), device_(b.device) {
    if (b.world_size < 1 || b.rank < 0 || b.rank >= b.world_size)
        throw std::runtime_error("NcclCommunicator: rank " + std::to_string(b.rank) + " is outside a group of " +
                                 std::to_string(b.world_size));
    NIBBLE_CUDA_CHECK(cudaSetDevice(b.device));
    std::vector<uint8_t> id_bytes(sizeof(ncclUniqueId), 0);
    if (b.rank == 0) {
        ncclUniqueId id;
        NIBBLE_NCCL_CHECK(ncclGetUniqueId(&id));
        std::memcpy(id_bytes.data(), &id, sizeof id);
    }
    const RendezvousOptions ro{.master_addr = b.master_addr,
                               .master_port = b.master_port,
                               .world_size = b.world_size,
                               .rank = b.rank,
                               .timeout_ms = b.timeout_ms};
    id_bytes = rendezvous_broadcast(ro, id_bytes);
    if (id_bytes.size() != sizeof(ncclUniqueId))
        throw std::runtime_error("NcclCommunicator: rank 0 sent an id of " + std::to_string(id_bytes.size()) +
                                 " bytes, NCCL's is " + std::to_string(sizeof(ncclUniqueId)) +
                                 " (different NCCL versions on the nodes?)");
    ncclUniqueId id;
    std::memcpy(&id, id_bytes.data(), sizeof id);
    // NCCL connects its peers lazily, at the first collective that needs them, by default; a connection
    // cannot be made inside CUDA graph capture (measured on 2 x H100: "internal error" when a decode graph
    // held the group's first all-reduce). Connect every peer at init instead, unless the user chose otherwise.
    setenv("NCCL_RUNTIME_CONNECT", "0", 0);
    ncclComm_t comm = nullptr;
    NIBBLE_NCCL_CHECK(ncclCommInitRank(&comm, b.world_size, id, b.rank));
    comm_ = comm;
    // One eager all-reduce before any capture: whatever NCCL still sets up on first use happens here.
    float* probe = nullptr;
    const size_t gather = 256, probe_floats = 1024 + gather * static_cast<size_t>(world_size_);
    NIBBLE_CUDA_CHECK(cudaMalloc(&probe, probe_floats * sizeof(float)));
    NIBBLE_CUDA_CHECK(cudaMemsetAsync(probe, 0, probe_floats * sizeof(float), stream_));
    NIBBLE_NCCL_CHECK(ncclAllReduce(probe, probe, 1024, ncclFloat32, ncclSum, comm_, stream_));
    NIBBLE_NCCL_CHECK(ncclAllGather(probe, probe + 1024, gather, ncclFloat32, comm_, stream_));
    NIBBLE_CUDA_CHECK(cudaStreamSynchronize(stream_));
    NIBBLE_CUDA_CHECK(cudaFree(probe));
}

NcclCommunicator::~NcclCommunicator() {
    if (comm_ != nullptr) {
        if (dev_comm_ != nullptr) (void)ncclDevCommDestroy(comm_, dev_comm_);
        delete dev_comm_;
        if (reduce_scratch_ != nullptr) (void)cudaFree(reduce_scratch_);
        for (const Window& w : windows_) {
            (void)ncclCommWindowDeregister(comm_, static_cast<ncclWindow_t>(w.handle));
            (void)ncclMemFree(w.ptr);
        }
        ncclCommDestroy(comm_);
    }
}

void* NcclCommunicator::fast_buffer(size_t bytes) {
    // NIBBLE_NCCL_WINDOWS=0: ordinary memory (to measure what the symmetric kernels save).
    if (const char* e = std::getenv("NIBBLE_NCCL_WINDOWS"); e != nullptr && std::string(e) == "0") return nullptr;
    void* ptr = nullptr;
    ncclResult_t rc = ncclMemAlloc(&ptr, bytes);
    if (rc != ncclSuccess) {
        std::fprintf(stderr, "NCCL: ncclMemAlloc of %zu bytes failed (%s); collectives use ordinary memory\n", bytes,
                     ncclGetErrorString(rc));
        return nullptr;
    }
    ncclWindow_t win = nullptr;
    rc = ncclCommWindowRegister(comm_, ptr, bytes, &win, NCCL_WIN_COLL_SYMMETRIC);
    if (rc != ncclSuccess) {
        std::fprintf(stderr, "NCCL: symmetric window registration failed (%s); collectives use ordinary memory\n",
                     ncclGetErrorString(rc));
        (void)ncclMemFree(ptr);
        return nullptr;
    }
    windows_.push_back({ptr, bytes, win});
    if (windows_.size() == 1) make_device_comm();
    return ptr;
}

// Collective like fast_buffer, which calls it: every rank takes the same branches (the same NCCL library and
// environment on every rank of a node; across nodes the LSA check below fails alike everywhere).
void NcclCommunicator::make_device_comm() {
    if (const char* e = std::getenv("NIBBLE_LSA_NORM"); e != nullptr && std::string(e) == "0") return;
    int version = 0;
    if (ncclGetVersion(&version) != ncclSuccess || version != NCCL_VERSION_CODE) {
        // The device API's structures are compiled in from nccl_device.h: only the library of that version
        // is known to fill them the same way.
        std::fprintf(stderr, "NCCL: runtime version %d, built against %d: the fused all-reduce + norm is off\n",
                     version, NCCL_VERSION_CODE);
        return;
    }
    ncclDevCommRequirements reqs;
    std::memset(&reqs, 0, sizeof reqs);
    reqs.lsaBarrierCount = static_cast<int>(cuda::kLsaReduceNormMaxSlices);
    auto* dc = new ncclDevComm;
    const ncclResult_t rc = ncclDevCommCreate(comm_, &reqs, dc);
    if (rc != ncclSuccess) {
        std::fprintf(stderr, "NCCL: no device communicator (%s): the fused all-reduce + norm is off\n",
                     ncclGetErrorString(rc));
        delete dc;
        return;
    }
    if (dc->lsaSize != world_size_) {  // ranks on other nodes: not load/store accessible
        (void)ncclDevCommDestroy(comm_, dc);
        delete dc;
        return;
    }
    dev_comm_ = dc;
    NIBBLE_CUDA_CHECK(cudaMalloc(&reduce_scratch_, cuda::kLsaReduceNormScratchBytes));
    NIBBLE_CUDA_CHECK(cudaMemset(reduce_scratch_, 0, cuda::kLsaReduceNormScratchBytes));
}

bool NcclCommunicator::can_all_reduce_residual_rmsnorm(int64_t m, int64_t d, DType dtype) const {
    return dev_comm_ != nullptr && cuda::lsa_reduce_norm_supported(m, d, dtype);
}

void NcclCommunicator::all_reduce_residual_rmsnorm(const void* rows, int64_t m, int64_t d, DType dtype,
                                                   void* residual, const float* weight, float eps, void* out) {
    if (!can_all_reduce_residual_rmsnorm(m, d, dtype))
        throw std::runtime_error("NcclCommunicator::all_reduce_residual_rmsnorm: not available for m = " +
                                 std::to_string(m) + ", d = " + std::to_string(d));
    const auto* at = static_cast<const char*>(rows);
    const size_t bytes = static_cast<size_t>(m * d) * dtype_size(dtype);
    for (const Window& w : windows_) {
        const auto* base = static_cast<const char*>(w.ptr);
        if (at < base || at + bytes > base + w.bytes) continue;
        cuda::lsa_all_reduce_residual_rmsnorm(*dev_comm_, static_cast<ncclWindow_t>(w.handle),
                                              static_cast<size_t>(at - base), m, d, dtype, residual, weight, eps, out,
                                              reduce_scratch_, stream_);
        return;
    }
    throw std::runtime_error("NcclCommunicator::all_reduce_residual_rmsnorm: the " + std::to_string(bytes) +
                             " bytes of rows are not inside one fast buffer");
}

void NcclCommunicator::all_reduce_sum(void* data, int64_t count, DType dtype) {
    check_count(count, "all_reduce_sum");
    NIBBLE_NCCL_CHECK(ncclAllReduce(data, data, static_cast<size_t>(count), nccl_dtype(dtype, "all_reduce_sum"),
                                    ncclSum, comm_, stream_));
}

void NcclCommunicator::all_gather(const void* send, int64_t count, DType dtype, void* recv) {
    check_count(count, "all_gather");
    NIBBLE_NCCL_CHECK(ncclAllGather(send, recv, static_cast<size_t>(count), nccl_dtype(dtype, "all_gather"), comm_,
                                    stream_));
}

}  // namespace nibble
