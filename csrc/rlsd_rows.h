// Row machinery of the C++ CPU backend (included by rlsd_cpu.cpp): the online (max, sum) statistics and the
// divergence cross sums of one row, the [B, T, V] strided view, and small checks. See rlsd_cpu.cpp for the design.
#pragma once

#include <ATen/Parallel.h>
#include <type_traits>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "rlsd_chunks.h"

namespace rlsd_cpu {

// ------------------------------------------------------------------------------------ online statistics
// Running log-sum-exp state relative to the running max m: d = sum exp(x - m), e = sum exp(x - m) * (x - m).
// Keeping e relative to m (instead of sum p * x) avoids the cancellation lse - sum(p x)/sum(p) when |x| is large:
// the entropy is H = log(d) - e / d.
struct Stats {
  float m = kNegInf;
  float d = 0.0f;
  float e = 0.0f;
};

// Cross sum of a divergence (docs/math.md sections 2b/2c), weighted by the row w of this Stats and relative to
// both rows' running maxima: c = sum exp(w - m_w) * (o - shift_o), shift_o the other row's running max (0 while
// that is -inf). With the entropy sums e it gives KL(p_w || p_o) = (e - c) / d - log d_w + log d_o without the
// cancellation of x - lse at |logits| ~ 1e4. -inf entries of w weigh 0 (never 0 * inf).
struct Cross {
  float c = 0.0f;
};

// The shift a row's values are taken relative to: its running max, 0 while that is -inf (no -inf - -inf = nan).
inline float finite_shift(float m) { return m == kNegInf ? 0.0f : m; }

// x: a chunk buffer of n elements padded with -inf to a multiple of kLanes.
// pf: the next chunk to be loaded (or nullptr), prefetched one cache line per iteration (pf_step = its element size):
// the arithmetic here would otherwise leave the memory system idle between the loads of two chunks.
// kCross: also the Cross sum against the chunk `o` of the other row, whose shift moves from o_old to o_new with
// this chunk (the part accumulated so far is re-based: c -= (o_new - o_old) * d).
// u (kStore): receives exp(x - m) for the chunk's padded length, m the running max after this chunk (u = 0 while m
// is -inf), so that a later sweep over the row gets p = u * exp(m - m_row) / d without another exp per element.
template <bool kEntropy, bool kCross = false, bool kStore = false>
inline void accumulate(Stats& st, const float* __restrict x, int64_t n, float chunk_max, const char* pf,
                       int64_t pf_step, Cross* cs = nullptr, const float* __restrict o = nullptr, float o_old = 0.0f,
                       float o_new = 0.0f, float* __restrict u = nullptr) {
  const float m_new = nan_max(st.m, chunk_max);  // nan stays nan: every later exp and sum of the row is nan
  if (m_new == kNegInf) {  // only -inf so far: nothing to add (and no -inf - -inf = nan)
    if (kStore) std::fill(u, u + (n + kLanes - 1) / kLanes * kLanes, 0.0f);
    return;
  }
  vf vs{}, ves{}, vc{};
  const vf vm = vsplat(m_new), vo = vsplat(o_new);
  for (int64_t i = 0; i < n; i += kLanes) {
    if (pf) __builtin_prefetch(pf + i * pf_step);
    const vf y = vload(x + i) - vm;
    const vf p = exp_neg(y);
    if (kStore) vstore(u + i, p);
    vs += p;
    // -inf entries contribute 0, not 0 * -inf: exp_neg is 0 exactly where y < kExpLo, and y >= kExpLo elsewhere,
    // so clamping y there changes no product (one max instead of a compare and a select)
    if (kEntropy) ves += p * vmax(y, vsplat(kExpLo));
    if (kCross) vc += p > 0.0f ? p * (vload(o + i) - vo) : vf{};
  }
  const float s = hsum(vs);
  const float es = kEntropy ? hsum(ves) : 0.0f;
  const float cs_add = kCross ? hsum(vc) : 0.0f;
  if (st.m == kNegInf) {
    st.d = s;
    st.e = es;
    if (kCross) cs->c = cs_add;
  } else {
    const float shift = st.m - m_new;  // <= 0
    const float a = std::exp(shift);
    st.e = a * (st.e + shift * st.d) + es;
    if (kCross) cs->c = a * (cs->c - (o_new - o_old) * st.d) + cs_add;
    st.d = a * st.d + s;
  }
  st.m = m_new;
}

// Divergence modes of the row terms (docs/math.md section 2b): the distillation term's D_t and its gradient.
enum DivMode : int { kNoDiv = 0, kForwardKL = 1, kReverseKL = 2, kJSD = 3 };

// Calls fn(std::integral_constant<bool, ent>, std::integral_constant<int, div_mode>): the runtime (entropy on,
// divergence mode) pair as the template arguments of a row kernel, every combination instantiated once.
template <typename Fn>
inline void with_terms(bool ent, int div_mode, Fn&& fn) {
  auto pick = [&](auto d) {
    if (ent) fn(std::integral_constant<bool, true>{}, d);
    else fn(std::integral_constant<bool, false>{}, d);
  };
  switch (div_mode) {
    case kForwardKL: pick(std::integral_constant<int, kForwardKL>{}); break;
    case kReverseKL: pick(std::integral_constant<int, kReverseKL>{}); break;
    case kJSD: pick(std::integral_constant<int, kJSD>{}); break;
    default: pick(std::integral_constant<int, kNoDiv>{}); break;
  }
}

struct View3 {
  const char* base;
  char* mbase;
  DT dt;
  int64_t esize, T, V, sb, st, sv;

