"""Tables of the GPU check: the short summary printed last, and the markdown file (every number of the JSON)."""
from __future__ import annotations

from typing import List, Optional

from .report import fmt_num

SUMMARY_HEADER = ["shape", "ours RLSD f+b", "Liger RLSD", "vs Liger", "ours GRPO f+b", "Liger GRPO", "vs Liger",
                  "eager f+b", "% copy BW", "launches", "syncs"]


def _by_role(cases: List[dict]) -> dict:
    return {(c["N"], c["V"], c["role"]): c for c in cases}


def status_cell(c: Optional[dict]) -> str:
    """The table cell of a case that has no time: its status, ``skipped (time)`` or ``n/a`` (skipped otherwise)."""
    if c is None:
        return "-"
    st = c["status"]
    if st == "skipped":
        r = c.get("reason") or ""
        if r.startswith("time"):
            return "skipped (time)"
        if r.startswith("check: time"):
            return "skipped (time)"
        return "n/a"
    return st


def _ms(c: Optional[dict], mode: str = "fwd+bwd") -> str:
    if c is None or c["status"] != "ok" or mode not in c.get("modes", {}):
        return status_cell(c) if (c is None or c["status"] != "ok") else "-"
    return f"{fmt_num(c['modes'][mode]['median_ms'])} ms"


def _speedup(ours: Optional[dict], other: Optional[dict], mode: str = "fwd+bwd") -> str:
    """other's median / ours: > 1 means ours is faster."""
    try:
        return f"{other['modes'][mode]['median_ms'] / ours['modes'][mode]['median_ms']:.2f}x"
    except (KeyError, TypeError, ZeroDivisionError):
        return "-"


def _bw(c: Optional[dict], mode: str = "fwd+bwd") -> str:
    try:
        f = c["modes"][mode]["bw_frac"]
    except (KeyError, TypeError):
        return "-"
    return "-" if f is None else f"{100 * f:.0f}%"


def _prof(c: Optional[dict], key: str) -> str:
    p = (c or {}).get("profile") or {}
    return "-" if p.get(key) is None else str(p[key])


def summary_rows(res: dict) -> List[List[str]]:
    cases = _by_role(res.get("cases", []))
    rows = []
    for N, V in res["config"]["shapes"]:
        g = (lambda role: cases.get((N, V, role)))
        if not any(g(r) for r in ("ours_rlsd", "ours_grpo", "liger_rlsd", "liger_grpo", "eager")):
            continue
        o, lr, og, lg = g("ours_rlsd"), g("liger_rlsd"), g("ours_grpo"), g("liger_grpo")
        rows.append([f"{N}x{V}", _ms(o), _ms(lr), _speedup(o, lr), _ms(og), _ms(lg), _speedup(og, lg),
                     _ms(g("eager")), _bw(o), _prof(o, "kernels"), _prof(o, "syncs")])
    return rows


def _table(header: List[str], rows: List[List[str]]) -> List[str]:
    rs = [header] + rows
    widths = [max(len(r[i]) for r in rs) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rs]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return lines


