// Host runtime of the CUDA emulation: runs each block as 256 std::threads over a NaN-filled (0xff)
// shared-memory arena and answers the few CUDA runtime calls the launchers make.
#include "emu.h"
#include <thread>
#include <vector>
#include <cstdio>
#include <cstdlib>
#include <stdexcept>
#include <string>

namespace lara { namespace cuda { namespace detail {
constexpr size_t kArena = 256 * 1024;
alignas(16) unsigned char lara_dyn_smem[kArena];
}}}

namespace emu {
thread_local uint3 tid3, bid3;
Block* block = nullptr;
int sms = 4;
int optin = 232448;
int64_t launched_blocks = 0;
size_t max_smem = 0;
int64_t max_grid_x = 0x7fffffff;  // what cudaDevAttrMaxGridDimX answers (a test may lower it)
bool dry_run = false;             // check and count the launches, run no block
int64_t launches = 0, widest_grid = 0;

// A real device's limits: x <= cudaDevAttrMaxGridDimX (2^31 - 1), y and z <= 65535. The
// emulation runs 1-D grids only, so y and z must be 1 unless nothing is run (dry run).
void check_grid(const dim3& grid) {
  if (grid.x < 1 || grid.x > max_grid_x || grid.y > 65535 || grid.z > 65535)
    throw std::runtime_error("emu: grid (" + std::to_string(grid.x) + ", " + std::to_string(grid.y) + ", " +
                             std::to_string(grid.z) + ") exceeds the device's limits (x <= " +
                             std::to_string(max_grid_x) + ", y, z <= 65535)");
  if (!dry_run && (grid.y != 1 || grid.z != 1)) throw std::runtime_error("emu: only 1-D grids are emulated");
  ++launches;
  if (grid.x > widest_grid) widest_grid = grid.x;
}

void run_grid(int64_t blocks, int threads, size_t smem, const std::function<void()>& body) {
  using lara::cuda::detail::lara_dyn_smem;
  using lara::cuda::detail::kArena;
  if (threads != 256) throw std::runtime_error("emu: 256 threads expected");
  if (smem > kArena) throw std::runtime_error("emu: smem over arena");
  if (smem > max_smem) max_smem = smem;
  if (dry_run) return;
  for (int64_t b = 0; b < blocks; ++b) {
    std::memset(lara_dyn_smem, 0xff, kArena);
    Block blk;
    block = &blk;
    std::vector<std::thread> ts;
    ts.reserve(256);
    for (int t = 0; t < 256; ++t)
      ts.emplace_back([&, t] {
        tid3 = make_uint3(t, 0, 0);
        bid3 = make_uint3((unsigned)b, 0, 0);
        body();
      });
    for (auto& t : ts) t.join();
    for (size_t i = smem; i < kArena; ++i)
      if (lara_dyn_smem[i] != 0xff) { fprintf(stderr, "emu: smem write beyond %zu at %zu\n", smem, i); abort(); }
    ++launched_blocks;
  }
}
}

extern "C" {
cudaError_t cudaGetDevice(int* d) { *d = 0; return cudaSuccess; }
cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr a, int) {
  if (a == cudaDevAttrMultiProcessorCount) { *v = emu::sms; return cudaSuccess; }
  if (a == cudaDevAttrMaxSharedMemoryPerBlockOptin) { *v = emu::optin; return cudaSuccess; }
  if (a == cudaDevAttrMaxGridDimX) { *v = (int)emu::max_grid_x; return cudaSuccess; }
  return cudaErrorInvalidValue;
}
cudaError_t cudaFuncSetAttribute(const void*, cudaFuncAttribute, int v) {
  return v <= emu::optin ? cudaSuccess : cudaErrorInvalidValue;
}
cudaError_t cudaGetLastError(void) { return cudaSuccess; }
const char* cudaGetErrorString(cudaError_t e) { static char buf[64]; snprintf(buf, 64, "cuda error %d", (int)e); return buf; }
}
