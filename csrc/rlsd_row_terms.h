// The row terms of the C++ CPU backend (included by rlsd_cpu.cpp): the JSD sweep of the forward and the gradient
// sweep with the entropy bonus and the distillation divergence (docs/math.md sections 2b / 2c).
#pragma once

#include <vector>

#include "rlsd_rows.h"

namespace rlsd_cpu {

// The second sweep of JSD over one row, with both log-sum-exps known: returns (D, KL(p_S || M)) for
// M = beta p_T + (1 - beta) p_S. Scalar logs: JSD is the one mode that needs log M per element.
// A float64 log-sum-exp as two float32 parts: x - lse is computed as (x - hi) - lo, exact where x ~ hi.
struct SplitLse {
  float hi, lo;
  explicit SplitLse(double lse) : hi(static_cast<float>(lse)), lo(static_cast<float>(lse - static_cast<float>(lse))) {}
};

inline void jsd_row(const View3& s, const View3& t, int64_t r, float inv_temp, float m_s, float log_d_s, double lse_t,
                    float beta, float* bs, float* bt, float* d_out, float* aux_out) {
  const char* srow = s.base + s.row_offset(r);
  const char* trow = t.base + t.row_offset(r);
  const SplitLse st(lse_t);
  const vf vms = vsplat(m_s), vlds = vsplat(log_d_s), vhi = vsplat(st.hi), vlo = vsplat(st.lo), vzero{};
  vf va{}, vb{};  // sum p_T (log p_T - log M), sum p_S (log p_S - log M)
  for (int64_t start = 0; start < s.V; start += kChunk) {
    const int64_t n = std::min(kChunk, s.V - start);
    load_chunk<false>(srow + start * s.sv * s.esize, s.dt, s.sv, n, inv_temp, bs);
    load_chunk<false>(trow + start * t.sv * t.esize, t.dt, t.sv, n, inv_temp, bt);
    for (int64_t i = 0; i < n; i += kLanes) {  // padding lanes: p = 0 on both sides, they add nothing
      const vf ls = (vload(bs + i) - vms) - vlds, lt = (vload(bt + i) - vhi) - vlo;
      const vf ps = exp_neg(ls), pt = exp_neg(lt);
      const vf lm = log_pos(pt * beta + ps * (1.0f - beta));
      va += pt > 0.0f ? pt * (lt - lm) : vzero;
      vb += ps > 0.0f ? ps * (ls - lm) : vzero;
    }
  }
  const float a = hsum(va), b = hsum(vb);
  *d_out = beta * a + (1.0f - beta) * b;
  *aux_out = b;
}

// A row kept resident (in L2 at V = 32000, float32) by the statistics sweep, which also stores every
// u = exp(x - m_c), m_c the running max after chunk c: a later sweep over the row gets p = u * exp(m_c - m) / d with
// one multiply instead of an exp. Used by JSD's second sweep (below) and by the fused rows (rlsd_fused_rows.h).
struct ResidentRow {
  float *xs, *xt, *us, *ut;  // [V padded to kLanes] each: scaled logits and the stored exps
  float *cms, *cmt;          // [chunks]: each chunk's running max
  std::vector<float> store;

