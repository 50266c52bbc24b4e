// C++ CPU backend of the fused RLSD log-prob pass (docs/math.md sections 3-4).
//
// forward:  one pass over each row's vocabulary, reading the student and (optionally) the teacher chunk by chunk
//           with an online (running max, running sum) log-sum-exp for each, picking up the target logits and,
//           when asked, the student entropy (one more running sum). Outputs per row: logp_s, logp_t, lse_s, H.
// backward: one pass over each row writing grad = coef * (onehot - exp(x / T - lse)) / T, formed in float32 and
//           cast once on store; the output may alias the student logits (in-place backward).
//
// Rows are split over threads with at::parallel_for. Each row is walked in chunks of kChunk elements that are
// converted to float32 (and scaled by 1/T) into a small per-thread buffer, so the arithmetic loops run on
// contiguous float32 data whatever the input dtype and strides; the next chunk is software-prefetched while the
// current one is processed. The conversion loops are auto-vectorised (`#pragma omp simd`); the exp/sum loops use
// explicit 16-lane vectors (GCC/Clang vector extensions) and a branch-free polynomial exp. No -ffast-math, so -inf
// and nan keep IEEE semantics. Inputs may be float32, bfloat16, float16 or float64 (float64 is computed in float32),
// student and teacher dtypes may differ, and any strides are accepted (fast path for unit vocabulary stride).
// Accuracy details: log-probs are (x_y - max) - log(sum), entropy is accumulated relative to the running max, and
// the backward's target term 1 - p_y is sum_{v != y} p_v / sum_v p_v (no cancellation near p_y = 1).
// All offsets are int64.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/csrc/utils/pybind.h>

#include <pybind11/stl.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "rlsd_chunks.h"

namespace {

using namespace rlsd_cpu;

// ------------------------------------------------------------------------------------ online statistics
// Running log-sum-exp state relative to the running max m: d = sum exp(x - m), e = sum exp(x - m) * (x - m).
// Keeping e relative to m (instead of sum p * x) avoids the cancellation lse - sum(p x)/sum(p) when |x| is large:
// the entropy is H = log(d) - e / d.
struct Stats {
  float m = kNegInf;
  float d = 0.0f;
  float e = 0.0f;
};

// x: a chunk buffer of n elements padded with -inf to a multiple of kLanes.
template <bool kEntropy>
// pf: the next chunk to be loaded (or nullptr), prefetched one cache line per iteration (pf_step = its element size):
// the arithmetic here would otherwise leave the memory system idle between the loads of two chunks.
inline void accumulate(Stats& st, const float* __restrict x, int64_t n, float chunk_max, const char* pf,
                       int64_t pf_step) {
  const float m_new = nan_max(st.m, chunk_max);  // nan stays nan: every later exp and sum of the row is nan
  if (m_new == kNegInf) return;  // only -inf so far: nothing to add (and no -inf - -inf = nan)
  vf vs{}, ves{};
  const vf vm = vsplat(m_new);
  for (int64_t i = 0; i < n; i += kLanes) {
    if (pf) __builtin_prefetch(pf + i * pf_step);
    const vf y = vload(x + i) - vm;
    const vf p = exp_neg(y);
    vs += p;
    if (kEntropy) ves += p > 0.0f ? p * y : vf{};  // -inf entries contribute 0, not 0 * -inf
  }
  const float s = hsum(vs);
  const float es = kEntropy ? hsum(ves) : 0.0f;
  if (st.m == kNegInf) {
    st.d = s;
    st.e = es;
  } else {
    const float shift = st.m - m_new;  // <= 0
    const float a = std::exp(shift);
    st.e = a * (st.e + shift * st.d) + es;
    st.d = a * st.d + s;
  }
  st.m = m_new;
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

int64_t grain_rows(int64_t V) { return std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(V, 1)); }

template <bool kEntropy>
void forward_rows(const View3& s, const View3* t, const int64_t* labels, float inv_temp, int64_t ignore_index,
                  float* logp_s, float* logp_t, float* lse_s, float* ent, int64_t n_rows) {
  const int64_t V = s.V;
  at::parallel_for(0, n_rows, grain_rows(V), [&](int64_t r0, int64_t r1) {
    alignas(64) float bs[kChunk];
    alignas(64) float bt[kChunk];
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t label = labels[r];
      const char* srow = s.base + s.row_offset(r);
      const char* trow = t ? t->base + t->row_offset(r) : nullptr;
      Stats ss, ts;
      float tgt_s = 0.0f, tgt_t = 0.0f;
      for (int64_t start = 0; start < V; start += kChunk) {
        const int64_t n = std::min(kChunk, V - start);
        // the target logit is picked from the chunk buffer: a label is never used to address memory
        const bool has_tgt = label >= start && label < start + n;
        const float ms = load_chunk(srow + start * s.sv * s.esize, s.dt, s.sv, n, inv_temp, bs);
        if (has_tgt) tgt_s = bs[label - start];
        accumulate<kEntropy>(ss, bs, n, ms, s.next_chunk(r, start, r1), s.esize);
        if (t) {
          const float mt = load_chunk(trow + start * t->sv * t->esize, t->dt, t->sv, n, inv_temp, bt);
          if (has_tgt) tgt_t = bt[label - start];
          accumulate<false>(ts, bt, n, mt, t->next_chunk(r, start, r1), t->esize);
        }
      }
      const bool ignored = label == ignore_index;
      const float log_d = std::log(ss.d);
      lse_s[r] = ss.m + log_d;
      // (tgt - m) - log(d), not tgt - lse: with logits ~1e4 the float32 lse has an ulp of 1e-3, but tgt - m is
      // exact and log(d) is small, so the log-prob keeps full float32 precision
      logp_s[r] = ignored ? 0.0f : (tgt_s - ss.m) - log_d;
      if (kEntropy) ent[r] = log_d - ss.e / ss.d;
      if (t) logp_t[r] = ignored ? 0.0f : (tgt_t - ts.m) - std::log(ts.d);
    }
  });
}

