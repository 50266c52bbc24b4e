"""``bench.terms`` at a toy shape on the Triton backend (the interpreter here): every row measured, the ``_composed``
rows really composed (the Triton fused rows hidden during them), the backend module left as it was."""
import pytest

from conftest import BACKENDS
from helpers import running_on

TRITON = next((b for b in BACKENDS if b == "triton"), None)
pytestmark = pytest.mark.skipif(TRITON is None, reason="no Triton backend on this machine")


def test_composed_rows_hide_the_fused_rows(monkeypatch):
    from bench import terms
    from rlsd_kernels.backends.logits import triton as tk

    served = []
    real = tk.fused_rows
    monkeypatch.setattr(tk, "fused_rows", lambda *a, **k: served.append(1) or real(*a, **k))
    with running_on(TRITON):
        rows = terms.run("16x300", str(TRITON.device), "float32", 1)
    names = [r["row"] for r in rows if "vs_plain" in r]
    assert names == list(terms.ROWS) + [f"{k}_composed" for k in terms.COMPOSED]
    assert all(r["fwd_bwd_ms"] > 0 for r in rows)
    # warm-up + 1 rep of each fused-rows row (those of COMPOSED, and opsd_loss with JSD); the composed rows never
    # reached it
    assert len(served) == 2 * (len(terms.COMPOSED) + 1)
    assert hasattr(tk, "fused_rows")
    md = terms.markdown(rows, "python -m bench.terms")
    assert md.count("_composed | ") == len(terms.COMPOSED)