  explicit ResidentRow(int64_t V) {
    const int64_t vp = (V + kLanes - 1) / kLanes * kLanes;
    const int64_t chunks = (V + kChunk - 1) / kChunk;
    store.resize(static_cast<size_t>(4 * vp + 2 * chunks + kLanes));
    float* base = store.data();
    base += (kLanes - (reinterpret_cast<uintptr_t>(base) / sizeof(float)) % kLanes) % kLanes;  // 64-byte aligned
    xs = base;
    xt = xs + vp;
    us = xt + vp;
    ut = us + vp;
    cms = ut + vp;
    cmt = cms + chunks;
  }
};

// One row's statistics sweep, shared by `forward_rows` (rlsd_cpu.cpp) and `fused_rows` (rlsd_fused_rows.h): each chunk
// of the student (and teacher, t non-null) row converted and scaled into a buffer (its place in the ResidentRow `w`,
// or the reused chunk buffers cbs / cbt without one), the online statistics, a divergence's cross sums (relative to
// the other row's running max after the chunk), the target logits picked from the buffers (a label never addresses
// memory), and in `w` the exps u = exp(x - m_c) of the rows kStoreS / kStoreT and each chunk's running maxima.
// chunk_max (or null) receives the student's running max after each chunk (`forward`'s row_stats).
struct RowSweep {
  Stats ss, ts;
  Cross cross;  // forward KL: weighted by the teacher; reverse KL: by the student
  float tgt_s = 0.0f, tgt_t = 0.0f;
};

template <bool kEntStat, int kDiv, bool kStoreS, bool kStoreT>
inline RowSweep sweep_row(const View3& s, const View3* t, int64_t r, int64_t r_end, int64_t label, float inv_temp,
                          ResidentRow* w, float* cbs, float* cbt, float* chunk_max) {
  RowSweep o;
  const int64_t V = s.V;
  const char* srow = s.base + s.row_offset(r);
  const char* trow = t ? t->base + t->row_offset(r) : nullptr;
  for (int64_t start = 0; start < V; start += kChunk) {
    const int64_t n = std::min(kChunk, V - start);
    const bool has_tgt = label >= start && label < start + n;
    float* bs = w ? w->xs + start : cbs;
    float* bt = w ? w->xt + start : cbt;
    const float ms = load_chunk(srow + start * s.sv * s.esize, s.dt, s.sv, n, inv_temp, bs);
    if (has_tgt) o.tgt_s = bs[label - start];
    float mt = kNegInf;
    if (t) {  // the teacher chunk first: the reverse KL's cross sum (weighted by the student) needs it
      mt = load_chunk(trow + start * t->sv * t->esize, t->dt, t->sv, n, inv_temp, bt);
      if (has_tgt) o.tgt_t = bt[label - start];
    }
    const float s_old = finite_shift(o.ss.m), t_old = finite_shift(o.ts.m);
    const float s_new = finite_shift(nan_max(o.ss.m, ms)), t_new = finite_shift(nan_max(o.ts.m, mt));
    accumulate<kEntStat || kDiv == kReverseKL, kDiv == kReverseKL, kStoreS>(
        o.ss, bs, n, ms, s.next_chunk(r, start, r_end), s.esize, &o.cross, bt, t_old, t_new,
        kStoreS ? w->us + start : nullptr);
    if (t) {
      accumulate<kDiv == kForwardKL, kDiv == kForwardKL, kStoreT>(
          o.ts, bt, n, mt, t->next_chunk(r, start, r_end), t->esize, &o.cross, bs, s_old, s_new,
          kStoreT ? w->ut + start : nullptr);
    }
    if (w) {
      w->cms[start / kChunk] = o.ss.m;
      w->cmt[start / kChunk] = o.ts.m;
    }
    if (chunk_max) chunk_max[start / kChunk] = o.ss.m;
  }
  return o;
}

// The JSD sweep over a ResidentRow: its only transcendental is log M (the re-reading sweep above costs two exps
// more and reads both rows again). Rows with finite maxima only.
// keep (optional, [V padded]): receives log p_S - log M per element, for a gradient sweep after this one.
inline void jsd_resident(const ResidentRow& w, int64_t V, float m_s, float d_s, float log_d_s, float m_t, float d_t,
                         float log_d_t, float beta, float* d_out, float* aux_out, float* keep = nullptr) {
  const vf vms = vsplat(m_s), vlds = vsplat(log_d_s), vmt = vsplat(m_t), vldt = vsplat(log_d_t), vzero{};
  vf va{}, vb{};  // sum p_T (log p_T - log M), sum p_S (log p_S - log M)
  for (int64_t start = 0, c = 0; start < V; start += kChunk, ++c) {
    const int64_t padded = (std::min(kChunk, V - start) + kLanes - 1) / kLanes * kLanes;
    // chunks before the first finite logit hold u = 0 (and a running max of -inf: scale 0, not exp(nan))
    const vf as = vsplat(w.cms[c] == kNegInf ? 0.0f : std::exp(w.cms[c] - m_s) / d_s);
    const vf at = vsplat(w.cmt[c] == kNegInf ? 0.0f : std::exp(w.cmt[c] - m_t) / d_t);
    const float *xs = w.xs + start, *xt = w.xt + start, *us = w.us + start, *ut = w.ut + start;
    for (int64_t i = 0; i < padded; i += kLanes) {  // padding lanes: u = 0 on both sides, they add nothing
      const vf ps = vload(us + i) * as, pt = vload(ut + i) * at;
      const vf ls = (vload(xs + i) - vms) - vlds, lt = (vload(xt + i) - vmt) - vldt;
      const vf lm = log_pos(pt * beta + ps * (1.0f - beta));
      const vf h = ls - lm;
      if (keep) vstore(keep + start + i, h);
      va += pt > 0.0f ? pt * (lt - lm) : vzero;
      vb += ps > 0.0f ? ps * h : vzero;
    }
  }
  const float a = hsum(va), b = hsum(vb);
  *d_out = beta * a + (1.0f - beta) * b;
  *aux_out = b;
}

// ------------------------------------------------------------------------------------ row-term backward
// The gradient of the whole loss with the section 2c row terms, in one sweep per row (docs/math.md 2b/2c):
//   out = [coef (onehot - p) - e p (log p + H) + f dD/dz] / T
// with dD/dz = p - p_T (forward KL), p (log p - log p_T - D) (reverse KL), (1 - beta) p (log p - log M - K) (JSD,
// K = KL(p || M)). coef, e, f are per row (d loss / d logp_S, d loss / d H, d loss / d D); the target element's
// onehot term keeps the cancellation-free form of `backward`.
struct RowTermsArgs {
  const float *coef, *e, *f;
  const double* lse;  // float64 (the terms interface); split, or recomputed exactly at |lse| > kPreciseLse
  const float* ent;
  const double* lse_t;
  const float *div, *aux;
  const int64_t* labels;
  float inv_temp, beta;
};

// One row's scalars for the gradient sweep (from RowTermsArgs, or from the fused kernel's own statistics).
struct RowTerms {
  float coef, e, f;  // already divided by the temperature
  double lse, lse_t;
  float H, div, aux;
  int64_t label;
};

// The row terms' gradient at one element from its student (p, lp = log p) and teacher (pt, lt = log pt) values:
// the target element's share, which the sweeps leave out of their vector loops.
template <bool kEnt, int kDiv>
inline float term_grad(float p, float lp, float pt, float lt, const RowTerms& a, float beta) {
  float g = 0.0f;
  if (kEnt && p > 0.0f) g -= a.e * p * (lp + a.H);
  if (kDiv == kForwardKL) g += a.f * (p - pt);
  if (kDiv == kReverseKL && p > 0.0f) g += a.f * p * (lp - lt - a.div);
  if (kDiv == kJSD && p > 0.0f) g += a.f * (1.0f - beta) * p * (lp - std::log(beta * pt + (1.0f - beta) * p) - a.aux);
  return g;
}

// Row r's gradient into o (re-reading the student row, and the teacher row for a divergence); rows [.., r_end) are
// this thread's (for prefetching); buf / bt: kChunk-float scratch.
template <bool kEnt, int kDiv>
void backward_terms_row(const View3& s, const View3* t, View3& o, const RowTerms& a, float inv_temp, float beta,
                        int64_t r, int64_t r_end, float* buf, float* bt) {
  const int64_t V = s.V;
  const char* srow = s.base + s.row_offset(r);
  char* orow = o.mbase + o.row_offset(r);
  const float coef = a.coef, e = kEnt ? a.e : 0.0f, f = kDiv != kNoDiv ? a.f : 0.0f;
  const float row_lse = static_cast<float>(a.lse);
  if ((coef == 0.0f && e == 0.0f && f == 0.0f) || row_lse == kNegInf) {
    zero_row(orow, o.dt, o.sv, V);
    return;
  }
  const float H = kEnt ? a.H : 0.0f;
  const int64_t label = a.label;
  const bool read_teacher = kDiv != kNoDiv && f != 0.0f;
  const char* trow = read_teacher ? t->base + t->row_offset(r) : nullptr;
  float shift = row_lse, log_d = 0.0f;
  if (std::fabs(row_lse) > kPreciseLse) exact_split(s, r, r_end, inv_temp, buf, &shift, &log_d);
  float others = 0.0f, p_tgt = 0.0f, extra_tgt = 0.0f;
  const bool direct = !kEnt && kDiv == kNoDiv && straight_chunks(s, o, inv_temp);  // the policy gradient alone
  for (int64_t start = 0; start < V; start += kChunk) {
    const int64_t cn = std::min(kChunk, V - start);
    if (straight_chunk(direct, start, cn, label)) {
      others += grad_chunk_f32(reinterpret_cast<const float*>(srow) + start, reinterpret_cast<float*>(orow) + start,
                               cn, shift, log_d, 1.0f, -coef, s.next_chunk(r, start, r_end));
      continue;
    }
    load_chunk<false>(srow + start * s.sv * s.esize, s.dt, s.sv, cn, inv_temp, buf);
    if (read_teacher) load_chunk<false>(trow + start * t->sv * t->esize, t->dt, t->sv, cn, inv_temp, bt);
    if (label >= start && label < start + cn) {  // the target element is finished after the row
      const float lp = (buf[label - start] - shift) - log_d;
      p_tgt = std::exp(lp);
      float lt = 0.0f;
      if (read_teacher) {
        const SplitLse st(a.lse_t);
        lt = (bt[label - start] - st.hi) - st.lo;
      }
      extra_tgt = term_grad<kEnt, kDiv>(p_tgt, lp, std::exp(lt), lt, a, beta);
      buf[label - start] = kNegInf;
    }
    float sum_p = 0.0f;
    {  // 16 lanes; padding lanes hold -inf (p = 0) and are never stored
      const int64_t padded = (cn + kLanes - 1) / kLanes * kLanes;
      const vf vshift = vsplat(shift), vlog_d = vsplat(log_d), vH = vsplat(H), vzero{};
      const SplitLse st(kDiv != kNoDiv && read_teacher ? a.lse_t : 0.0);
      const vf vhi = vsplat(st.hi), vlo = vsplat(st.lo);
      const float dv = kDiv == kReverseKL && read_teacher ? a.div : 0.0f;
      const float kl_sm = kDiv == kJSD && read_teacher ? a.aux : 0.0f;
      const float f_jsd = f * (1.0f - beta);
      vf vsum{};
      const char* pf = s.next_chunk(r, start, r_end);
      const char* tpf = read_teacher ? t->next_chunk(r, start, r_end) : nullptr;
      for (int64_t i = 0; i < padded; i += kLanes) {
        if (pf) __builtin_prefetch(pf + i * s.esize);
        if (tpf) __builtin_prefetch(tpf + i * t->esize);
        const vf lp = (vload(buf + i) - vshift) - vlog_d;
        const vf p = exp_neg(lp);
        vsum += p;
        vf g = p * -coef;
        if (kEnt) g -= p * (vmax(lp, vsplat(kExpLo)) + vH) * e;  // p = 0 where lp < kExpLo (as in accumulate)
        vf lt{};
        if (kDiv != kNoDiv && read_teacher) lt = (vload(bt + i) - vhi) - vlo;
        if (kDiv == kForwardKL && read_teacher) g += (p - exp_neg(lt)) * f;
        if (kDiv == kReverseKL && read_teacher) g += p > 0.0f ? p * ((lp - lt) - dv) * f : vzero;
        if (kDiv == kJSD && read_teacher) {
          const vf lm = log_pos(exp_neg(lt) * beta + p * (1.0f - beta));
          g += p > 0.0f ? p * ((lp - lm) - kl_sm) * f_jsd : vzero;
        }
        vstore(buf + i, g);
      }
      sum_p = hsum(vsum);
    }
    others += sum_p;
    store_chunk(orow + start * o.sv * o.esize, o.dt, o.sv, cn, buf);
  }
  if (label >= 0 && label < V) {
    const float g_tgt = coef * (others / (others + p_tgt)) + extra_tgt;
    store_chunk(orow + label * o.sv * o.esize, o.dt, 1, 1, &g_tgt);
  }
}

template <bool kEnt, int kDiv>
void backward_terms_rows(const View3& s, const View3* t, View3& o, const RowTermsArgs& a, int64_t n) {
  at::parallel_for(0, n, grain_rows(s.V), [&](int64_t r0, int64_t r1) {
    alignas(64) float buf[kChunk];
    alignas(64) float bt[kChunk];
    for (int64_t r = r0; r < r1; ++r) {
      RowTerms rt{a.coef[r] * a.inv_temp, kEnt ? a.e[r] * a.inv_temp : 0.0f,
                  kDiv != kNoDiv ? a.f[r] * a.inv_temp : 0.0f, a.lse[r], kDiv != kNoDiv ? a.lse_t[r] : 0.0,
                  kEnt ? a.ent[r] : 0.0f, kDiv != kNoDiv ? a.div[r] : 0.0f, kDiv != kNoDiv ? a.aux[r] : 0.0f,
                  a.labels[r]};
      backward_terms_row<kEnt, kDiv>(s, t, o, rt, a.inv_temp, a.beta, r, r1, buf, bt);
    }
  });
}

}  // namespace rlsd_cpu
