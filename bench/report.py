"""Turn a results dict into the printed table, the markdown file and the PNG plot."""
from __future__ import annotations

from collections import OrderedDict
from typing import List

MODES = ("fwd", "fwd+bwd")


def add_ratios(cases: List[dict]) -> None:
    """speed-up (eager median / median) and memory ratio (peak / eager peak) per mode, in place."""
    eager = {(c["N"], c["V"], c["dtype"]): c for c in cases if c["contender"] == "eager" and c["status"] == "ok"}
    for c in cases:
        e = eager.get((c["N"], c["V"], c["dtype"]))
        for m, st in c.get("modes", {}).items():
            em = e["modes"].get(m) if e else None
            st["speedup_vs_eager"] = (em["median_ms"] / st["median_ms"]) if em else None
            st["mem_ratio_vs_eager"] = (st["peak_mem_bytes"] / em["peak_mem_bytes"]
                                        if em and em["peak_mem_bytes"] > 0 and st["peak_mem_bytes"] >= 0 else None)


def fmt_num(x: float) -> str:
    """3 significant digits without exponents: 6190, 442, 95.3, 0.125."""
    if x >= 100:
        return f"{x:.0f}"
    if x >= 10:
        return f"{x:.1f}"
    if x >= 1:
        return f"{x:.2f}"
    return f"{x:.3g}"


def _ms(st):
    if not st:
        return "-"
    return f"{fmt_num(st['median_ms'])} [{fmt_num(st['p25_ms'])}-{fmt_num(st['p75_ms'])}]"


def _x(v):
    return "-" if v is None else (f"{v:.2f}x" if v >= 0.01 else f"{v:.2g}x")


def _mib(st):
    return "-" if not st or st["peak_mem_bytes"] < 0 else fmt_num(st["peak_mem_bytes"] / 2**20)


def rows(results: dict) -> List[List[str]]:
    out = []
    for c in results["cases"]:
        ms = c.get("modes", {})
        f, fb = ms.get("fwd"), ms.get("fwd+bwd")
        if c["status"] != "ok":
            out.append([f"{c['N']}x{c['V']}", c["contender"], c["status"]] + ["-"] * 6)
            continue
        last = fb or f
        bw = f"{fmt_num(last['achieved_gbps'])} GB/s" if last else "-"
        if last and last.get("bw_frac") is not None:
            bw += f" ({100 * last['bw_frac']:.0f}%)"
        out.append([
            f"{c['N']}x{c['V']}", c["contender"], "ok",
            _ms(f), _ms(fb),
            f"{_x(f and f.get('speedup_vs_eager'))} / {_x(fb and fb.get('speedup_vs_eager'))}",
            f"{_mib(f)} / {_mib(fb)}",
            _x(last.get("mem_ratio_vs_eager")) if last else "-",
            bw,
        ])
    return out


HEADER = ["shape NxV", "contender", "status", "fwd ms (median [IQR])", "fwd+bwd ms (median [IQR])",
          "speed-up vs eager fwd / f+b", "peak MiB fwd / f+b", "mem vs eager (f+b)", "bandwidth f+b (% of peak)"]


def not_timed(results: dict) -> List[str]:
    """One line per distinct (contender, status, reason) of the cases that were not timed."""
    out, seen = [], set()
    for c in results["cases"]:
        if c["status"] == "ok":
            continue
        key = (c["contender"], c["status"], c.get("reason"))
        if key in seen:
            continue
        seen.add(key)
        shapes = [f"{d['N']}x{d['V']}" for d in results["cases"]
                  if (d["contender"], d["status"], d.get("reason")) == key]
        where = "all shapes" if len(shapes) == len({(d["N"], d["V"]) for d in results["cases"]}) else ", ".join(shapes)
        out.append(f"{c['contender']} {c['status']} ({where}): {c.get('reason')}")
    return out


def text_table(results: dict) -> str:
    rs = [HEADER] + rows(results)
    widths = [max(len(r[i]) for r in rs) for i in range(len(HEADER))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rs]
    lines.insert(1, "  ".join("-" * w for w in widths))
    nt = not_timed(results)
    if nt:
        lines += ["", "not timed:"] + ["  " + x for x in nt]
    return "\n".join(lines)


def markdown(results: dict) -> str:
    d = results["device"]
    cfg = results["config"]
    out = [f"# rlsd-bench: {d['name']} ({d['type']})", "",
           f"- date: {results['date']}",
           f"- command: `{results['command']}`",
           "- versions: " + ", ".join(f"{k} {v}" for k, v in results["versions"].items()),
           f"- dtype {cfg['dtype']}, lam {cfg['lam']}, {cfg['reps']} reps after {cfg['warmup']} warm-up; "
           f"times are median [p25-p75] in ms; memory is the peak above the inputs "
           f"({'CUDA max_memory_allocated' if d['type'] == 'cuda' else 'VmHWM growth in a fresh process'})",
           ]
    if d.get("peak_bw_bytes_per_s"):
        out.append(f"- peak bandwidth used for % BW: {d['peak_bw_bytes_per_s'] / 1e12:.2f} TB/s; bytes moved: "
                   "fwd 2*N*V*itemsize, fwd+bwd 4*N*V*itemsize (docs/math.md section 8)")
    if d["type"] == "cpu":
        out.append(f"- torch threads: {results['host'].get('torch_threads')}, cpu count {results['host'].get('cpu_count')}")
    out += ["", "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    out += ["| " + " | ".join(r) + " |" for r in rows(results)]
    nt = not_timed(results)
    if nt:
        out += ["", "Not timed:", ""] + [f"- {x}" for x in nt]
    return "\n".join(out) + "\n"


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = OrderedDict()
    for c in results["cases"]:
        if c["status"] != "ok":
            continue
        m = "fwd+bwd" if "fwd+bwd" in c["modes"] else "fwd"
        series.setdefault((c["contender"], c["N"], m), []).append((c["V"], c["modes"][m]))
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(13, 5))
    names = sorted({k[0] for k in series})
    ns = sorted({k[1] for k in series})
    colors = {n: f"C{i}" for i, n in enumerate(names)}
    styles = ["-", "--", ":", "-."]
    markers = ["o", "s", "^", "D"]
    for (name, n, m), pts in series.items():
        pts.sort(key=lambda p: p[0])
        vs = [p[0] for p in pts]
        i = ns.index(n) % len(styles)
        kw = dict(color=colors[name], linestyle=styles[i], marker=markers[i], label=f"{name} N={n}")
        ax_t.plot(vs, [p[1]["median_ms"] for p in pts], **kw)
        ax_m.plot(vs, [max(p[1]["peak_mem_bytes"] / 2**20, 0.01) for p in pts], **kw)  # log axis: floor 0.01 MiB
    mode = "fwd+bwd" if results["config"]["mode"] != "fwd" else "fwd"
    ax_t.set(xlabel="vocabulary V", ylabel=f"{mode} median time (ms)", yscale="log", title="time")
    ax_m.set(xlabel="vocabulary V", ylabel=f"{mode} peak memory above inputs (MiB, floor 0.01)", yscale="log", title="memory")
    for ax in (ax_t, ax_m):
        ax.grid(True, which="both", alpha=0.3)
    ax_t.legend(fontsize=7)
    fig.suptitle(f"rlsd-bench {results['device']['name']} ({results['config']['dtype']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
