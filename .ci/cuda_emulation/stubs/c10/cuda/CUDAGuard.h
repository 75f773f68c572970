// Emulated CUDA stand-ins for the torch headers the launchers include (see .ci/cuda_emulation.sh).
#pragma once
#include <c10/core/Device.h>
namespace c10 { namespace cuda { struct CUDAGuard { explicit CUDAGuard(c10::Device) {} }; } }
