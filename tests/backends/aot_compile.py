"""Compile every Triton kernel of the package for sm_90 (Hopper) without a GPU; run by test_triton_aot.py in a
process where TRITON_INTERPRET is unset (under the interpreter @triton.jit yields interpreted functions).
Prints one line per compiled variant; exits non-zero on the first compile error, 77 when no ptxas is available."""
import itertools
import re
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from rlsd_kernels.backends.logits import triton as tk
from rlsd_kernels.backends.logits import triton_loss as tloss
from rlsd_kernels.backends.logits import triton_terms as tterms
from rlsd_kernels.backends.triton_launch import LAUNCH

TARGET = GPUTarget("cuda", 90, 32)
PTR = {"bf16": "*bf16", "fp16": "*fp16", "fp32": "*fp32"}


# float64 arithmetic in PTX (conversions, compares and the one float64 lse add are scalars per row)
F64_MATH = re.compile(r"\b(?:mul|fma|div|sub|ex2|lg2|max|min)\.[a-z.]*f64\b")


def compile_one(name, fn, signature, constexprs, num_warps, no_f64_math=False):
    """``no_f64_math``: the kernel must do its per-element work in float32 (float64 per-token inputs are converted
    on load; a float64 scalar reaching the sweep would promote every element to float64)."""
    src = ASTSource(fn=fn, signature={**signature, **{k: "constexpr" for k in constexprs}}, constexprs=constexprs)
    try:
        k = triton.compile(src, target=TARGET, options={"num_warps": num_warps})
    except RuntimeError as e:
        if "ptxas" in str(e).lower():
            print(f"no ptxas: {e}")
            sys.exit(77)
        raise
    assert k.asm["ptx"], name
    if no_f64_math and F64_MATH.search(k.asm["ptx"]):
        raise AssertionError(f"{name} {constexprs}: float64 arithmetic in the PTX: "
                             f"{sorted(set(F64_MATH.findall(k.asm['ptx'])))}")
    print(f"ok {name} {constexprs}")


def main():
    for dt, teacher, ent, contig in itertools.product(("bf16", "fp32"), (True, False), (True, False), (True, False)):
        sig = {"S": PTR[dt], "TCH": PTR[dt], "LABELS": "*i64", "LOGP_S": "*fp32", "LOGP_T": "*fp32", "LSE_S": "*fp32",
               "ENT": "*fp32", "seq_len": "i64", "t_seq_len": "i64", "V": "i32", "s_sb": "i64", "s_st": "i64",
               "s_sv": "i64", "t_sb": "i64", "t_st": "i64", "t_sv": "i64", "inv_temp": "fp32", "ignore_index": "i64"}
        compile_one(f"fused_logprobs_fwd[{dt}]", tk.KERNELS["fused_logprobs_fwd"], sig,
                    {"HAS_TEACHER": teacher, "WANT_ENT": ent, "CONTIG": contig, "BLOCK_V": LAUNCH["fwd_block_v"]},
                    LAUNCH["fwd_warps"])
    for dt, contig in itertools.product(("bf16", "fp32"), (True, False)):
        sig = {"S": PTR[dt], "OUT": PTR[dt], "GRAD": "*fp32", "LABELS": "*i64", "LSE": "*fp32", "seq_len": "i64",
               "V": "i32", "s_sb": "i64", "s_st": "i64", "s_sv": "i64", "o_sb": "i64", "o_st": "i64", "o_sv": "i64",
               "inv_temp": "fp32"}
        compile_one(f"fused_logprobs_bwd[{dt}]", tk.KERNELS["fused_logprobs_bwd"], sig,
                    {"CONTIG": contig, "BLOCK_V": LAUNCH["bwd_block_v"]}, LAUNCH["bwd_warps"])
    compile_fused_loss()
    compile_terms()


