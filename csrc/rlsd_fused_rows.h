// The fused rows of the C++ CPU backend (included by rlsd_cpu.cpp): the loss's forward outputs and its whole
// gradient in one visit of each row. The statistics sweep reads the student (and teacher) row from memory into a
// ResidentRow (converted, with every exp stored); the row's gradient factors follow from its log-probs
// (rlsd_token_coef.h); the gradient sweep then runs over the resident row with one multiply per element where the
// two-pass path (`forward`, then `backward` / `backward_terms`) reads the row again and recomputes its exps.
// Per element that is two exps instead of three (plain RLSD) or four (forward KL), and no second read.
//
// Rows whose maxima are not finite (-inf rows, nan, +inf) and rows without gradient take the two-pass row code
// (`backward_terms_row`), whose edge cases the tests pin down.
#pragma once

#include <ATen/core/Tensor.h>

#include <limits>
#include <optional>

#include "rlsd_row_terms.h"
#include "rlsd_token_coef.h"

namespace rlsd_cpu {

// Floats per row of `forward`'s row_stats: the student's max and sum, then its running max after each chunk.
inline int64_t row_stats_width(int64_t V) { return 2 + (V + kChunk - 1) / kChunk; }

struct FusedIn {  // per-token inputs, float64 [N] (nullptr: absent)
  const int64_t* labels;
  const double *adv, *old, *teacher_lp, *ref, *agg, *w_is;
};

struct FusedOut {  // per-token outputs (nullptr: not produced), as `forward` writes them
  float *logp_s, *logp_t, *lse_s, *ent;
  double* lse_t;
  float *div, *aux;
};

// kEntStat: the entropy statistics (output or term); kEntGrad: the entropy term in the gradient; kTeacher: teacher
// logits rows (RLSD weights from them; required by a divergence).
template <bool kEntStat, bool kEntGrad, int kDiv, bool kTeacher>
void fused_rows(const View3& s, const View3* t, View3& o, const FusedIn& in, const FusedOut& out,
                const TokenHyper& hp, float inv_temp, int64_t ignore_index, float beta, int64_t n_rows) {
  static_assert(kEntStat || !kEntGrad, "the entropy term needs its statistics");
  static_assert(kTeacher || kDiv == kNoDiv, "a divergence needs the teacher rows");
  constexpr bool kStoreT = kDiv == kForwardKL || kDiv == kJSD;  // sweeps that need p_T
  const int64_t V = s.V;
  at::parallel_for(0, n_rows, grain_rows(V), [&](int64_t r0, int64_t r1) {
    ResidentRow w(V);
    alignas(64) float ob[kChunk];
    alignas(64) float bt[kChunk];
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t label = in.labels[r];
      // statistics sweep (the row kept resident with its exps), as `forward_rows`
      const RowSweep sw = sweep_row<kEntStat, kDiv, true, kStoreT>(s, kTeacher ? t : nullptr, r, r1, label, inv_temp,
                                                                   &w, nullptr, nullptr, nullptr);
      const Stats &ss = sw.ss, &ts = sw.ts;
      const Cross& cross = sw.cross;
      const float tgt_s = sw.tgt_s, tgt_t = sw.tgt_t;
      // the row's outputs, exactly as `forward_rows` writes them
      const bool ignored = label == ignore_index;
      const float log_d = std::log(ss.d);
      out.lse_s[r] = ss.m + log_d;
      const float logp_s = ignored ? 0.0f : (tgt_s - ss.m) - log_d;
      out.logp_s[r] = logp_s;
      float H = 0.0f;
      if (kEntStat) H = log_d - ss.e / ss.d;
      if (out.ent) out.ent[r] = H;
      float log_dt = 0.0f, logp_t = 0.0f;
      if (kTeacher) {
        log_dt = std::log(ts.d);
        logp_t = ignored ? 0.0f : (tgt_t - ts.m) - log_dt;
        out.logp_t[r] = logp_t;
      }
      double lse_t = 0.0;
      float div = 0.0f, aux = 0.0f;
      if (kDiv != kNoDiv) {
        lse_t = static_cast<double>(ts.m) + std::log(static_cast<double>(ts.d));
        if (kDiv == kForwardKL) div = (ts.e - cross.c) / ts.d - log_dt + log_d;
        if (kDiv == kReverseKL) div = (ss.e - cross.c) / ss.d - log_d + log_dt;
        if (kDiv == kJSD) {
          if (std::isfinite(ss.m) && std::isfinite(ts.m)) {
            // log p_S - log M into xt's slot (the JSD sweep below reads p_T from ut, never x_T): no second log
            jsd_resident(w, V, ss.m, ss.d, log_d, ts.m, ts.d, log_dt, beta, &div, &aux, w.xt);
          } else {
            jsd_row(s, *t, r, inv_temp, ss.m, log_d, lse_t, beta, ob, bt, &div, &aux);
          }
        }
        out.lse_t[r] = lse_t;
        out.div[r] = div;
        out.aux[r] = aux;
      }
      // the row's gradient factors
      TokenIn x{logp_s, kTeacher ? logp_t : (in.teacher_lp ? in.teacher_lp[r] : 0.0), kTeacher || in.teacher_lp,
                in.adv[r], in.old ? in.old[r] : static_cast<double>(logp_s), in.ref ? in.ref[r] : 0.0, in.agg[r],
                in.w_is ? in.w_is[r] : 1.0};
      const TokenCoef tc = token_coef(x, hp);
      double f = tc.f;
      if (kDiv != kNoDiv && std::isfinite(hp.distill_clip) && !(div <= hp.distill_clip)) f = 0.0;  // capped: no grad
      const RowTerms rt{static_cast<float>(tc.coef) * inv_temp, kEntGrad ? static_cast<float>(tc.e) * inv_temp : 0.0f,
                        kDiv != kNoDiv ? static_cast<float>(f) * inv_temp : 0.0f, static_cast<double>(out.lse_s[r]),
                        lse_t, H, div, aux, label};
      const bool finite = std::isfinite(ss.m) && (kDiv == kNoDiv || std::isfinite(ts.m));
      if (!finite || (rt.coef == 0.0f && rt.e == 0.0f && rt.f == 0.0f)) {
        backward_terms_row<kEntGrad, kDiv>(s, t, o, rt, inv_temp, beta, r, r1, ob, bt);
        continue;
      }
      // gradient sweep over the resident row: p = u * exp(m_c - m) / d, log p = (x - m) - log d
      char* orow = o.mbase + o.row_offset(r);
      const float m_s = ss.m, inv_d = 1.0f / ss.d;
      const float m_t = ts.m, inv_dt = kStoreT ? 1.0f / ts.d : 0.0f;
      auto scale_s = [&](int64_t c) { return w.cms[c] == kNegInf ? 0.0f : std::exp(w.cms[c] - m_s) * inv_d; };
      auto scale_t = [&](int64_t c) { return w.cmt[c] == kNegInf ? 0.0f : std::exp(w.cmt[c] - m_t) * inv_dt; };
      float p_tgt = 0.0f, extra_tgt = 0.0f;
      if (label >= 0 && label < V) {  // the target's share is formed apart and written after the row
        const int64_t c = label / kChunk;
        p_tgt = w.us[label] * scale_s(c);
        const float lp = (w.xs[label] - m_s) - log_d;
        const float lt = kTeacher ? (w.xt[label] - m_t) - log_dt : 0.0f;
        const float pt = kStoreT ? w.ut[label] * scale_t(c) : 0.0f;
        extra_tgt = term_grad<kEntGrad, kDiv>(p_tgt, lp, pt, lt, rt, beta);
        w.us[label] = 0.0f;  // p = 0 there in the sweep (every term below is then 0 or overwritten)
      }
      const vf vms = vsplat(m_s), vlds = vsplat(log_d), vH = vsplat(H), vzero{};
      const vf vmt = vsplat(m_t), vldt = vsplat(log_dt);
      const float coef = rt.coef, e = rt.e, fd = rt.f, f_jsd = rt.f * (1.0f - beta);
      float others = 0.0f;
      for (int64_t start = 0, c = 0; start < V; start += kChunk, ++c) {
        const int64_t cn = std::min(kChunk, V - start);
        const int64_t padded = (cn + kLanes - 1) / kLanes * kLanes;
        const vf as = vsplat(scale_s(c)), at = vsplat(kStoreT ? scale_t(c) : 0.0f);
        const float *us = w.us + start, *ut = w.ut + start, *xs = w.xs + start, *xt = w.xt + start;
        vf vsum{};
        for (int64_t i = 0; i < padded; i += kLanes) {  // padding lanes: u = 0, never stored
          const vf p = vload(us + i) * as;
          vsum += p;
          vf g = p * -coef;
          constexpr bool kLp = kEntGrad || kDiv == kReverseKL;
          vf lp{};
          if (kLp) lp = (vload(xs + i) - vms) - vlds;
          if (kEntGrad) g -= p * (vmax(lp, vsplat(kExpLo)) + vH) * e;  // -inf logits: p = 0, lp clamped finite
          if (kDiv == kForwardKL) g += (p - vload(ut + i) * at) * fd;
          if (kDiv == kReverseKL) {
            const vf lt = (vload(xt + i) - vmt) - vldt;
            g += p > 0.0f ? p * ((lp - lt) - div) * fd : vzero;
          }
          if (kDiv == kJSD) g += p > 0.0f ? p * (vload(xt + i) - aux) * f_jsd : vzero;  // xt: log p - log M
          vstore(ob + i, g);
        }
        others += hsum(vsum);
        store_chunk(orow + start * o.sv * o.esize, o.dt, o.sv, cn, ob);
      }
      if (label >= 0 && label < V) {
        const float g_tgt = coef * (others / (others + p_tgt)) + extra_tgt;
        store_chunk(orow + label * o.sv * o.esize, o.dt, 1, 1, &g_tgt);
      }
    }
  });
}

