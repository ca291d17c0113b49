"""The README's library example runs as written."""

import os
import re


def test_readme_example_runs(capsys):
    text = open(os.path.join(os.path.dirname(__file__), "..", "README.md")).read()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks, "README.md has no python example"
    exec(compile(blocks[0], "README.md", "exec"), {})
    assert "trainable params:" in capsys.readouterr().out