def compile_terms():
    """The row-term kernels (triton_terms.py): every divergence mode with and without the entropy term, both
    vocabulary layouts, bf16 and fp32."""
    fwd_sig = {"LABELS": "*i64", "LOGP_S": "*fp32", "LOGP_T": "*fp32", "LSE_S": "*fp64", "ENT": "*fp32",
               "LSE_T": "*fp64", "DIV": "*fp32", "AUX": "*fp32", "AUX": "*fp32", "seq_len": "i64", "t_seq_len": "i64", "V": "i32",
               "s_sb": "i64", "s_st": "i64", "s_sv": "i64", "t_sb": "i64", "t_st": "i64", "t_sv": "i64",
               "inv_temp": "fp32", "ignore_index": "i64", "beta": "fp32"}
    for dt, (teacher, mode), contig in itertools.product(
            ("bf16", "fp32"), [(False, 0), (True, 0), (True, 1), (True, 2), (True, 3)], (True, False)):
        compile_one(f"terms_fwd[{dt}]", tterms.KERNELS["terms_fwd"], {"S": PTR[dt], "TCH": PTR[dt], **fwd_sig},
                    {"HAS_TEACHER": teacher, "DIV_MODE": mode, "CONTIG": contig, "BLOCK_V": LAUNCH["fwd_block_v"]},
                    LAUNCH["fwd_warps"])
    bwd_sig = {"COEF": "*fp32", "ECOEF": "*fp32", "FCOEF": "*fp32", "LABELS": "*i64", "LSE": "*fp64", "ENT": "*fp32",
               "LSE_T": "*fp64", "DIV": "*fp32", "AUX": "*fp32", "AUX": "*fp32", "seq_len": "i64", "t_seq_len": "i64", "V": "i32",
               "s_sb": "i64", "s_st": "i64", "s_sv": "i64", "t_sb": "i64", "t_st": "i64", "t_sv": "i64",
               "o_sb": "i64", "o_st": "i64", "o_sv": "i64", "inv_temp": "fp32", "beta": "fp32"}
    variants = [(ent, mode, True) for ent in (True, False) for mode in range(4)] + [(True, 1, False)]
    for dt, (ent, mode, contig) in itertools.product(("bf16", "fp32"), variants):
        compile_one(f"terms_bwd[{dt}]", tterms.KERNELS["terms_bwd"],
                    {"S": PTR[dt], "TCH": PTR[dt], "OUT": PTR[dt], **bwd_sig},
                    {"HAS_ENT": ent, "DIV_MODE": mode, "CONTIG": contig, "BLOCK_V": LAUNCH["bwd_block_v"]},
                    LAUNCH["bwd_warps"])


