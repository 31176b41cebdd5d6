"""README's Python example runs as written."""

import os
import re

import pytest
from conftest import NAMES, ROOT

from popgpt.runio import load_checkpoint


@pytest.mark.slow
def test_readme_python_example_runs(tmp_path, monkeypatch):
    with open(os.path.join(ROOT, "README.md")) as f:
        blocks = re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)
    assert blocks, "README.md has no python example"
    os.symlink(NAMES, tmp_path / "names.txt")
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    losses = namespace["losses"]
    assert losses.shape == (100, 16)
    assert (losses[-10:].mean(0) < losses[:10].mean(0)).all()  # every member learned
    assert namespace["results"]["final"]["generation"] == 2
    assert os.path.isfile(tmp_path / "runs" / "api-example" / "generations.csv")
    final = load_checkpoint(str(tmp_path / "runs" / "api-example"))["metrics"]
    assert namespace["results"]["final"]["immune_frac"] == pytest.approx(float((~final["vulnerable"]).float().mean()))
    assert namespace["results"]["final"]["fitness_all"] == pytest.approx(float(final["quality"].mean()), rel=1e-6)


def test_microscope_example_runs():
    with open(os.path.join(ROOT, "docs", "lens.md")) as f:
        blocks = re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)
    namespace = {}
    exec(compile(blocks[0], "docs/lens.md", "exec"), namespace)
    assert namespace["useful"].shape == (8, 2, 4) and namespace["effect"].shape == (8, 2, 4)
    assert namespace["effect"].abs().max() > 0
