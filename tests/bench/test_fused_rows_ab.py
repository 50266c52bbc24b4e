"""``bench.fused_rows_ab`` at a toy shape: every row measured, the two-pass rows really two-pass, the C++ module left
as it was."""
import json

import pytest

from rlsd_kernels.backends.logits import cpp

pytestmark = pytest.mark.skipif(not cpp.available(), reason="C++ backend could not be built")


def test_ab_rows_and_switch_restored(tmp_path, monkeypatch):
    from bench import fused_rows_ab

    served = []
    real = cpp.fused_rows
    monkeypatch.setattr(cpp, "fused_rows", lambda *a, **k: served.append(1) or real(*a, **k))
    assert fused_rows_ab.main(["--shapes", "64x3000", "--dtypes", "float32", "--reps", "2", "--out",
                               str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "fused-rows-ab-cpu.json").read_text())
    assert [r["row"] for r in rows] == list(fused_rows_ab.ROWS)
    assert all(r["fwd_bwd_ms"] > 0 and r["speedup_vs_two_pass"] > 0 for r in rows)
    assert len(served) == 3  # the one_visit row's warm-up and 2 reps; the two-pass rows never reached it
    assert hasattr(cpp, "fused_rows") and hasattr(cpp, "fused_inplace")
    assert (tmp_path / "fused-rows-ab-cpu.md").read_text().count("64x3000 | float32") == 4  # one table row each