void check_vec(const at::Tensor& x, at::ScalarType dtype, int64_t n, const char* name) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == dtype && x.is_contiguous() && x.numel() == n,
              "rlsd_cpu: ", name, " must be a contiguous CPU ", dtype, " vector of ", n, " elements");
}

void forward(const at::Tensor& student, const std::optional<at::Tensor>& teacher, const at::Tensor& labels,
             double temperature, int64_t ignore_index, at::Tensor& logp_s, const std::optional<at::Tensor>& logp_t,
             at::Tensor& lse_s, const std::optional<at::Tensor>& entropy) {
  const View3 s(student);
  const int64_t n = student.size(0) * student.size(1);
  check_vec(labels, at::kLong, n, "labels");
  check_vec(logp_s, at::kFloat, n, "logp_s");
  check_vec(lse_s, at::kFloat, n, "lse_s");
  std::optional<View3> t;
  float* lt = nullptr;
  if (teacher.has_value()) {
    // the teacher may be split into [B', T', V] differently from the student (as_rows3d merges each tensor's
    // leading dims by its own strides): each view maps row r through its own T, only N and V must agree
    TORCH_CHECK(teacher->dim() == 3 && teacher->size(0) * teacher->size(1) == n && teacher->size(2) == student.size(2),
                "rlsd_cpu: teacher must have as many rows and the same vocabulary as student");
    TORCH_CHECK(logp_t.has_value(), "rlsd_cpu: logp_t output missing");
    check_vec(*logp_t, at::kFloat, n, "logp_t");
    t.emplace(*teacher);
    lt = logp_t->data_ptr<float>();
  }
  float* ent = nullptr;
  if (entropy.has_value()) {
    check_vec(*entropy, at::kFloat, n, "entropy");
    ent = entropy->data_ptr<float>();
  }
  if (n == 0) return;
  const float inv_temp = static_cast<float>(1.0 / temperature);
  const View3* tp = t ? &*t : nullptr;
  if (ent) {
    forward_rows<true>(s, tp, labels.data_ptr<int64_t>(), inv_temp, ignore_index, logp_s.data_ptr<float>(), lt,
                       lse_s.data_ptr<float>(), ent, n);
  } else {
    forward_rows<false>(s, tp, labels.data_ptr<int64_t>(), inv_temp, ignore_index, logp_s.data_ptr<float>(), lt,
                        lse_s.data_ptr<float>(), nullptr, n);
  }
}

