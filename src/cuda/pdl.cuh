// Programmatic dependent launch (PDL, sm_90+) for the kernels of a decode step. For .cu files only.
//
// Why: a decode step is ~10 small kernels a layer; each normally starts only after its predecessor has
// finished and drained, so every boundary costs the launch and ramp-up of the next grid (1-3 us measured on
// H100 inside CUDA graphs). Launched with programmatic stream serialization, a kernel's CTAs may be scheduled
// while its predecessor still runs; they load what does not depend on it (weights, parameters) and then
// block in griddepcontrol.wait until the predecessor has completed and its writes are visible.
//
// The contract every kernel launched through launch_pdl keeps (otherwise it races its predecessor):
//   1. before pdl_wait(): read only constant data (weights, scales, tables, kernel parameters), or data last
//      written at least two launches back (a MoE down GEMV's routing, a sequence's SSM state, decode attention's
//      cached keys): a grid is only resident once its predecessor releases it, which every kernel does after
//      its own pdl_wait() (rule 3), so the grid before that one has completed; write nothing;
//      and a kernel that loads anything before pdl_wait() reads its predecessor's outputs with coherent loads
//      only, never ld.global.nc (__ldg, or a const __restrict__ pointer the compiler turns into one): ptxas may
//      move non-coherent loads above the wait, and did (gemv_nvfp4_pipe_kernel's activations, CUDA 13.0: the
//      forward read the previous layer's values; found by bisecting with NIBBLE_PDL_ONLY, below). The device
//      test PdlContract.NoNonCoherentLoadAboveGridDependencyWait checks every kernel's SASS for it;
//   2. every CTA calls pdl_wait() before any early return, so the grid cannot complete before its
//      predecessor has (which keeps the ordering transitive along a chain of such kernels);
//   3. pdl_launch_dependents() may come anywhere after pdl_wait() (never before it: rule 1's reads of data two
//      launches old rely on that order): the dependent grid still waits for this whole grid. Where
//      it comes matters for speed: a dependent scheduled early holds SM slots while it waits, and if it too
//      releases its own dependent at once, a whole chain of waiting grids can take the slots a one-wave
//      GEMV needs (measured on H100: llama3-8b tg128 305 -> 268 tok/s with every kernel releasing at its
//      start). So small kernels (norms, RoPE, KV write, routing) release right after their wait (pdl_enter), while
//      grids that fill the GPU (GEMVs, attention, expert GEMMs, scans) only wait at their top and release
//      after their main loop or at exit; a chain of early grids then stops at the next big one.
// Without the launch attribute (or below sm_90) both calls return at once and the launch is an ordinary one.
#pragma once

#include <cuda_runtime.h>

#include "cuda/cuda_check.h"

namespace nibble::cuda {

// Blocks until the grid this one programmatically depends on has completed with its writes visible.
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// Lets the next kernel in the stream be scheduled now (once every CTA of this grid has called it or exited).
__device__ __forceinline__ void pdl_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// The usual prologue of a kernel whose inputs all come from its predecessor: wait for them, then release the
// next kernel. In this order (not release-then-wait, the order of the failing runs) a dependent is never
// scheduled before this kernel's own prerequisite has completed: griddepcontrol.wait promises visibility of
// the direct prerequisite's writes only, and a grid resident before an older grid finished is the case the
// failing runs had that this order removes.
__device__ __forceinline__ void pdl_enter() {
    pdl_wait();
    pdl_launch_dependents();
}

// On by default (CMake option NIBBLE_PROGRAMMATIC_LAUNCH; OFF builds ordinary launches, for comparisons).
// History: with it on, the device suite on H100 (commits 385357b..8821972) failed the NVFP4-weight forward
// tests and GraphReplaysMatchEagerSteps while every kernel's own test passed; it stayed off from 90ea977.
// Bisected with NIBBLE_PDL_ONLY/SKIP (scripts/pdl-bisect.sh): gemv_nvfp4_pipe_kernel alone made the failure;
// its SASS had the activations' LDG.CONSTANT above ACQBULK (rule 1 above). With coherent activation loads the
// whole suite passes with it on (H200, this commit's docs/perf.md entry). Measured: llama3-8b tg128 332 -> 344
// tok/s on H200, 305 -> 323 on H100 (the earlier, racy build).
#ifdef NIBBLE_PROGRAMMATIC_LAUNCH
inline constexpr bool kProgrammaticLaunch = true;
#else
inline constexpr bool kProgrammaticLaunch = false;
#endif

// For bisecting a PDL build on the device: whether `kernel` is launched programmatically, from the
// environment, read once: NIBBLE_PDL_ONLY (comma-separated substrings of mangled kernel names: only the kernels
// matching one) and NIBBLE_PDL_SKIP (those matching one launch ordinarily). Neither set: every kernel.
bool programmatic_launch_selected(const void* kernel);

// kernel<<<grid, block, smem, stream>>>(args...), with programmatic stream serialization when
// kProgrammaticLaunch is on (and the kernel is selected, above). The kernel must keep the contract above.
// Errors are thrown (NIBBLE_CUDA_CHECK).
template <class... KernelArgs, class... Args>
void launch_pdl(void (*kernel)(KernelArgs...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                Args&&... args) {
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = grid;
    cfg.blockDim = block;
    cfg.dynamicSmemBytes = smem;
    cfg.stream = stream;
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[0].val.programmaticStreamSerializationAllowed = 1;
    cfg.attrs = attr;
    cfg.numAttrs = kProgrammaticLaunch && programmatic_launch_selected(reinterpret_cast<const void*>(kernel)) ? 1 : 0;
    NIBBLE_CUDA_CHECK(cudaLaunchKernelEx(&cfg, kernel, static_cast<KernelArgs>(args)...));
}

}  // namespace nibble::cuda