// Calls fn(kEntStat, kEntGrad, kDiv, kTeacher) as integral constants: every valid combination instantiated once.
template <typename Fn>
inline void with_fused(bool ent_stat, bool ent_grad, int div_mode, bool teacher, Fn&& fn) {
  using std::integral_constant;
  auto ent = [&](auto d, auto te) {
    if (ent_grad) fn(integral_constant<bool, true>{}, integral_constant<bool, true>{}, d, te);
    else if (ent_stat) fn(integral_constant<bool, true>{}, integral_constant<bool, false>{}, d, te);
    else fn(integral_constant<bool, false>{}, integral_constant<bool, false>{}, d, te);
  };
  switch (div_mode) {
    case kForwardKL: ent(integral_constant<int, kForwardKL>{}, integral_constant<bool, true>{}); break;
    case kReverseKL: ent(integral_constant<int, kReverseKL>{}, integral_constant<bool, true>{}); break;
    case kJSD: ent(integral_constant<int, kJSD>{}, integral_constant<bool, true>{}); break;
    default:
      if (teacher) ent(integral_constant<int, kNoDiv>{}, integral_constant<bool, true>{});
      else ent(integral_constant<int, kNoDiv>{}, integral_constant<bool, false>{});
  }
}

// The plain loss's in-place backward on the fused rows' arithmetic, so that its gradient is theirs bit for bit: one
// sweep over the saved logits (written in place: each chunk is read whole before it is written) with the forward's
// row_stats (max m, sum d, running max m_c after each chunk); p = u * exp(m_c - m) / d with u = exp(x - m_c) formed
// exactly as the statistics sweep formed it. The row's factor is token_coef on the forward's log-probs
// (in.teacher_lp: the teacher's, from its logits or given).
inline void fused_inplace_rows(View3& s, const FusedIn& in, const float* logp_s, const float* stats,
                               const TokenHyper& hp, float inv_temp, int64_t n_rows) {
  const int64_t V = s.V;
  const bool direct = straight_chunks(s, s, inv_temp);  // whole live chunks then go through grad_chunk_f32
  at::parallel_for(0, n_rows, grain_rows(V), [&](int64_t r0, int64_t r1) {
    alignas(64) float buf[kChunk];
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t label = in.labels[r];
      const float* st = stats + r * row_stats_width(V);
      const float m = st[0], d = st[1];
      const float log_d = std::log(d);
      TokenIn x{logp_s[r], in.teacher_lp ? in.teacher_lp[r] : 0.0, in.teacher_lp != nullptr, in.adv[r],
                in.old ? in.old[r] : static_cast<double>(logp_s[r]), in.ref ? in.ref[r] : 0.0, in.agg[r],
                in.w_is ? in.w_is[r] : 1.0};
      const RowTerms rt{static_cast<float>(token_coef(x, hp).coef) * inv_temp, 0.0f, 0.0f,
                        static_cast<double>(m + log_d), 0.0, 0.0f, 0.0f, 0.0f, label};
      if (!std::isfinite(m) || rt.coef == 0.0f) {  // as the fused rows: the two-pass row code
        backward_terms_row<false, kNoDiv>(s, nullptr, s, rt, inv_temp, 0.0f, r, r1, buf, buf);
        continue;
      }
      const char* srow = s.base + s.row_offset(r);
      char* orow = s.mbase + s.row_offset(r);
      const float inv_d = 1.0f / d, coef = rt.coef;
      float others = 0.0f, p_tgt = 0.0f;
      for (int64_t start = 0; start < V; start += kChunk) {
        const int64_t cn = std::min(kChunk, V - start);
        const int64_t padded = (cn + kLanes - 1) / kLanes * kLanes;
        const float mc = st[2 + start / kChunk];
        const bool live = mc != kNegInf;  // else u = 0 (the statistics sweep stores 0 while its max is -inf)
        const vf vmc = vsplat(mc), as = vsplat(live ? std::exp(mc - m) * inv_d : 0.0f);
        if (straight_chunk(direct && live, start, cn, label)) {
          others += grad_chunk_f32(reinterpret_cast<const float*>(srow) + start,
                                   reinterpret_cast<float*>(orow) + start, cn, mc, 0.0f, as[0], -coef,
                                   s.next_chunk(r, start, r1));
          continue;
        }
        load_chunk<false>(srow + start * s.sv * s.esize, s.dt, s.sv, cn, inv_temp, buf);
        if (label >= start && label < start + cn) {
          const int64_t i0 = (label - start) / kLanes * kLanes;
          const float u = live ? exp_neg(vload(buf + i0) - vmc)[(label - start) - i0] : 0.0f;
          p_tgt = u * as[0];
          buf[label - start] = kNegInf;  // u = 0 there in the sweep, as the fused rows zero it
        }
        vf vsum{};
        const char* pf = s.next_chunk(r, start, r1);  // as the other sweeps: the next chunk's loads start early
        for (int64_t i = 0; i < padded; i += kLanes) {
          if (pf) __builtin_prefetch(pf + i * s.esize);
          const vf p = (live ? exp_neg(vload(buf + i) - vmc) : vf{}) * as;
          vsum += p;
          vstore(buf + i, p * -coef);
        }
        others += hsum(vsum);
        store_chunk(orow + start * s.sv * s.esize, s.dt, s.sv, cn, buf);
      }
      if (label >= 0 && label < V) {
        const float g_tgt = coef * (others / (others + p_tgt));
        store_chunk(orow + label * s.sv * s.esize, s.dt, 1, 1, &g_tgt);
      }
    }
  });
}