// A fresh gradient buffer is faulted in page by page on its first write; with 4 KiB pages that costs more than
// the whole backward (~1 ms per 8 MiB). Advising transparent huge pages for its interior (as PyTorch's own
// THP_MEM_ALLOC_ENABLE does for its allocations) makes the first touch 512x fewer faults. Advice only: it changes
// no contents and is ignored where THP is unavailable.
void advise_huge_pages(const at::Tensor& out) {
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

void backward(const at::Tensor& grad_logp, const at::Tensor& student, const at::Tensor& labels,
              const at::Tensor& lse, double temperature, at::Tensor& out, bool use_thp) {
  const View3 s(student);
  View3 o(out);
  TORCH_CHECK(out.size(0) * out.size(1) == student.size(0) * student.size(1) && out.size(2) == student.size(2),
              "rlsd_cpu: out must have as many rows and the same vocabulary as student");
  TORCH_CHECK(out.scalar_type() == student.scalar_type(), "rlsd_cpu: out must have the dtype of student");
  const int64_t n = student.size(0) * student.size(1);
  check_vec(grad_logp, at::kFloat, n, "grad_logp");
  check_vec(labels, at::kLong, n, "labels");
  check_vec(lse, at::kFloat, n, "lse");
  if (n == 0) return;
  if (use_thp && out.data_ptr() != student.data_ptr()) advise_huge_pages(out);
  const float inv_temp = static_cast<float>(1.0 / temperature);
  const float* g = grad_logp.data_ptr<float>();
  const float* l = lse.data_ptr<float>();
  const int64_t* lab = labels.data_ptr<int64_t>();
  const int64_t V = s.V;
  at::parallel_for(0, n, grain_rows(V), [&](int64_t r0, int64_t r1) {
    alignas(64) float buf[kChunk];
    for (int64_t r = r0; r < r1; ++r) {
      const char* srow = s.base + s.row_offset(r);
      char* orow = o.mbase + o.row_offset(r);
      const float coef = g[r] * inv_temp;
      const float row_lse = l[r];
      // zero coefficient (ignored / masked rows) or a row of only -inf logits (lse = -inf): zero gradient
      if (coef == 0.0f || row_lse == kNegInf) {
        zero_row(orow, o.dt, o.sv, V);
        continue;
      }
      const int64_t label = lab[r];
      const float neg_coef = -coef;
      // p = exp((x - shift) - log_d) with shift + log_d = lse. The saved float32 lse is rounded to its ulp
      // (1e-3 at |lse| ~ 1e4), which would become a relative error of p; for rows with |lse| > kPreciseLse
      // the row's max and sum are recomputed in one extra pass so that the split (max, log sum) is exact.
      float shift = row_lse, log_d = 0.0f;
      if (std::fabs(row_lse) > kPreciseLse) {
        Stats st;
        for (int64_t start = 0; start < V; start += kChunk) {
          const int64_t cn = std::min(kChunk, V - start);
          const float cm = load_chunk(srow + start * s.sv * s.esize, s.dt, s.sv, cn, inv_temp, buf);
          accumulate<false>(st, buf, cn, cm, s.next_chunk(r, start, r1), s.esize);
        }
        shift = st.m;
        log_d = std::log(st.d);
      }
      // The target term 1 - p[y] is formed in float32 before the cast (bf16 cancellation near p = 1), and not as
      // 1 - p[y] at all: as (sum of p over v != y) / (sum of p over all v). The numerator has no cancellation
      // when p[y] ~ 1, and the ratio cancels the rounding of the saved lse (the sum is exp(lse_true - lse)).
      // The target element is written with a placeholder in its chunk and overwritten once the row is done.
      float others = 0.0f, p_tgt = 0.0f;
      for (int64_t start = 0; start < V; start += kChunk) {
        const int64_t cn = std::min(kChunk, V - start);
        // the whole chunk is read into buf before any of it is written: safe when out aliases student
        load_chunk(srow + start * s.sv * s.esize, s.dt, s.sv, cn, inv_temp, buf);
        const int64_t padded = (cn + kLanes - 1) / kLanes * kLanes;
        if (label >= start && label < start + cn) {  // take the target out of the chunk: p = 0 there for now
          p_tgt = exp_neg(vsplat((buf[label - start] - shift) - log_d))[0];
          buf[label - start] = kNegInf;
        }
        const vf vshift = vsplat(shift), vlog_d = vsplat(log_d);
        vf vo{};
        const char* pf = s.next_chunk(r, start, r1);
        for (int64_t i = 0; i < padded; i += kLanes) {
          if (pf) __builtin_prefetch(pf + i * s.esize);
          const vf p = exp_neg((vload(buf + i) - vshift) - vlog_d);
          vo += p;
          vstore(buf + i, p * neg_coef);
        }
        others += hsum(vo);
        store_chunk(orow + start * o.sv * o.esize, o.dt, o.sv, cn, buf);
      }
      if (label >= 0 && label < V) {
        const float g_tgt = coef * (others / (others + p_tgt));
        store_chunk(orow + label * o.sv * o.esize, o.dt, 1, 1, &g_tgt);
      }
    }
  });
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "rlsd_kernels C++ CPU backend: fused log-prob forward/backward over [B, T, V] strided views";
  m.def("forward", &forward, "fused log-prob forward (outputs preallocated, float32 [B*T])", py::arg("student"),
        py::arg("teacher"), py::arg("labels"), py::arg("temperature"), py::arg("ignore_index"), py::arg("logp_s"),
        py::arg("logp_t"), py::arg("lse_s"), py::arg("entropy"), py::call_guard<py::gil_scoped_release>());
  m.def("backward", &backward, "fused log-prob backward into out (may alias student)", py::arg("grad_logp"),
        py::arg("student"), py::arg("labels"), py::arg("lse"), py::arg("temperature"), py::arg("out"),
        py::arg("use_thp") = true, py::call_guard<py::gil_scoped_release>());
}
