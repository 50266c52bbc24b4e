"""Compile every Triton kernel of the package for sm_90 (Hopper) without a GPU; run by test_triton_aot.py in a
process where TRITON_INTERPRET is unset (under the interpreter @triton.jit yields interpreted functions).
Prints one line per compiled variant; exits non-zero on the first compile error, 77 when no ptxas is available."""
import itertools
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from rlsd_kernels.backends import triton_kernels as tk
from rlsd_kernels.backends import triton_linear as tlin
from rlsd_kernels.backends.triton_launch import LAUNCH

TARGET = GPUTarget("cuda", 90, 32)
PTR = {"bf16": "*bf16", "fp16": "*fp16", "fp32": "*fp32"}


def compile_one(name, fn, signature, constexprs, num_warps):
    src = ASTSource(fn=fn, signature={**signature, **{k: "constexpr" for k in constexprs}}, constexprs=constexprs)
    try:
        k = triton.compile(src, target=TARGET, options={"num_warps": num_warps})
    except RuntimeError as e:
        if "ptxas" in str(e).lower():
            print(f"no ptxas: {e}")
            sys.exit(77)
        raise
    assert k.asm["ptx"], name
    print(f"ok {name} {constexprs}")


def blocks(p):
    return {k: v for k, v in p.items() if k.startswith("BLOCK_")}, p["num_warps"]


def main():
    for dt, teacher, ent, contig in itertools.product(("bf16", "fp32"), (True, False), (True, False), (True, False)):
        sig = {"S": PTR[dt], "TCH": PTR[dt], "LABELS": "*i64", "LOGP_S": "*fp32", "LOGP_T": "*fp32", "LSE_S": "*fp32",
               "ENT": "*fp32", "seq_len": "i64", "t_seq_len": "i64", "V": "i32", "s_sb": "i64", "s_st": "i64",
               "s_sv": "i64", "t_sb": "i64", "t_st": "i64", "t_sv": "i64", "inv_temp": "fp32", "ignore_index": "i64"}
        compile_one(f"fused_logprobs_fwd[{dt}]", tk._fused_logprobs_fwd, sig,
                    {"HAS_TEACHER": teacher, "WANT_ENT": ent, "CONTIG": contig, "BLOCK_V": LAUNCH["fwd_block_v"]},
                    LAUNCH["fwd_warps"])
    for dt, contig in itertools.product(("bf16", "fp32"), (True, False)):
        sig = {"S": PTR[dt], "OUT": PTR[dt], "GRAD": "*fp32", "LABELS": "*i64", "LSE": "*fp32", "seq_len": "i64",
               "V": "i32", "s_sb": "i64", "s_st": "i64", "s_sv": "i64", "o_sb": "i64", "o_st": "i64", "o_sv": "i64",
               "inv_temp": "fp32"}
        compile_one(f"fused_logprobs_bwd[{dt}]", tk._fused_logprobs_bwd, sig,
                    {"CONTIG": contig, "BLOCK_V": LAUNCH["bwd_block_v"]}, LAUNCH["bwd_warps"])
    common = {"N": "i64", "V": "i64", "H": "i64", "s_hn": "i64", "s_hh": "i64", "s_wv": "i64", "s_wh": "i64"}
    for dt, teacher, bias, ent in itertools.product(("bf16", "fp32"), (True, False), (True, False), (True, False)):
        b, w = blocks(tlin._FWD)
        sig = {"HS": PTR[dt], "HT": PTR[dt], "W": PTR[dt], "BIAS": PTR[dt], "LABELS": "*i64", "LOGP_S": "*fp32",
               "LOGP_T": "*fp32", "LSE_S": "*fp32", "ENT": "*fp32", "N": "i64", "V": "i64", "H": "i64",
               "s_hn": "i64", "s_hh": "i64", "t_hn": "i64", "t_hh": "i64", "s_wv": "i64", "s_wh": "i64",
               "inv_temp": "fp32", "ignore_index": "i64"}
        compile_one(f"linear_fwd[{dt}]", tlin._linear_fwd, sig,
                    {"HAS_TEACHER": teacher, "HAS_BIAS": bias, "WANT_ENT": ent, "DOT_F32": False, **b}, w)
    for dt, bias in itertools.product(("bf16", "fp32"), (True, False)):
        b, w = blocks(tlin._BWD_DH)
        sig = {"HS": PTR[dt], "W": PTR[dt], "BIAS": PTR[dt], "LABELS": "*i64", "GRAD": "*fp32", "LSE": "*fp32",
               "DH": "*fp32", **common, "inv_temp": "fp32"}
        compile_one(f"linear_bwd_dh[{dt}]", tlin._linear_bwd_dh, sig, {"HAS_BIAS": bias, "DOT_F32": False, **b}, w)
        b, w = blocks(tlin._BWD_DW)
        sig = {"HS": PTR[dt], "W": PTR[dt], "BIAS": PTR[dt], "LABELS": "*i64", "GRAD": "*fp32", "LSE": "*fp32",
               "DW": "*fp32", "DB": "*fp32", **common, "inv_temp": "fp32"}
        for want_dw, want_db in ((True, bias), (False, bias)):
            compile_one(f"linear_bwd_dw[{dt}]", tlin._linear_bwd_dw, sig,
                        {"HAS_BIAS": bias, "WANT_DW": want_dw, "WANT_DB": want_db, "DOT_F32": False, **b}, w)


if __name__ == "__main__":
    main()
