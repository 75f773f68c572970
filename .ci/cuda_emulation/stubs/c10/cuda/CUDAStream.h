// Emulated CUDA stand-ins for the torch headers the launchers include (see .ci/cuda_emulation.sh).
#pragma once
#include <cuda_runtime.h>
#include <c10/core/Device.h>
namespace c10 { namespace cuda { struct EmuStream { cudaStream_t stream() const { return nullptr; } };
inline EmuStream getCurrentCUDAStream(c10::DeviceIndex = -1) { return {}; } } }