def compile_fused_loss():
    """Every constexpr branch of the fused loss kernels (each value of each flag at least once, the main
    combinations in full), bf16 and fp32."""
    for mask_dt, has_mask, cu, agg, per_seq in [
            ("*i1", True, False, 0, False), ("*fp32", True, True, 1, True), ("*i1", False, False, 1, False),
            ("*i1", False, True, 2, True), ("*i1", True, False, 0, True), ("*i1", False, True, 0, False)]:
        sig = {"LABELS": "*i64", "MASK": mask_dt, "CU": "*i32", "ADV": "*fp32", "AGG": "*fp32", "ADV_ROW": "*fp32",
               "SEQ_CNT": "*fp32", "ERR": "*i64", "N": "i64", "V": "i32", "T": "i64", "num_seqs": "i64",
               "ignore_index": "i64", "inv_norm": "fp32"}
        compile_one("loss_prologue", tloss.KERNELS["prologue"], sig,
                    {"HAS_MASK": has_mask, "HAS_CU": cu, "AGG_MODE": agg, "ADV_PER_SEQ": per_seq,
                     "BLOCK": LAUNCH["prologue_block"], "BLOCK_S": 16, "BLOCK_T": LAUNCH["prologue_tile_t"]},
                    LAUNCH["small_warps"])
    combos = [(dt, teacher, write_grad, (teacher + write_grad + k) % 2 == 0, k % 2 == 1, k % 3 == 0, contig)
              for k, (dt, teacher, write_grad, contig) in enumerate(itertools.product(
                  ("bf16", "fp32"), (0, 1, 2), (True, False), (True, False)))
              if dt == "bf16" or contig]
    # the row-in-registers variant (one 32768-column block per row) for the main combinations
    combos += [("bf16", teacher, True, True, teacher == 1, False, True) for teacher in (0, 1, 2)]
    off = (0, False, False, 0)  # the section 2c terms (KL_TYPE, HAS_WIS, ENT_GRAD, DIV_MODE) off: the plain loss
    combos = [c + (i >= len(combos) - 3, "*fp32", off) for i, c in enumerate(combos)]
    # the fused rows (triton_rows.py): float64 per-token inputs, each term flag's every value at least once
    combos += [("bf16", 1, True, True, True, False, True, False, "*fp64", (3, True, True, 0)),
               ("bf16", 0, True, False, False, False, True, False, "*fp64", (1, False, False, 0)),
               ("fp32", 2, True, True, True, True, True, False, "*fp64", (2, True, True, 0)),
               ("bf16", 1, True, True, True, False, False, False, "*fp64", (0, False, True, 1)),
               ("bf16", 1, True, True, True, False, True, True, "*fp64", (3, True, True, 0)),
               ("bf16", 1, True, True, False, False, True, False, "*fp64", (0, False, False, 1)),
               ("fp32", 1, True, False, True, True, True, False, "*fp64", (3, True, True, 2)),
               ("bf16", 1, True, True, True, False, False, False, "*fp64", (1, False, False, 2)),
               ("bf16", 1, True, True, True, False, True, False, "*fp64", (3, True, True, 3)),
               ("fp32", 1, True, False, False, True, False, False, "*fp64", (0, False, False, 3)),
               # the fused linear op's plain chunks (float64 per-token inputs, terms off): the student's walk after
               # the teacher's (TEACHER 2: its log-probs), and stacked student and teacher rows (TEACHER 1)
               ("bf16", 2, True, False, False, False, True, False, "*fp64", off),
               ("bf16", 1, True, True, True, False, True, False, "*fp64", off)]
    for dt, teacher, write_grad, has_old, want_ent, cispo, contig, in_regs, tok, (kl, wis, ent_grad, div) in combos:
        sig = {"S": PTR[dt], "TCH": PTR[dt], "GRAD": PTR[dt], "LABELS": "*i64", "AGG": tok, "ADV": tok,
               "OLD": tok, "TLP": tok, "REF": tok, "WIS": tok, "INMASK": "*i1", "LOGP_S": "*fp32", "LOGP_T": "*fp32",
               "WEIGHT": "*fp32", "ENT": "*fp32", "LSE": "*fp32", "COEF": "*fp32", "PARTS": "*fp32",
               "LSE_T": "*fp64", "DIV": "*fp32", "AUX": "*fp32",
               "N": "i64", "seq_len": "i64", "t_seq_len": "i64", "g_seq_len": "i64", "V": "i32",
               "s_sb": "i64", "s_st": "i64", "s_sv": "i64", "t_sb": "i64", "t_st": "i64", "t_sv": "i64",
               "g_sb": "i64", "g_st": "i64", "g_sv": "i64", "inv_temp": "fp32", "ignore_index": "i64",
               "lam": "fp32", "eps_w": "fp32", "log_lo": "fp32", "log_hi": "fp32", "clip_dual": "fp32",
               "kl_coef": "fp32", "entropy_coef": "fp32", "distill_coef": "fp32", "distill_clip": "fp32",
               "beta": "fp32"}
        compile_one(f"loss_rows[{dt}]", tloss.KERNELS["loss_rows"], sig,
                    {"TEACHER": teacher, "HAS_OLD": has_old, "WANT_ENT": want_ent, "CISPO": cispo,
                     "WRITE_GRAD": write_grad, "CONTIG": contig,
                     "BLOCK_V": 32768 if in_regs else LAUNCH["loss_block_v"],
                     "PREFETCH": (teacher + has_old) % 2 == 1 and not in_regs, "ROW_IN_REGS": in_regs,
                     "KL_TYPE": kl, "HAS_WIS": wis, "ENT_GRAD": ent_grad, "DIV_MODE": div,
                     "TERM_PARTS": tok == "*fp64" and (kl or wis or ent_grad or div) != 0,
                     "HAS_INMASK": tok == "*fp64" and wis},
                    LAUNCH["loss_row_warps"] if in_regs else LAUNCH["loss_warps"], no_f64_math=True)
    for n_parts in (tloss.N_ROWSTATS, tloss.N_TERM_PARTS):  # the plain loss; the fused rows' terms
        compile_one("loss_finalize", tloss.KERNELS["finalize"],
                    {"PARTS": "*fp32", "LOSS": "*fp32", "METRICS": "*fp32", "N": "i64"},
                    {"BLOCK": LAUNCH["finalize_block"], "K": 16, "N_PARTS": n_parts}, LAUNCH["small_warps"])
    for dt in ("bf16", "fp32"):
        compile_one(f"scale_grad[{dt}]", tloss.KERNELS["scale_grad"],
                    {"GRAD": PTR[dt], "GOUT": "*fp32", "numel": "i64"},
                    {"BLOCK": LAUNCH["scale_block"]}, 8)


if __name__ == "__main__":
    main()
