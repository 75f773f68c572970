// Host emulation of the few CUDA device features the lara kernels use (test harness only).
#pragma once
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <barrier>
#include <cstring>
#include <cstdint>
#include <functional>
#include <cmath>

namespace emu {
extern thread_local uint3 tid3, bid3;
struct Warp { std::barrier<> bar{32}; alignas(8) unsigned char slot[32][8]; };
struct Block { std::barrier<> bar{256}; Warp warps[8]; };
extern Block* block;
void run_grid(int64_t blocks, int threads, size_t smem, const std::function<void()>& body);
void check_grid(const dim3& grid);  // the device's launch limits; throws when a grid exceeds them
extern long long shuffles;
}
#define threadIdx emu::tid3
#define blockIdx emu::bid3
inline void __syncthreads() { emu::block->bar.arrive_and_wait(); }
template <class T> inline T emu_shfl(T v, int src) {
  static_assert(sizeof(T) <= 8, "");
  emu::Warp& w = emu::block->warps[threadIdx.x / 32];
  const int lane = threadIdx.x % 32;
  std::memcpy(w.slot[lane], &v, sizeof(T));
  w.bar.arrive_and_wait();
  T r;
  std::memcpy(&r, w.slot[src & 31], sizeof(T));
  w.bar.arrive_and_wait();
  return r;
}
template <class T> inline T __shfl_sync(unsigned mask, T v, int src) {
  if (mask != 0xffffffffu) throw 1;
  return emu_shfl(v, src);
}
template <class T> inline T __shfl_xor_sync(unsigned mask, T v, int m) {
  if (mask != 0xffffffffu) throw 1;
  return emu_shfl(v, (int)(threadIdx.x % 32) ^ m);
}
template <class K, class... Args>
void emu_launch(K kernel, dim3 grid, int threads, size_t smem, cudaStream_t, Args... args) {
  emu::check_grid(grid);
  emu::run_grid(grid.x, threads, smem, [&] { kernel(args...); });
}
#undef __launch_bounds__
#define __launch_bounds__(...)
template <class T> inline cudaError_t cudaFuncSetAttribute(T* f, cudaFuncAttribute a, int v) {
  return ::cudaFuncSetAttribute(reinterpret_cast<const void*>(f), a, v);
}