// ------------------------------------------------------------------------------------ entry points (bound in
// rlsd_cpu.cpp)
inline const double* opt_vec(const std::optional<at::Tensor>& x, int64_t n, const char* name) {
  if (!x.has_value()) return nullptr;
  check_vec(*x, at::kDouble, n, name);
  return x->data_ptr<double>();
}

inline float* opt_out(const std::optional<at::Tensor>& x, int64_t n, const char* name) {
  if (!x.has_value()) return nullptr;
  check_vec(*x, at::kFloat, n, name);
  return x->data_ptr<float>();
}

// The fused rows (rlsd_fused_rows.h): `forward`'s outputs and the loss's whole gradient (into out, which may alias
// student: each row is read whole before its gradient is written) in one visit of each row. Per-token inputs are
// float64 vectors; see rlsd_token_coef.h.
inline void fused(const at::Tensor& student, const std::optional<at::Tensor>& teacher, const at::Tensor& labels,
           double temperature, int64_t ignore_index, bool want_entropy, int64_t div_mode, double beta,
           const at::Tensor& adv, const std::optional<at::Tensor>& old, const std::optional<at::Tensor>& teacher_lp,
           const std::optional<at::Tensor>& ref, const at::Tensor& agg, const std::optional<at::Tensor>& w_is,
           double lam, double eps_w, double clip_low, double clip_high, double clip_dual, bool cispo, double kl_coef,
           int64_t kl_type, double entropy_coef, double distill_coef, double distill_clip, at::Tensor& logp_s,
           const std::optional<at::Tensor>& logp_t, at::Tensor& lse_s, const std::optional<at::Tensor>& entropy,
           const std::optional<at::Tensor>& lse_t, const std::optional<at::Tensor>& div,
           const std::optional<at::Tensor>& aux, at::Tensor& out) {
  const View3 s(student);
  View3 o(out);
  const int64_t n = student.size(0) * student.size(1);
  check_out(student, out);
  check_vec(labels, at::kLong, n, "labels");
  check_vec(adv, at::kDouble, n, "adv");
  check_vec(agg, at::kDouble, n, "agg");
  FusedIn in{labels.data_ptr<int64_t>(), adv.data_ptr<double>(), opt_vec(old, n, "old"),
             opt_vec(teacher_lp, n, "teacher_lp"), opt_vec(ref, n, "ref"), agg.data_ptr<double>(),
             opt_vec(w_is, n, "w_is")};
  check_vec(logp_s, at::kFloat, n, "logp_s");
  check_vec(lse_s, at::kFloat, n, "lse_s");
  FusedOut fo{logp_s.data_ptr<float>(), opt_out(logp_t, n, "logp_t"), lse_s.data_ptr<float>(),
              opt_out(entropy, n, "entropy"), nullptr, opt_out(div, n, "div"), opt_out(aux, n, "aux")};
  std::optional<View3> t;
  if (teacher.has_value()) {
    TORCH_CHECK(teacher->dim() == 3 && teacher->size(0) * teacher->size(1) == n && teacher->size(2) == student.size(2),
                "rlsd_cpu: teacher must have as many rows and the same vocabulary as student");
    TORCH_CHECK(fo.logp_t, "rlsd_cpu: logp_t output missing");
    t.emplace(*teacher);
  }
  TORCH_CHECK(div_mode >= kNoDiv && div_mode <= kJSD, "rlsd_cpu: unknown div_mode ", div_mode);
  const bool ent_grad = entropy_coef > 0;
  TORCH_CHECK(!(want_entropy || ent_grad) || fo.ent, "rlsd_cpu: entropy output missing");
  if (div_mode != kNoDiv) {
    TORCH_CHECK(t && lse_t.has_value() && fo.div && fo.aux, "rlsd_cpu: a divergence needs the teacher and the "
                "lse_t, div, aux outputs");
    check_vec(*lse_t, at::kDouble, n, "lse_t");
    fo.lse_t = lse_t->data_ptr<double>();
  }
  TORCH_CHECK(kl_type >= kK1 && kl_type <= kK3, "rlsd_cpu: unknown kl_type ", kl_type);
  if (n == 0) return;
  if (out.data_ptr() != student.data_ptr()) advise_huge_pages(out);
  const TokenHyper hp{lam, eps_w, clip_low, clip_high, clip_dual, cispo, kl_coef, static_cast<int>(kl_type),
                      entropy_coef, distill_coef, distill_clip};
  const float inv_temp = static_cast<float>(1.0 / temperature);
  const View3* tp = t ? &*t : nullptr;
  with_fused(want_entropy || ent_grad, ent_grad, static_cast<int>(div_mode), tp != nullptr,
             [&](auto es, auto eg, auto d, auto te) {
               fused_rows<decltype(es)::value, decltype(eg)::value, decltype(d)::value, decltype(te)::value>(
                   s, tp, o, in, fo, hp, inv_temp, ignore_index, static_cast<float>(beta), n);
             });
}

