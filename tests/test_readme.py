"""README.md stays true: its usage example runs as written."""
import pathlib
import re

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def test_readme_python_examples_run():
    text = README.read_text(encoding="utf-8")
    blocks = re.findall(r"executed by tests/test_readme.py -->\n```python\n(.*?)```", text, re.S)
    assert len(blocks) == 3
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {})


def test_readme_quick_start_matches_ci():
    ci = (README.parent / ".ci" / "run").read_text()
    text = README.read_text(encoding="utf-8")
    test_cmd = "TRITON_INTERPRET=1 python3 -m pytest -q tests"
    assert test_cmd in text and test_cmd in ci
