// C++ CPU backend of the fused RLSD log-prob pass (docs/math.md sections 3-4).
//
// forward:  one pass over each row's vocabulary, reading the student and (optionally) the teacher chunk by chunk
//           with an online (running max, running sum) log-sum-exp for each, picking up the target logits and,
//           when asked, the student entropy (one more running sum). Outputs per row: logp_s, logp_t, lse_s, H.
// backward: one pass over each row writing grad = coef * (onehot - exp(x / T - lse)) / T, formed in float32 and
//           cast once on store; the output may alias the student logits (in-place backward).
// With the section 2c row terms (docs/math.md), `forward` also gives the teacher's lse and a divergence D_t in the
// same read of both rows (JSD: one more sweep per row, over the row kept resident with its exps), and
// `backward_terms` writes the gradient with the entropy bonus and the divergence in one sweep (rlsd_row_terms.h).
// fused:    what the loss op runs when a gradient is wanted (rlsd_fused_rows.h): `forward`'s outputs and the whole
//           gradient in one visit of each row, the row kept in cache with its exps and its gradient factor computed
//           per token in C++ (rlsd_token_coef.h); `fused_inplace` is the plain loss's in-place backward on the same
//           arithmetic. `forward` + `backward` / `backward_terms` remain the two-pass path (scoring op, GSPO, fused
//           linear chunks, in-place terms).
// rlsd_rows.h: the per-row statistics and strided views; rlsd_chunks.h: SIMD helpers and the chunk loads / stores.
//
// Rows are split over threads with at::parallel_for. Each row is walked in chunks of kChunk elements that are
// converted to float32 (and scaled by 1/T) into a small per-thread buffer, so the arithmetic loops run on
// contiguous float32 data whatever the input dtype and strides (the gradient sweeps at temperature 1 take float32
// rows of unit stride straight to the output instead: grad_chunk_f32, the same values without the two copies); the
// next chunk is software-prefetched while the current one is processed. The conversion loops are auto-vectorised
// (`#pragma omp simd`); the exp/sum loops use explicit 16-lane vectors (GCC/Clang vector extensions) and a
// branch-free polynomial exp. No -ffast-math, so -inf and nan keep IEEE semantics. Inputs may be float32, bfloat16, float16 or float64 (float64 is computed in float32),
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

#include "rlsd_chunks.h"
#include "rlsd_fused_rows.h"
#include "rlsd_row_terms.h"
#include "rlsd_rows.h"

