// Chunk helpers of the C++ CPU backend (included by rlsd_cpu.cpp): 16-lane SIMD vectors and a branch-free exp,
// dtype conversions, and the loads / stores that move one chunk of a row between the tensor (any dtype, any
// vocabulary stride) and a contiguous float32 buffer. See rlsd_cpu.cpp for the design.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace rlsd_cpu {

constexpr int64_t kChunk = 2048;  // 8 KiB of float32 per buffer: a student and a teacher chunk stay in L1
// |lse| above which the backward recomputes the row's (max, sum) instead of trusting the rounded float32 lse:
// at 32 the ulp of lse is 3.8e-6, a relative error of p below 2e-6.
constexpr float kPreciseLse = 32.0f;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

inline float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

// Explicit SIMD with GCC/Clang vector extensions: 16 float lanes, lowered to one AVX-512, two AVX2 or four SSE
// registers depending on -march. (Auto-vectorisation of these loops proved fragile: GCC vectorised some inlined
// copies and left others scalar.) Chunk buffers are padded to a multiple of kLanes with -inf, whose exp is 0.
constexpr int64_t kLanes = 16;
typedef float vf __attribute__((vector_size(64)));
typedef int32_t vi __attribute__((vector_size(64)));

inline vf vload(const float* p) {  // p is 64-byte aligned (chunk buffers)
  return *reinterpret_cast<const vf*>(p);
}
inline void vstore(float* p, vf v) { *reinterpret_cast<vf*>(p) = v; }
inline vf vsplat(float x) { return vf{} + x; }
inline float hsum(vf v) {
  float s = 0.0f;
  for (int i = 0; i < kLanes; ++i) s += v[i];
  return s;
}

// Below this exp_neg returns 0 exactly, and above it never 0 (exp(-87.34) is the least normal float).
constexpr float kExpLo = -87.3365447504f;

// max(a, b) lane by lane; nan in a stays nan (a nan y or lp also makes its p nan).
inline vf vmax(vf a, vf b) {
#if defined(__AVX512F__)
  return (vf)_mm512_max_ps((__m512)b, (__m512)a);  // max_ps returns its 2nd operand when either is nan
#else
  return a != a ? a : (a > b ? a : b);
#endif
}

