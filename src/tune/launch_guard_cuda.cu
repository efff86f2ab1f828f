// tune/launch_guard_cuda.h. No fmt/spdlog here: nvcc compiles this file.
#include "tune/launch_guard_cuda.h"

#include <exception>
#include <stdexcept>
#include <string>

namespace nibble::tune {

LaunchOutcome guarded_launch(const std::function<void()>& launch, cudaStream_t stream) {
    std::string thrown;
    bool threw = false;
    try {
        launch();
    } catch (const std::invalid_argument&) {
        throw;
    } catch (const std::exception& e) {
        threw = true;
        thrown = e.what();
    }
    // Clears a launch error the launcher left unchecked (and is a no-op after one it checked).
    const cudaError_t launch_err = cudaGetLastError();
    if (!threw && launch_err == cudaSuccess) return LaunchOutcome::success();

    std::string why = threw ? thrown : std::string("CUDA error ") + cudaGetErrorName(launch_err) + " (" +
                                           cudaGetErrorString(launch_err) + ")";
    cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
    if (cudaStreamIsCapturing(stream, &capture) != cudaSuccess) {
        (void)cudaGetLastError();
        throw std::runtime_error("kernel launch failed (" + why + ") and the stream's state cannot be read");
    }
    if (capture != cudaStreamCaptureStatusNone) return LaunchOutcome::failure(why + " (during graph capture)");
    const cudaError_t health = cudaStreamQuery(stream);
    if (health != cudaSuccess && health != cudaErrorNotReady)
        throw std::runtime_error("kernel launch failed (" + why + ") and the CUDA context is lost: " +
                                 cudaGetErrorName(health) + " (" + cudaGetErrorString(health) + ")");
    return LaunchOutcome::failure(why);
}

}  // namespace nibble::tune