namespace {

using namespace rlsd_cpu;

template <bool kEntropy, int kDiv>
void forward_rows(const View3& s, const View3* t, const int64_t* labels, float inv_temp, int64_t ignore_index,
                  float* logp_s, float* logp_t, float* lse_s, float* ent, int64_t n_rows, float beta, double* lse_t,
                  float* div, float* aux, float* row_stats) {
  const int64_t V = s.V;
  at::parallel_for(0, n_rows, grain_rows(V), [&](int64_t r0, int64_t r1) {
    alignas(64) float cbs[kChunk];
    alignas(64) float cbt[kChunk];
    // JSD: the whole row stays resident (and its exps stored) for the second sweep; otherwise chunk buffers
    std::optional<ResidentRow> jr;
    if (kDiv == kJSD) jr.emplace(V);
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t label = labels[r];
      const RowSweep sw = sweep_row<kEntropy, kDiv, kDiv == kJSD, kDiv == kJSD>(
          s, t, r, r1, label, inv_temp, kDiv == kJSD ? &*jr : nullptr, cbs, cbt,
          row_stats ? row_stats + r * row_stats_width(V) + 2 : nullptr);
      const Stats &ss = sw.ss, &ts = sw.ts;
      const Cross& cross = sw.cross;
      const float tgt_s = sw.tgt_s, tgt_t = sw.tgt_t;
      const bool ignored = label == ignore_index;
      const float log_d = std::log(ss.d);
      lse_s[r] = ss.m + log_d;
      if (row_stats) {  // the student's (max, sum), for the fused rows' in-place backward (chunk maxima: above)
        row_stats[r * row_stats_width(V)] = ss.m;
        row_stats[r * row_stats_width(V) + 1] = ss.d;
      }
      // (tgt - m) - log(d), not tgt - lse: with logits ~1e4 the float32 lse has an ulp of 1e-3, but tgt - m is
      // exact and log(d) is small, so the log-prob keeps full float32 precision
      logp_s[r] = ignored ? 0.0f : (tgt_s - ss.m) - log_d;
      if (kEntropy) ent[r] = log_d - ss.e / ss.d;
      if (t) logp_t[r] = ignored ? 0.0f : (tgt_t - ts.m) - std::log(ts.d);
      if (kDiv != kNoDiv) {
        const float log_dt = std::log(ts.d);
        // float64: at |logits| ~ 1e4 a float32 lse is rounded by ~5e-4, a relative error of every p_T
        lse_t[r] = static_cast<double>(ts.m) + std::log(static_cast<double>(ts.d));
        // KL(p_w || p_o) = (e_w - c) / d_w - log d_w + log d_o: every value relative to its row's max
        if (kDiv == kForwardKL) div[r] = (ts.e - cross.c) / ts.d - log_dt + log_d;
        if (kDiv == kReverseKL) div[r] = (ss.e - cross.c) / ss.d - log_d + log_dt;
        if (kDiv == kJSD) {
          if (std::isfinite(ss.m) && std::isfinite(ts.m)) {
            jsd_resident(*jr, V, ss.m, ss.d, log_d, ts.m, ts.d, log_dt, beta, div + r, aux + r);
          } else {  // -inf / nan / +inf rows: the re-reading sweep, whose edge cases the tests pin down
            jsd_row(s, *t, r, inv_temp, ss.m, log_d, lse_t[r], beta, cbs, cbt, div + r, aux + r);
          }
        }
      }
    }
  });
}

void forward(const at::Tensor& student, const std::optional<at::Tensor>& teacher, const at::Tensor& labels,
             double temperature, int64_t ignore_index, at::Tensor& logp_s, const std::optional<at::Tensor>& logp_t,
             at::Tensor& lse_s, const std::optional<at::Tensor>& entropy, int64_t div_mode, double beta,
             const std::optional<at::Tensor>& lse_t, const std::optional<at::Tensor>& div,
             const std::optional<at::Tensor>& aux, const std::optional<at::Tensor>& row_stats) {
  const View3 s(student);
  const int64_t n = student.size(0) * student.size(1);
  check_vec(labels, at::kLong, n, "labels");
  check_vec(logp_s, at::kFloat, n, "logp_s");
  check_vec(lse_s, at::kFloat, n, "lse_s");
  float* stats = nullptr;
  if (row_stats.has_value()) {
    check_vec(*row_stats, at::kFloat, n * row_stats_width(student.size(2)), "row_stats");
    stats = row_stats->data_ptr<float>();
  }
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
  double* lt_out = nullptr;
  float *div_out = nullptr, *aux_out = nullptr;
  TORCH_CHECK(div_mode >= kNoDiv && div_mode <= kJSD, "rlsd_cpu: unknown div_mode ", div_mode);
  if (div_mode != kNoDiv) {
    TORCH_CHECK(t && lse_t.has_value() && div.has_value() && aux.has_value(),
                "rlsd_cpu: a divergence needs the teacher and the lse_t, div, aux outputs");
    check_vec(*lse_t, at::kDouble, n, "lse_t");
    check_vec(*div, at::kFloat, n, "div");
    check_vec(*aux, at::kFloat, n, "aux");
    lt_out = lse_t->data_ptr<double>();
    div_out = div->data_ptr<float>();
    aux_out = aux->data_ptr<float>();
  }
  if (n == 0) return;
  const float inv_temp = static_cast<float>(1.0 / temperature);
  const View3* tp = t ? &*t : nullptr;
  const int64_t* lab = labels.data_ptr<int64_t>();
  float* ls = logp_s.data_ptr<float>();
  float* lse = lse_s.data_ptr<float>();
  const float b = static_cast<float>(beta);
  with_terms(ent != nullptr, div_mode, [&](auto e, auto d) {
    forward_rows<decltype(e)::value, decltype(d)::value>(s, tp, lab, inv_temp, ignore_index, ls, lt, lse, ent, n, b,
                                                         lt_out, div_out, aux_out, stats);
  });
}

