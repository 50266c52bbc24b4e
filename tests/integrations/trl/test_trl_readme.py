"""README.md's "Use it in TRL" block runs as written and trains for its 3 steps."""
import math
import pathlib
import re

import pytest

pytest.importorskip("trl")

README = pathlib.Path(__file__).resolve().parents[3] / "README.md"


def test_readme_trl_block_trains():
    text = README.read_text(encoding="utf-8")
    blocks = re.findall(r"executed by tests/integrations/trl/test_trl_readme.py -->\n```python\n(.*?)```", text, re.S)
    assert len(blocks) == 1
    namespace = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    trainer = namespace["trainer"]
    assert trainer.state.global_step == 3
    logged = [h for h in trainer.state.log_history if "rlsd/weight_mean" in h]
    assert len(logged) == 3 and all(math.isfinite(h["loss"]) and math.isfinite(h["rlsd/weight_mean"]) for h in logged)
