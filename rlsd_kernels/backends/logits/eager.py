"""Eager backend: the reference math over blocks of rows, so its scratch memory is O(rows_per_block * V)
rather than O(N * V). Used on CPU when the C++ extension cannot be built, and on devices Triton does not serve."""
from __future__ import annotations

import torch

from . import alloc_row_outputs

# 64 MiB of float32 scratch per block: large enough to amortise per-op overhead, small next to any real model.
_SCRATCH_ELEMS = 16 * 1024 * 1024


def _rows_per_block(V: int) -> int:
    return max(1, _SCRATCH_ELEMS // max(V, 1))


def _row_blocks(x3):
    B, T, V = x3.shape
    flat = x3.reshape(B * T, V) if x3.is_contiguous() else None
    step = _rows_per_block(V)
    for r0 in range(0, B * T, step):
        r1 = min(B * T, r0 + step)
        if flat is not None:
            yield r0, r1, flat[r0:r1]
        else:  # strided view: gather just this block of rows
            idx = torch.arange(r0, r1, device=x3.device)
            yield r0, r1, x3[idx // T, idx % T]


def _lse_target(block, labels, temperature, ignore_index):
    x = block.to(torch.float32) / temperature
    m = x.amax(dim=-1)
    m = torch.where(torch.isinf(m), 0.0, m)  # rows of only -inf (or +inf): shift by 0, never inf - inf
    log_d = torch.log(torch.exp(x - m[:, None]).sum(-1))
    ignored = labels == ignore_index
    idx = torch.where(ignored, 0, labels).clamp(0, x.shape[-1] - 1)
    tgt = x.gather(1, idx[:, None]).squeeze(1)
    # (x_y - m) - log d keeps float32 accuracy at large |logits| (see backends/logits/triton.py)
    return x, m, log_d, torch.where(ignored, 0.0, (tgt - m) - log_d)


def forward(student, teacher, labels, temperature, ignore_index, want_entropy):
    n = labels.numel()
    dev = student.device
    logp_s, logp_t, lse_s, ent = alloc_row_outputs(n, dev, teacher is not None, want_entropy)
    with torch.no_grad():
        for r0, r1, blk in _row_blocks(student):
            lab = labels[r0:r1]
            x, m, log_d, lp = _lse_target(blk, lab, temperature, ignore_index)
            logp_s[r0:r1] = lp
            lse_s[r0:r1] = m + log_d
            if want_entropy:
                # relative to the max, so |logits| ~ 1e4 do not cancel catastrophically
                xs = x - m[:, None]
                p = torch.exp(xs - log_d[:, None])
                ent[r0:r1] = log_d - torch.where(p > 0, p * xs, 0.0).sum(-1)
        if teacher is not None:
            for r0, r1, blk in _row_blocks(teacher):
                logp_t[r0:r1] = _lse_target(blk, labels[r0:r1], temperature, ignore_index)[3]
    return logp_s, logp_t, lse_s, ent


def backward(grad_logp, student, labels, lse, temperature, out):
    B, T, V = student.shape
    with torch.no_grad():
        for r0, r1, blk in _row_blocks(student):
            x = blk.to(torch.float32) / temperature
            lse_b = lse[r0:r1, None]
            coef = grad_logp[r0:r1, None] / temperature
            # Exactly zero for a row with a zero coefficient (ignored or masked: it may hold garbage, even nan) or
            # of only -inf logits (lse = -inf), as the other backends; any other row by IEEE arithmetic, so a nan
            # logit gives a nan gradient.
            zero = (coef == 0) | torch.isinf(lse_b)
            p = torch.where(zero, 0.0, torch.exp(x - lse_b))
            g = -p
            lab = labels[r0:r1]
            hit = (lab >= 0) & (lab < V)
            rows = torch.nonzero(hit).squeeze(1)
            # target term 1 - p[y] formed in float32 before any cast (bf16 cancellation near p = 1)
            g[rows, lab[rows]] += 1.0
            g = torch.where(zero, 0.0, g * coef)
            idx = torch.arange(r0, r1, device=out.device)
            out[idx // T, idx % T] = g.to(out.dtype)


# ------------------------------------------------------------------------------ row terms (section 2b / 2c)
def _flat_rows(x3, r0, r1):
    B, T, V = x3.shape
    if x3.is_contiguous():
        return x3.reshape(B * T, V)[r0:r1]
    idx = torch.arange(r0, r1, device=x3.device)
    return x3[idx // T, idx % T]


def _div_rows(ls, lt, div_mode: int, beta: float):
    """(D_t, aux) per row from full float32 log-prob rows: forward KL, reverse KL, or JSD (aux = KL(p_S || M))."""
    ps, pt = ls.exp(), lt.exp()
    if div_mode == 1:
        return (pt * torch.where(pt > 0, lt - ls, 0.0)).sum(-1), None
    if div_mode == 2:
        return (ps * torch.where(ps > 0, ls - lt, 0.0)).sum(-1), None
    lm = torch.log(beta * pt + (1 - beta) * ps)
    kl_tm = (pt * torch.where(pt > 0, lt - lm, 0.0)).sum(-1)
    kl_sm = (ps * torch.where(ps > 0, ls - lm, 0.0)).sum(-1)
    return beta * kl_tm + (1 - beta) * kl_sm, kl_sm


def forward_terms(student, teacher, labels, temperature, ignore_index, want_entropy, div_mode, beta):
    logp_s, logp_t, _, ent = forward(student, teacher, labels, temperature, ignore_index, True)
    lse_s, lse_t, div, aux = divergence_stats(student, teacher, temperature, div_mode, beta)
    return logp_s, logp_t, lse_s, ent, lse_t, div, aux


def divergence_stats(student, teacher, temperature, div_mode, beta):
    """``(lse_s, lse_t, div, aux)`` of ``forward_terms`` over blocks of rows, in float64 (the log-sum-exps stay
    float64; ``lse_t`` / ``div`` / ``aux`` are None without a divergence)."""
    B, T, V = student.shape
    n = B * T
    dev = student.device
    lse_s = torch.empty(n, dtype=torch.float64, device=dev)
    lse_t = torch.empty(n, dtype=torch.float64, device=dev) if div_mode else None
    div, aux = ((torch.zeros(n, dtype=torch.float32, device=dev) for _ in range(2)) if div_mode else (None, None))
    step = _rows_per_block(V)
    with torch.no_grad():
        for r0 in range(0, n, step):
            r1 = min(n, r0 + step)
            xs = _flat_rows(student, r0, r1).to(torch.float64) / temperature
            ls_b = torch.logsumexp(xs, -1)
            lse_s[r0:r1] = ls_b
            if not div_mode:
                continue
            xt = _flat_rows(teacher, r0, r1).to(torch.float64) / temperature
            lt_b = torch.logsumexp(xt, -1)
            d, a = _div_rows(xs - ls_b[:, None], xt - lt_b[:, None], div_mode, beta)
            lse_t[r0:r1], div[r0:r1] = lt_b, d.to(torch.float32)
            if a is not None:
                aux[r0:r1] = a.to(torch.float32)
    return lse_s, lse_t, div, aux


def backward_terms(coef, ent_coef, div_coef, student, teacher, labels, lse, entropy, lse_t, div, aux, temperature,
                   div_mode, beta, out):
    B, T, V = student.shape
    n = B * T
    step = _rows_per_block(V)
    with torch.no_grad():
        for r0 in range(0, n, step):
            r1 = min(n, r0 + step)
            x = _flat_rows(student, r0, r1).to(torch.float64) / temperature
            lp = x - lse[r0:r1, None]
            p = torch.exp(lp)
            g = -p * coef[r0:r1, None]
            lab = labels[r0:r1]
            rows = torch.nonzero((lab >= 0) & (lab < V)).squeeze(1)
            g[rows, lab[rows]] += coef[r0:r1][rows].to(g.dtype)
            if ent_coef is not None:
                g -= ent_coef[r0:r1, None] * torch.where(p > 0, p * (lp + entropy[r0:r1, None]), 0.0)
            if div_mode:
                lt = _flat_rows(teacher, r0, r1).to(torch.float64) / temperature - lse_t[r0:r1, None]
                pt = lt.exp()
                if div_mode == 1:
                    dg = p - pt
                elif div_mode == 2:
                    dg = torch.where(p > 0, p * (lp - lt - div[r0:r1, None]), 0.0)
                else:
                    lm = torch.log(beta * pt + (1 - beta) * p)
                    dg = (1 - beta) * torch.where(p > 0, p * (lp - lm - aux[r0:r1, None]), 0.0)
                g += div_coef[r0:r1, None] * dg
            # exactly zero for rows with nothing to contribute (they may hold garbage, even nan) or only -inf logits
            active = (coef[r0:r1] != 0) | (False if ent_coef is None else ent_coef[r0:r1] != 0)
            if div_mode:
                active = active | (div_coef[r0:r1] != 0)
            zero = ~active[:, None] | torch.isinf(lse[r0:r1, None])
            g = torch.where(zero, 0.0, g / temperature)
            idx = torch.arange(r0, r1, device=out.device)
            out[idx // T, idx % T] = g.to(out.dtype)