  explicit View3(const at::Tensor& x) {
    TORCH_CHECK(x.dim() == 3, "rlsd_cpu: expected a [B, T, V] view, got ", x.dim(), " dims");
    TORCH_CHECK(x.device().is_cpu(), "rlsd_cpu: expected a CPU tensor");
    dt = dt_of(x);
    esize = elem_size(dt);
    mbase = static_cast<char*>(x.data_ptr());  // includes the storage offset
    base = mbase;
    T = x.size(1);
    V = x.size(2);
    sb = x.stride(0);
    st = x.stride(1);
    sv = x.stride(2);
  }
  int64_t row_offset(int64_t r) const {  // bytes, int64
    return ((r / T) * sb + (r % T) * st) * esize;
  }
  // The chunk after (row r, column start) within rows [.., r_end), for prefetching; nullptr if none or strided.
  const char* next_chunk(int64_t r, int64_t start, int64_t r_end) const {
    if (sv != 1) return nullptr;
    if (start + kChunk < V) return base + row_offset(r) + (start + kChunk) * esize;
    return r + 1 < r_end ? base + row_offset(r + 1) : nullptr;
  }
};

// A row's exact (max, log sum) from one more sweep over it, for gradient sweeps at |lse| > kPreciseLse, where the
// float32 lse is rounded to its ulp (1e-3 at |lse| ~ 1e4), which would become a relative error of every p.
// buf: kChunk-float scratch; rows [.., r_end) are the caller's (for prefetching).
inline void exact_split(const View3& s, int64_t r, int64_t r_end, float inv_temp, float* buf, float* shift,
                        float* log_d) {
  const char* srow = s.base + s.row_offset(r);
  Stats st;
  for (int64_t start = 0; start < s.V; start += kChunk) {
    const int64_t cn = std::min(kChunk, s.V - start);
    const float cm = load_chunk(srow + start * s.sv * s.esize, s.dt, s.sv, cn, inv_temp, buf);
    accumulate<false>(st, buf, cn, cm, s.next_chunk(r, start, r_end), s.esize);
  }
  *shift = st.m;
  *log_d = std::log(st.d);
}

// One chunk of a gradient sweep at temperature 1, straight from a float32 row x to a float32 output o (both of unit
// stride; o may be x itself: each vector is read before it is written), n a multiple of kLanes, the target not in
// the chunk: o = neg_coef * p with p = exp((x - shift) - log_d) * scale, bit for bit what the buffered sweeps
// (`backward`: scale 1; `fused_inplace_rows`: shift m_c, log_d 0) compute, without their two copies through the
// chunk buffer: on a 2-core CPU the sweep then runs at about a plain copy's time. (At another temperature the
// buffer's stored x / T would differ from a contracted x * (1 / T) - shift in the last bit.) pf: the next chunk,
// prefetched as `accumulate` does. Returns the chunk's sum of p.
inline float grad_chunk_f32(const float* x, float* o, int64_t n, float shift, float log_d, float scale,
                            float neg_coef, const char* pf) {
  const vf vshift = vsplat(shift), vlog_d = vsplat(log_d), vscale = vsplat(scale);
  vf vo{};
  for (int64_t i = 0; i < n; i += kLanes) {
    if (pf) __builtin_prefetch(pf + i * static_cast<int64_t>(sizeof(float)));
    vf v;
    std::memcpy(&v, x + i, sizeof v);  // (unaligned loads and stores: rows start anywhere)
    const vf p = exp_neg((v - vshift) - vlog_d) * vscale;
    vo += p;
    const vf out = p * neg_coef;
    std::memcpy(o + i, &out, sizeof out);
  }
  return hsum(vo);
}

// Whether a gradient sweep may take grad_chunk_f32 for its chunks: float32 rows of unit stride in and out, at
// temperature 1.
inline bool straight_chunks(const View3& s, const View3& o, float inv_temp) {
  return s.dt == DT::F32 && o.dt == DT::F32 && s.sv == 1 && o.sv == 1 && inv_temp == 1.0f;
}

// Whether the chunk [start, start + n) of such a sweep goes through grad_chunk_f32: whole vectors, and the target
// (whose term the sweeps form apart) elsewhere.
inline bool straight_chunk(bool straight, int64_t start, int64_t n, int64_t label) {
  return straight && n % kLanes == 0 && (label < start || label >= start + n);
}

// `out` (a gradient) has the rows, vocabulary and dtype of `student`.
inline void check_out(const at::Tensor& student, const at::Tensor& out) {
  TORCH_CHECK(out.dim() == 3 && out.size(0) * out.size(1) == student.size(0) * student.size(1) &&
              out.size(2) == student.size(2) && out.scalar_type() == student.scalar_type(),
              "rlsd_cpu: out must have the rows, vocabulary and dtype of student");
}

inline int64_t grain_rows(int64_t V) { return std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(V, 1)); }

