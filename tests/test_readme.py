"""README's Python example runs as written."""

import os
import re

from conftest import NAMES, ROOT


def test_readme_python_example_runs(tmp_path, monkeypatch):
    with open(os.path.join(ROOT, "README.md")) as f:
        blocks = re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)
    assert blocks, "README.md has no python example"
    os.symlink(NAMES, tmp_path / "names.txt")
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    assert namespace["losses"].shape == (100, 16)
    assert namespace["results"]["final"]["generation"] == 2
    assert os.path.isfile(tmp_path / "runs" / "api-example" / "generations.csv")
