// Building blocks of the fused CPU passes: a row-major GEMM on BLAS, an exp that the
// compiler vectorizes, and per-ISA clones of the elementwise loops.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

// The elementwise loops are compiled once per ISA and picked at load time (GCC/Clang
// function multiversioning), so one wheel runs AVX-512 code where it exists and plain
// SSE2 elsewhere without -march flags.
#if defined(__x86_64__) && defined(__linux__) && (defined(__GNUC__) || defined(__clang__))
#define LARA_CLONES __attribute__((target_clones("default", "avx2", "avx512f")))
#else
#define LARA_CLONES
#endif

#if defined(__GNUC__) || defined(__clang__)
#define LARA_INLINE inline __attribute__((always_inline))
#else
#define LARA_INLINE inline
#endif

namespace lara {
namespace cpu {

template <typename T>
constexpr T kNegInf = -std::numeric_limits<T>::infinity();

// exp(x) for x <= ~88 (float) / ~709 (double); 0 below the underflow threshold and for
// -inf. Branch-free (selects only), so loops calling it vectorize. Range reduction
// x = n ln2 + r, |r| <= ln2 / 2, then a polynomial (float: degree 7 Taylor-like minimax
// as in Cephes expf, ~1 ulp) or a Pade form (double: Cephes exp, ~1 ulp), then 2^n from
// the exponent bits. libm's exp is not used because it does not vectorize here.
LARA_INLINE float vexp(float x) {
  const float lo = -87.0f, hi = 88.0f;
  const float xc = x < lo ? lo : (x > hi ? hi : x);
  const float magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const float n = (xc * 1.44269504088896341f + magic) - magic;
  float r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return x < lo ? 0.0f : p * scale;
}

LARA_INLINE double vexp(double x) {
  const double lo = -708.0, hi = 709.0;
  const double xc = x < lo ? lo : (x > hi ? hi : x);
  const double magic = 6755399441055744.0;  // 1.5 * 2^52
  const double n = (xc * 1.4426950408889634074 + magic) - magic;
  double r = xc - n * 6.93145751953125e-1;
  r = r - n * 1.42860682030941723212e-6;
  const double rr = r * r;
  double px = 1.26177193074810590878e-4;
  px = px * rr + 3.02994407707441961300e-2;
  px = px * rr + 9.99999999999999999910e-1;
  px = px * r;
  double qx = 3.00198505138664455042e-6;
  qx = qx * rr + 2.52448340349684104192e-3;
  qx = qx * rr + 2.27265548208155028766e-1;
  qx = qx * rr + 2.00000000000000000009e0;
  const double e = 1.0 + 2.0 * (px / (qx - px));
  const int64_t bits = (static_cast<int64_t>(n) + 1023) << 52;
  double scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return x < lo ? 0.0 : e * scale;
}

// Row-major C (m x n) = alpha op(A) op(B) + beta C, op(A) m x k, op(B) k x n.
// Calls the Fortran BLAS that torch links (MKL on x86 wheels) when its symbols are
// there, on one BLAS thread per call (MKL is told so per call, so that its blocking and
// summation order do not follow torch's thread count). Otherwise a plain loop.
void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
          const float* b, int64_t ldb, float beta, float* c, int64_t ldc);
void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, double alpha, const double* a,
          int64_t lda, const double* b, int64_t ldb, double beta, double* c, int64_t ldc);
bool have_blas();

}  // namespace cpu
}  // namespace lara