void backward(const at::Tensor& grad_logp, const at::Tensor& student, const at::Tensor& labels,
              const at::Tensor& lse, double temperature, at::Tensor& out, bool use_thp) {
  const View3 s(student);
  View3 o(out);
  check_out(student, out);
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
  const bool direct = straight_chunks(s, o, inv_temp);  // whole chunks then go through grad_chunk_f32
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
      // p = exp((x - shift) - log_d) with shift + log_d = lse; exact (max, log sum) at |lse| > kPreciseLse
      float shift = row_lse, log_d = 0.0f;
      if (std::fabs(row_lse) > kPreciseLse) exact_split(s, r, r1, inv_temp, buf, &shift, &log_d);
      // The target term 1 - p[y] is formed in float32 before the cast (bf16 cancellation near p = 1), and not as
      // 1 - p[y] at all: as (sum of p over v != y) / (sum of p over all v). The numerator has no cancellation
      // when p[y] ~ 1, and the ratio cancels the rounding of the saved lse (the sum is exp(lse_true - lse)).
      // The target element is written with a placeholder in its chunk and overwritten once the row is done.
      float others = 0.0f, p_tgt = 0.0f;
      for (int64_t start = 0; start < V; start += kChunk) {
        const int64_t cn = std::min(kChunk, V - start);
        if (straight_chunk(direct, start, cn, label)) {
          others += grad_chunk_f32(reinterpret_cast<const float*>(srow) + start,
                                   reinterpret_cast<float*>(orow) + start, cn, shift, log_d, 1.0f, neg_coef,
                                   s.next_chunk(r, start, r1));
          continue;
        }
        // the whole chunk is read into buf before any of it is written: safe when out aliases student
        load_chunk<false>(srow + start * s.sv * s.esize, s.dt, s.sv, cn, inv_temp, buf);
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


void backward_terms(const at::Tensor& grad_logp, const std::optional<at::Tensor>& ent_coef,
                    const std::optional<at::Tensor>& div_coef, const at::Tensor& student,
                    const std::optional<at::Tensor>& teacher, const at::Tensor& labels, const at::Tensor& lse,
                    const std::optional<at::Tensor>& entropy, const std::optional<at::Tensor>& lse_t,
                    const std::optional<at::Tensor>& div, const std::optional<at::Tensor>& aux, double temperature,
                    int64_t div_mode, double beta, at::Tensor& out) {
  const View3 s(student);
  View3 o(out);
  const int64_t n = student.size(0) * student.size(1);
  check_out(student, out);
  check_vec(grad_logp, at::kFloat, n, "grad_logp");
  check_vec(labels, at::kLong, n, "labels");
  check_vec(lse, at::kDouble, n, "lse");
  RowTermsArgs a{grad_logp.data_ptr<float>(), nullptr, nullptr, lse.data_ptr<double>(), nullptr, nullptr, nullptr,
                 nullptr, labels.data_ptr<int64_t>(), static_cast<float>(1.0 / temperature),
                 static_cast<float>(beta)};
  const bool ent_on = ent_coef.has_value();
  if (ent_on) {
    TORCH_CHECK(entropy.has_value(), "rlsd_cpu: the entropy term needs the entropy");
    check_vec(*ent_coef, at::kFloat, n, "ent_coef");
    check_vec(*entropy, at::kFloat, n, "entropy");
    a.e = ent_coef->data_ptr<float>();
    a.ent = entropy->data_ptr<float>();
  }
  std::optional<View3> t;
  TORCH_CHECK(div_mode >= kNoDiv && div_mode <= kJSD, "rlsd_cpu: unknown div_mode ", div_mode);
  if (div_mode != kNoDiv) {
    TORCH_CHECK(teacher.has_value() && div_coef.has_value() && lse_t.has_value() && div.has_value() &&
                aux.has_value(), "rlsd_cpu: a divergence needs the teacher, div_coef, lse_t, div and aux");
    check_vec(*div_coef, at::kFloat, n, "div_coef");
    check_vec(*lse_t, at::kDouble, n, "lse_t");
    check_vec(*div, at::kFloat, n, "div");
    check_vec(*aux, at::kFloat, n, "aux");
    t.emplace(*teacher);
    a.f = div_coef->data_ptr<float>();
    a.lse_t = lse_t->data_ptr<double>();
    a.div = div->data_ptr<float>();
    a.aux = aux->data_ptr<float>();
  }
  if (n == 0) return;
  if (out.data_ptr() != student.data_ptr()) advise_huge_pages(out);
  const View3* tp = t ? &*t : nullptr;
  with_terms(ent_on, div_mode, [&](auto e, auto d) {
    backward_terms_rows<decltype(e)::value, decltype(d)::value>(s, tp, o, a, n);
  });
}


}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "rlsd_kernels C++ CPU backend: fused log-prob forward/backward over [B, T, V] strided views";
  m.def("forward", &forward, "fused log-prob forward (outputs preallocated, float32 [B*T])", py::arg("student"),
        py::arg("teacher"), py::arg("labels"), py::arg("temperature"), py::arg("ignore_index"), py::arg("logp_s"),
        py::arg("logp_t"), py::arg("lse_s"), py::arg("entropy"), py::arg("div_mode") = 0, py::arg("beta") = 0.5,
        py::arg("lse_t") = py::none(), py::arg("div") = py::none(), py::arg("aux") = py::none(),
        py::arg("row_stats") = py::none(),
        py::call_guard<py::gil_scoped_release>());
  m.def("backward_terms", &backward_terms, "gradient with the entropy / divergence row terms into out",
        py::arg("grad_logp"), py::arg("ent_coef"), py::arg("div_coef"), py::arg("student"), py::arg("teacher"),
        py::arg("labels"), py::arg("lse"), py::arg("entropy"), py::arg("lse_t"), py::arg("div"), py::arg("aux"),
        py::arg("temperature"), py::arg("div_mode"), py::arg("beta"), py::arg("out"),
        py::call_guard<py::gil_scoped_release>());
  m.def("fused", &rlsd_cpu::fused, "forward outputs and the loss's gradient into out, one visit per row",
        py::arg("student"), py::arg("teacher"), py::arg("labels"), py::arg("temperature"), py::arg("ignore_index"),
        py::arg("want_entropy"), py::arg("div_mode"), py::arg("beta"), py::arg("adv"), py::arg("old"),
        py::arg("teacher_lp"), py::arg("ref"), py::arg("agg"), py::arg("w_is"), py::arg("lam"), py::arg("eps_w"),
        py::arg("clip_low"), py::arg("clip_high"), py::arg("clip_dual"), py::arg("cispo"), py::arg("kl_coef"),
        py::arg("kl_type"), py::arg("entropy_coef"), py::arg("distill_coef"), py::arg("distill_clip"),
        py::arg("logp_s"), py::arg("logp_t"), py::arg("lse_s"), py::arg("entropy"), py::arg("lse_t"), py::arg("div"),
        py::arg("aux"), py::arg("out"), py::call_guard<py::gil_scoped_release>());
  m.def("fused_inplace", &rlsd_cpu::fused_inplace, "the plain loss's gradient into student on the fused rows' arithmetic",
        py::arg("student"), py::arg("labels"), py::arg("logp_s"), py::arg("row_stats"), py::arg("temperature"),
        py::arg("adv"), py::arg("old"), py::arg("teacher_lp"), py::arg("agg"), py::arg("lam"), py::arg("eps_w"),
        py::arg("clip_low"), py::arg("clip_high"), py::arg("clip_dual"), py::arg("cispo"),
        py::call_guard<py::gil_scoped_release>());
  m.def("backward", &backward, "fused log-prob backward into out (may alias student)", py::arg("grad_logp"),
        py::arg("student"), py::arg("labels"), py::arg("lse"), py::arg("temperature"), py::arg("out"),
        py::arg("use_thp") = true, py::call_guard<py::gil_scoped_release>());
}