// exp(x) for x <= 0 (the only arguments used here: x - max and x - lse), on 16 lanes.
// Cephes expf polynomial after a two-constant ln2 range reduction: <= 2 ulp on [-87.3, 0]. Below -87.3 the true
// result is subnormal (< 1.2e-38) and 0 is returned, which also gives exp(-inf) = 0 exactly. nan propagates.
// With AVX-512 the rounding and the 2^n scaling are single instructions (roundscale, scalef): the same arithmetic,
// bit for bit, in a quarter fewer instructions.
inline vf exp_neg(vf x) {
  constexpr float kLo = kExpLo;
#if defined(__AVX512F__)
  const __m512 xv = (__m512)x;
  const __m512 xc = _mm512_max_ps(_mm512_set1_ps(kLo), xv);  // max_ps returns its 2nd operand for nan: kept
  const __m512 nn = _mm512_roundscale_ps(_mm512_mul_ps(xc, _mm512_set1_ps(1.44269504088896341f)),
                                         _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const vf n = (vf)nn;
  vf r = (vf)xc - n * 0.693359375f;
#else
  constexpr float kHi = 88.0f;
  const vf lo = vsplat(kLo);
  vf xc = x < lo ? lo : x;
  xc = xc > kHi ? vsplat(kHi) : xc;
  constexpr float kShift = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const vf t = xc * 1.44269504088896341f + kShift;
  const vf n = t - kShift;
  vf r = xc - n * 0.693359375f;
#endif
  r = r - n * -2.12194440e-4f;
  vf p = vsplat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
#if defined(__AVX512F__)
  const __m512 y = _mm512_scalef_ps((__m512)p, nn);
  return (vf)_mm512_maskz_mov_ps(_mm512_cmp_ps_mask(xv, _mm512_set1_ps(kLo), _CMP_NLT_UQ), y);  // x < kLo: 0
#else
  const vi ni = reinterpret_cast<const vi&>(t) - 0x4B400000;  // the integer n
  const vi e = (ni + 127) << 23;
  const vf y = p * reinterpret_cast<const vf&>(e);
  return x < lo ? vf{} : y;
#endif
}

// log(x) for x > 0 on 16 lanes (Cephes logf: frexp, then a degree-8 polynomial; <= 2 ulp on normal numbers).
// Arguments below FLT_MIN are treated as FLT_MIN (log = -87.3): the only caller weighs them by a probability that
// is as small. nan propagates. With AVX-512 the frexp is getmant / getexp and the selects are mask registers (the
// generic vector code spends more on them than on the polynomial); same polynomial, same results.
inline vf log_pos(vf x0) {
  constexpr float kMin = 1.17549435e-38f;
#if defined(__AVX512F__)
  const __m512 x = _mm512_max_ps(_mm512_set1_ps(kMin), (__m512)x0);  // nan kept (2nd operand)
  __m512 mm = _mm512_getmant_ps(x, _MM_MANT_NORM_p5_1, _MM_MANT_SIGN_src);  // [0.5, 1)
  __m512 ee = _mm512_add_ps(_mm512_getexp_ps(x), _mm512_set1_ps(1.0f));
  const __mmask16 small = _mm512_cmp_ps_mask(mm, _mm512_set1_ps(0.707106781186547524f), _CMP_LT_OQ);
  ee = _mm512_mask_sub_ps(ee, small, ee, _mm512_set1_ps(1.0f));
  mm = _mm512_mask_add_ps(mm, small, mm, mm);
  const vf m = (vf)mm - 1.0f;
  const vf ef = (vf)ee;
#else
  const vf x = x0 < kMin ? vsplat(kMin) : x0;
  const vi u = reinterpret_cast<const vi&>(x);
  vi e = ((u >> 23) & 0xff) - 126;
  const vi mu = (u & 0x807fffff) | 0x3f000000;
  vf m = reinterpret_cast<const vf&>(mu);  // [0.5, 1)
  const vi small = m < 0.707106781186547524f;  // -1 where true
  e = e + small;
  m = (small != 0) ? m + m - 1.0f : m - 1.0f;
  const vf ef = __builtin_convertvector(e, vf);
#endif
  const vf z = m * m;
  vf y = vsplat(7.0376836292e-2f);
  y = y * m - 1.1514610310e-1f;
  y = y * m + 1.1676998740e-1f;
  y = y * m - 1.2420140846e-1f;
  y = y * m + 1.4249322787e-1f;
  y = y * m - 1.6668057665e-1f;
  y = y * m + 2.0000714765e-1f;
  y = y * m - 2.4999993993e-1f;
  y = y * m + 3.3333331174e-1f;
  y = y * m * z;
  y = y + ef * -2.12194440e-4f;
  y = y - z * 0.5f;
  const vf r = m + y + ef * 0.693359375f;
#if defined(__AVX512F__)
  return r;  // nan in, nan out: getmant / getexp propagate it
#else
  return x0 != x0 ? x0 : r;  // nan in, nan out
#endif
}

// ------------------------------------------------------------------------------------ dtype conversions
enum class DT { F32, BF16, F16, F64 };

DT dt_of(const at::Tensor& x) {
  switch (x.scalar_type()) {
    case at::kFloat: return DT::F32;
    case at::kBFloat16: return DT::BF16;
    case at::kHalf: return DT::F16;
    case at::kDouble: return DT::F64;
    default: TORCH_CHECK(false, "rlsd_cpu: unsupported dtype ", x.scalar_type());
  }
}

inline int64_t elem_size(DT dt) {
  switch (dt) {
    case DT::F32: return 4;
    case DT::F64: return 8;
    default: return 2;
  }
}

template <typename T> inline float to_f(T v);
template <> inline float to_f<float>(float v) { return v; }
template <> inline float to_f<double>(double v) { return static_cast<float>(v); }
template <> inline float to_f<c10::BFloat16>(c10::BFloat16 v) { return bits_to_float(static_cast<uint32_t>(v.x) << 16); }
template <> inline float to_f<c10::Half>(c10::Half v) { return c10::detail::fp16_ieee_to_fp32_value(v.x); }

template <typename T> inline T from_f(float v);
template <> inline float from_f<float>(float v) { return v; }
template <> inline double from_f<double>(float v) { return v; }
template <> inline c10::BFloat16 from_f<c10::BFloat16>(float v) {
  // round to nearest even, nan stays nan (same as c10::BFloat16(float), written branch-free)
  const uint32_t u = float_to_bits(v);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return c10::BFloat16(static_cast<uint16_t>(v != v ? 0x7FC0u : rounded), c10::BFloat16::from_bits());
}
template <> inline c10::Half from_f<c10::Half>(float v) {
  return c10::Half(c10::detail::fp16_ieee_from_fp32_value(v), c10::Half::from_bits());
}

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

// max that propagates nan from either side (std::max(a, nan) is a, and SIMD max instructions drop nan too)
inline float nan_max(float a, float b) { return (a != a || b != b) ? kNaN : (a > b ? a : b); }

// Converts n elements (element stride sv) to float32 * scale into out; returns their max (-inf if all are, nan if
// any is nan: a nan logit must make the row's lse, log-probs and gradient nan, as IEEE arithmetic would).
// The max reduction itself ignores nan (vectorised compare-select), so nan is counted separately.
// kMax = false: the conversion alone (gradient sweeps, whose row statistics are known; returns 0).
template <typename T, bool kMax>
float load_t(const T* p, int64_t sv, int64_t n, float scale, float* __restrict out) {
  float m = kNegInf;
  int nan = 0;
  if (!kMax) {
    if (sv == 1) {
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) out[i] = to_f<T>(p[i]) * scale;
    } else {
      for (int64_t i = 0; i < n; ++i) out[i] = to_f<T>(p[i * sv]) * scale;
    }
    return 0.0f;
  }
  if (sv == 1) {
#pragma omp simd reduction(max : m) reduction(| : nan)
    for (int64_t i = 0; i < n; ++i) {
      const float v = to_f<T>(p[i]) * scale;
      out[i] = v;
      m = v > m ? v : m;
      nan |= v != v;
    }
  } else {
#pragma omp simd reduction(max : m) reduction(| : nan)
    for (int64_t i = 0; i < n; ++i) {
      const float v = to_f<T>(p[i * sv]) * scale;
      out[i] = v;
      m = v > m ? v : m;
      nan |= v != v;
    }
  }
  return nan ? kNaN : m;
}

