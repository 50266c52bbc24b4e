// The per-token gradient factors of the loss (docs/math.md sections 2, 2c, 3) for the C++ backend's fused rows
// (rlsd_fused_rows.h), which forms each row's gradient right after its statistics, while the row is in cache.
//
// This is rlsd_kernels/loss.py (`token_terms`) and loss_terms.py (`kl_penalty`, `loss_with_terms`) transcribed per
// token, in float64, branch for branch (ties split the gradient evenly as torch.maximum / minimum do; NaN passes a
// clamp's gradient as `_clamp` / `_inside` do). Everything that does not depend on the row's own log-prob comes in
// precomputed per token (aggregation weight, rollout IS weight, advantage): tests check the result against autograd
// through the Python algebra (tests/backends/test_cpp_fused_rows.py) and the whole loss against the reference.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

namespace rlsd_cpu {

enum KlType : int { kK1 = 1, kK2 = 2, kK3 = 3 };

// The call's hyper-parameters (Hyper and Terms of the Python side).
struct TokenHyper {
  double lam, eps_w, clip_low, clip_high, clip_dual;
  bool cispo;
  double kl_coef;
  int kl_type;
  double entropy_coef, distill_coef;
  double distill_clip;  // +inf: no clip
};

// One token's inputs: everything but logp_S comes from the caller.
struct TokenIn {
  double ls;        // logp_S of the target
  double lt;        // logp_T (RLSD weight), NaN-free or ignored when !has_lt (GRPO: g = 1)
  bool has_lt;
  double adv;       // advantage
  double old;       // old log-prob (= ls when on-policy)
  double ref;       // reference log-prob (KL term), unused when kl_coef = 0
  double agg;       // aggregation weight a_t (0 outside the mask: the row gets no gradient)
  double w_is;      // rollout importance weight on the policy term (1 when off)
};

struct TokenCoef {
  double coef;  // d loss / d logp_S
  double e;     // d loss / d H
  double f;     // d loss / d D (before the distillation clip, applied by the caller once D is known)
};

inline double clamp_nan(double x, double lo, double hi) { return x < lo ? lo : (x > hi ? hi : x); }
inline double inside(double x, double lo, double hi) { return (x < lo || x > hi) ? 0.0 : 1.0; }
inline double max_nan(double a, double b) {  // torch.maximum: nan propagates
  return (a != a || b != b) ? std::numeric_limits<double>::quiet_NaN() : (a > b ? a : b);
}

// d loss_t / d logp_S of section 2's PPO (DAPO asymmetric + dual clip) or CISPO term (loss.py `token_terms`).
inline double policy_coef(const TokenIn& x, const TokenHyper& h) {
  double g = 1.0;
  if (x.has_lt) {
    const double delta = x.lt - x.ls;
    const double sign = x.adv > 0 ? 1.0 : (x.adv < 0 ? -1.0 : (x.adv == 0 ? 0.0 : x.adv));  // torch.sign
    const double w = std::exp(sign == 0.0 ? 0.0 : sign * delta);
    g = (1.0 - h.lam) + h.lam * clamp_nan(w, 1.0 - h.eps_w, 1.0 + h.eps_w);
  }
  const double a_hat = x.adv * g;
  const double lr = x.ls - x.old;
  const double lo = std::log(1.0 - h.clip_low), hi = std::log(1.0 + h.clip_high);
  const double ratio = std::exp(clamp_nan(lr, -20.0, 20.0));
  const double ratio_c = std::exp(clamp_nan(lr, lo, hi));
  if (h.cispo) return -a_hat * ratio_c;
  const double d_ratio = ratio * inside(lr, -20.0, 20.0);
  const double d_ratio_c = ratio_c * inside(lr, lo, hi);
  const double l1 = -a_hat * ratio, l2 = -a_hat * ratio_c, l3 = -a_hat * h.clip_dual;
  const double l_hi = max_nan(l1, l2);
  const double c1 = -a_hat * d_ratio, c2 = -a_hat * d_ratio_c;
  const double c_hi = l1 > l2 ? c1 : (l2 > l1 ? c2 : 0.5 * (c1 + c2));
  const double c_dual = l_hi < l3 ? c_hi : (l_hi > l3 ? 0.0 : 0.5 * c_hi);
  return a_hat < 0 ? c_dual : c_hi;
}

// d kl_t / d logp_S of verl's estimators (loss_terms.py `kl_penalty`).
inline double kl_grad(double ls, double ref, int kl_type) {
  if (kl_type == kK1) return 1.0;
  if (kl_type == kK2) return ls - ref;
  const double r_raw = ref - ls;
  const double r = clamp_nan(r_raw, -20.0, 20.0);
  const double v_raw = std::exp(r) - r - 1.0;
  return -(std::exp(r) - 1.0) * inside(v_raw, -10.0, 10.0) * inside(r_raw, -20.0, 20.0);
}

// loss = sum_t a_t [w_is loss_t + kl_coef kl_t - entropy_coef H_t + distill_coef D_t] (loss_terms.py
// `loss_with_terms`): the three per-token factors of the gradient sweep.
inline TokenCoef token_coef(const TokenIn& x, const TokenHyper& h) {
  if (x.agg == 0.0) return {0.0, 0.0, 0.0};  // outside the mask: no term reaches this row (never 0 * inf)
  double c = x.w_is * policy_coef(x, h);
  if (h.kl_coef > 0) c += h.kl_coef * kl_grad(x.ls, x.ref, h.kl_type);
  return {x.agg * c, -h.entropy_coef * x.agg, h.distill_coef * x.agg};
}

}  // namespace rlsd_cpu