def _md_table(header: List[str], rows: List[List[str]]) -> List[str]:
    cell = lambda x: " ".join(str(x).split())  # noqa: E731  (an error message's newline would end the row)
    return (["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            + ["| " + " | ".join(cell(x) for x in r) + " |" for r in rows])


def _checks_line(res: dict) -> str:
    parts = []
    for c in res.get("checks", []):
        parts.append(f"{c['contender']} {status_cell(c) if c['status'] == 'skipped' else c['status']}")
    return "checks (small inputs vs float32 reference): " + (", ".join(parts) or "none")


def _profile_line(res: dict) -> Optional[str]:
    ps = [(c["contender"], c["profile"]) for c in res.get("cases", []) if c.get("profile")]
    if not ps:
        return None
    shape = res["config"].get("profile_shape")
    items = [f"{n} {p.get('kernels')}/{p.get('syncs')}" for n, p in ps]
    return f"profile {shape[0]}x{shape[1]} (kernels / host syncs per fwd+bwd): " + ", ".join(items)


def _sweep_lines(res: dict) -> List[str]:
    sw = res.get("sweep") or {}
    summ = sw.get("summary") or {}
    if not summ.get("per_case"):
        return [f"launch sweep: {sw.get('status', 'not run')}" + (f" ({sw['reason']})" if sw.get("reason") else "")]
    out = [f"launch sweep: fastest overall {summ['overall']} {summ['overall_params']}"]
    out += [f"  {p['N']}x{p['V']} {p['op']}: {p['fastest']} {p['median_ms']:.3f} ms" for p in summ["per_case"]]
    adopted = res.get("adopted_launch")
    if adopted:
        out.append(f"grid timed with the fastest RLSD setting {adopted['setting']} "
                   f"(geomean {adopted['geomean_vs_best']}x of the per-shape best)")
    return out


def _linear_line(res: dict) -> Optional[str]:
    lin = res.get("linear")
    if not lin:
        return None
    items = [f"{r['row']} " + (f"{fmt_num(r['fwd_bwd_ms'])} ms" if r.get("status") == "ok" else r.get("status", "?"))
             for r in lin]
    return f"fused linear {lin[0]['shape']} fwd+bwd: " + ", ".join(items)


def summary(res: dict) -> str:
    d = res["device"]
    v = res.get("versions", {})
    bw = (d.get("copy_bw") or {}).get("bytes_per_s")
    lines = [f"== rlsd-kernels GPU check: {d['name']} ({d['slug']}); torch {v.get('torch')}, triton {v.get('triton')}, "
             f"liger-kernel {v.get('liger_kernel')} ==",
             f"copy bandwidth {bw / 1e9:.0f} GB/s (measured); bytes: RLSD 3 x N*V*2 fwd+bwd, GRPO 2 x N*V*2"
             if bw else "copy bandwidth: not measured"]
    from .testrun import brief

    lines.append(brief(res["tests"]) if res.get("tests") else "tests: not run")
    for f in (res.get("tests") or {}).get("failures", [])[:8]:
        lines.append("  " + f[:150])
    lines.append(_checks_line(res))
    lines += [""] + _table(SUMMARY_HEADER, summary_rows(res)) + [""]
    for extra in (_profile_line(res), *_sweep_lines(res), _linear_line(res)):
        if extra:
            lines.append(extra)
    bad = [c for c in res.get("cases", []) if c["status"] in ("wrong", "error")]
    for c in bad[:6]:
        lines.append(f"{c['status'].upper()} {c['contender']} {c['N']}x{c['V']}: {(c.get('reason') or '')[:150]}")
    for p in res.get("peer_errors") or []:
        lines.append(f"peer library error (not ours, exit status unaffected): {p}")
    lines.append(f"total wall {res.get('wall_s', 0):.0f} s (budget {res['config']['budget_s']:.0f} s)"
                 f"{'; WATCHDOG stopped the run' if res.get('watchdog') else ''}; exit {res.get('exit_code')}; "
                 f"results: {res.get('files', {}).get('json', '?')} (+ .md)")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ markdown
def _case_row(c: dict) -> List[str]:
    ms = c.get("modes", {})
    f, fb = ms.get("fwd"), ms.get("fwd+bwd")
    cell = (lambda st: "-" if not st else
            f"{fmt_num(st['median_ms'])} [{fmt_num(st['p20_ms'])}-{fmt_num(st['p80_ms'])}]")
    peak = (lambda st: "-" if not st or st.get("peak_mem_bytes") is None else fmt_num(st["peak_mem_bytes"] / 2**20))
    status = c["status"] if c["status"] != "skipped" else status_cell(c)
    return [f"{c['N']}x{c['V']}", c["contender"], status, cell(f), cell(fb), peak(f), peak(fb), _bw(c),
            "-" if not fb else f"{fb['first_call_s']:.2f}"]


def gpu_markdown(res: dict) -> str:
    d, cfg = res["device"], res["config"]
    bw = (d.get("copy_bw") or {}).get("bytes_per_s")
    out = [f"# rlsd-kernels GPU check: {d['name']}", "",
           f"- date: {res['date']}; command: `{res['command']}`",
           "- versions: " + ", ".join(f"{k} {v}" for k, v in res.get("versions", {}).items()),
           f"- device memory: {(d.get('total_memory_bytes') or 0) / 2**30:.1f} GiB; measured copy bandwidth: "
           + (f"{bw / 1e9:.0f} GB/s (`dst.copy_(src)` of {d['copy_bw']['buffer_bytes'] >> 20} MiB, read + write)"
              if bw else "not measured"),
           f"- workload: {cfg['dtype']}, lam {cfg['lam']}, {cfg['seqs']} sequences, per-sequence advantages; "
           "bytes the op must move (docs/math.md section 8): RLSD fwd 2, fwd+bwd 3 passes of N*V*itemsize; "
           "GRPO fwd 1, fwd+bwd 2",
           f"- times: median [p20-p80] ms of "
           + ("CUDA-event timed calls, L2 flushed before each" if d["type"] == "cuda" else "perf_counter timed calls")
           + f" (~{cfg['rep_budget_s']} s of reps per case and mode, 3 to 50); memory: peak above everything "
           "allocated before the call (the inputs), CUDA only",
           f"- budget {cfg['budget_s']:.0f} s, wall {res.get('wall_s', 0):.0f} s; exit code {res.get('exit_code')}",
           "", "## Summary", ""]
    out += _md_table(SUMMARY_HEADER, summary_rows(res))
    out += ["", "'vs Liger' = Liger median / ours (> 1: ours faster); % copy BW and launches/syncs are ours RLSD's.",
            "", "## Tests", ""]
    t = res.get("tests") or {}
    from .testrun import brief

    out.append(brief(t) if t else "not run")
    if t.get("command"):
        out += ["", f"`{t['command']}`"]
    out += [f"- {x}" for x in t.get("failures", [])]
    out += ["", "## Correctness gate (small inputs)", ""]
    rows = [[c["contender"], f"{c['N']}x{c['V']}", c["status"],
             "-" if not c.get("check") else f"{c['check']['loss_rel_err']:.1e}",
             "-" if not c.get("check") else f"{c['check']['grad_max_err_over_max_ref']:.1e}",
             f"{c.get('seconds', 0):.1f}", (c.get("reason") or "")[:200]] for c in res.get("checks", [])]
    out += _md_table(["contender", "shape", "status", "loss rel err", "grad err / max", "s", "reason"], rows)
    out += ["", "## Every case", ""]
    out += _md_table(["shape", "contender", "status", "fwd ms", "fwd+bwd ms", "peak MiB fwd", "peak MiB f+b",
                      "% copy BW f+b", "first call s"], [_case_row(c) for c in res.get("cases", [])])
    notes = [c for c in res.get("cases", []) if c["status"] != "ok" and c.get("reason")]
    if notes:
        out += ["", "Not timed:", ""] + [f"- {c['N']}x{c['V']} {c['contender']} {c['status']}: {c['reason'][:200]}"
                                          for c in notes]
    prof = [c for c in res.get("cases", []) if c.get("profile")]
    if prof:
        out += ["", "## Launches and host syncs per fwd+bwd (torch.profiler)", ""]
        keys = ["kernels", "memcpy", "memset", "launch_calls", "sync_calls", "local_scalar_dense", "syncs", "host_ms"]
        out += _md_table(["shape", "contender"] + keys, [[f"{c['N']}x{c['V']}", c["contender"]]
                                                         + [str(c["profile"].get(k)) for k in keys] for c in prof])
    sw = res.get("sweep") or {}
    if sw.get("rows"):
        out += ["", "## Launch-parameter sweep (`triton_launch.SWEEP`)", ""]
        out += _md_table(["setting", "params", "shape", "op", "status", "ms [p20-p80]", "% copy BW", "first call s"],
                         [[r["setting"], " ".join(f"{k}={v}" for k, v in r["params"].items()), f"{r['N']}x{r['V']}",
                           r["op"], r["status"],
                           f"{r['median_ms']:.3f} [{r['p20_ms']:.3f}-{r['p80_ms']:.3f}]" if r["status"] == "ok" else
                           (r.get("reason") or "")[:80],
                           "-" if r.get("bw_frac") is None else f"{100 * r['bw_frac']:.0f}%",
                           str(r.get("first_call_s", "-"))] for r in sw["rows"]])
        out += [""] + [f"- {x.strip()}" for x in _sweep_lines(res)]
    if res.get("linear"):
        out += ["", "## Fused linear (hidden states + LM head)", ""]
        from .linear import derived

        ratio = lambda r, k: f"{r[k]:.2f}" if k in r else "-"  # noqa: E731
        out += _md_table(["shape", "row", "status", "fwd ms", "fwd+bwd ms", "vs logits_op (target <= 1.15)",
                          "GEMM floor", "vs liger", "vs A/B", "peak MiB above inputs", "backends"],
                         [[r["shape"], r["row"], r.get("status", "?"),
                           fmt_num(r["fwd_ms"]) if "fwd_ms" in r else "-",
                           fmt_num(r["fwd_bwd_ms"]) if "fwd_bwd_ms" in r else (r.get("error") or "")[:80],
                           ratio(r, "vs_logits_op"),
                           f"{100 * r['gemm_floor_frac']:.0f}%" if "gemm_floor_frac" in r else "-",
                           ratio(r, "vs_liger"), ratio(r, "vs_ab"),
                           fmt_num(r["peak_mem_mib"]) if "peak_mem_mib" in r else "-",
                           f"logits={r.get('logits_backend')}, linear chunks={r.get('linear_backend')}"
                           if "logits_backend" in r else "-"] for r in derived(res["linear"])])
        out += ["", "vs A/B: fused_linear over fused_linear_stacked (each chunk's student and teacher rows in one "
                "GEMM instead of the teacher's walk first), fused_linear_terms over fused_linear_terms_2walk."]
        for r in res["linear"]:  # where the time goes: the device kernels of one forward+backward
            if r.get("kernels"):
                out += ["", f"Device kernels of one {r['row']} forward+backward at {r['shape']} (top by time):", ""]
                out += _md_table(["kernel", "calls", "ms"],
                                 [[k["name"][:90].replace("|", "/"), k["calls"], f"{k['ms']:.2f}"]
                                  for k in r["kernels"]])
    if res.get("terms"):
        out += ["", "## Loss terms (section 2c) over plain RLSD, and OPSD alone", ""]
        out += _md_table(["shape", "row", "fwd+bwd ms", "vs plain", "vs eager (OPSD rows)"],
                         [[r.get("shape", "-"), r.get("row", r.get("status", "?")),
                           fmt_num(r["fwd_bwd_ms"]) if "fwd_bwd_ms" in r else (r.get("error") or "")[:80],
                           f"{r['vs_plain']:.2f}" if "vs_plain" in r else "-",
                           f"{r['vs_eager']:.2f}" if "vs_eager" in r else "-"] for r in res["terms"]])
    if res.get("stages"):
        out += ["", "## Stages", ""]
        out += _md_table(["stage", "status", "wall s"], [[s["name"], s["status"], f"{s['wall_s']:.1f}"]
                                                          for s in res["stages"]])
    return "\n".join(out) + "\n"