// The plain loss's in-place backward on the fused rows' arithmetic (fused_inplace_rows): into student.
inline void fused_inplace(at::Tensor& student, const at::Tensor& labels, const at::Tensor& logp_s,
                   const at::Tensor& row_stats, double temperature, const at::Tensor& adv,
                   const std::optional<at::Tensor>& old, const std::optional<at::Tensor>& teacher_lp,
                   const at::Tensor& agg, double lam, double eps_w, double clip_low, double clip_high,
                   double clip_dual, bool cispo) {
  View3 s(student);
  const int64_t n = student.size(0) * student.size(1);
  check_vec(labels, at::kLong, n, "labels");
  check_vec(logp_s, at::kFloat, n, "logp_s");
  check_vec(row_stats, at::kFloat, n * row_stats_width(student.size(2)), "row_stats");
  check_vec(adv, at::kDouble, n, "adv");
  check_vec(agg, at::kDouble, n, "agg");
  const FusedIn in{labels.data_ptr<int64_t>(), adv.data_ptr<double>(), opt_vec(old, n, "old"),
                   opt_vec(teacher_lp, n, "teacher_lp"), nullptr, agg.data_ptr<double>(), nullptr};
  if (n == 0) return;
  const TokenHyper hp{lam, eps_w, clip_low, clip_high, clip_dual, cispo, 0.0, kK3, 0.0, 0.0,
                      std::numeric_limits<double>::infinity()};
  fused_inplace_rows(s, in, logp_s.data_ptr<float>(), row_stats.data_ptr<float>(), hp,
                     static_cast<float>(1.0 / temperature), n);
}

}  // namespace rlsd_cpu