// Fills out[0, n) with the chunk as float32 * scale and out[n, round_up(n, kLanes)) with -inf; returns the max
// (kMax) or 0.
template <bool kMax = true>
float load_chunk(const char* p, DT dt, int64_t sv, int64_t n, float scale, float* out) {
  float m;
  switch (dt) {
    case DT::F32: m = load_t<float, kMax>(reinterpret_cast<const float*>(p), sv, n, scale, out); break;
    case DT::BF16:
      m = load_t<c10::BFloat16, kMax>(reinterpret_cast<const c10::BFloat16*>(p), sv, n, scale, out);
      break;
    case DT::F16: m = load_t<c10::Half, kMax>(reinterpret_cast<const c10::Half*>(p), sv, n, scale, out); break;
    default: m = load_t<double, kMax>(reinterpret_cast<const double*>(p), sv, n, scale, out); break;
  }
  for (int64_t i = n; i % kLanes != 0; ++i) out[i] = kNegInf;
  return m;
}

template <typename T>
void store_t(T* p, int64_t sv, int64_t n, const float* __restrict g) {
  if (sv == 1) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) p[i] = from_f<T>(g[i]);
  } else {
    for (int64_t i = 0; i < n; ++i) p[i * sv] = from_f<T>(g[i]);
  }
}

void store_chunk(char* p, DT dt, int64_t sv, int64_t n, const float* g) {
  switch (dt) {
    case DT::F32: return store_t(reinterpret_cast<float*>(p), sv, n, g);
    case DT::BF16: return store_t(reinterpret_cast<c10::BFloat16*>(p), sv, n, g);
    case DT::F16: return store_t(reinterpret_cast<c10::Half*>(p), sv, n, g);
    default: return store_t(reinterpret_cast<double*>(p), sv, n, g);
  }
}

template <typename T>
void zero_t(T* p, int64_t sv, int64_t n) {
  if (sv == 1) {
    std::memset(static_cast<void*>(p), 0, static_cast<size_t>(n) * sizeof(T));
  } else {
    for (int64_t i = 0; i < n; ++i) p[i * sv] = from_f<T>(0.0f);
  }
}

void zero_row(char* p, DT dt, int64_t sv, int64_t n) {
  switch (dt) {
    case DT::F32: return zero_t(reinterpret_cast<float*>(p), sv, n);
    case DT::BF16: return zero_t(reinterpret_cast<c10::BFloat16*>(p), sv, n);
    case DT::F16: return zero_t(reinterpret_cast<c10::Half*>(p), sv, n);
    default: return zero_t(reinterpret_cast<double*>(p), sv, n);
  }
}

}  // namespace rlsd_cpu