inline void check_vec(const at::Tensor& x, at::ScalarType dtype, int64_t n, const char* name) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == dtype && x.is_contiguous() && x.numel() == n,
              "rlsd_cpu: ", name, " must be a contiguous CPU ", dtype, " vector of ", n, " elements");
}

// A fresh gradient buffer is faulted in page by page on its first write; with 4 KiB pages that costs more than
// the whole backward (~1 ms per 8 MiB). Advising transparent huge pages for its interior (as PyTorch's own
// THP_MEM_ALLOC_ENABLE does for its allocations) makes the first touch 512x fewer faults. Advice only: it changes
// no contents and is ignored where THP is unavailable.
inline void advise_huge_pages(const at::Tensor& out) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t{2} << 20;
  int64_t extent = 1;
  for (int64_t d = 0; d < out.dim(); ++d) {
    if (out.size(d) == 0) return;
    extent += (out.size(d) - 1) * out.stride(d);
  }
  const uintptr_t begin = reinterpret_cast<uintptr_t>(out.data_ptr());
  const uintptr_t end = begin + static_cast<uintptr_t>(extent) * out.element_size();
  const uintptr_t a = (begin + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t b = end & ~(kHuge - 1);
  if (b > a && b - a >= 2 * kHuge) madvise(reinterpret_cast<void*>(a), b - a, MADV_HUGEPAGE);
#else
  (void)out;
#endif
}

}  // namespace rlsd_cpu
