import json
import math
import os

import pytest
import torch

from popgpt.cli import main
from popgpt.evolution.revival import RevivalConfig, median, revive, steps_to_event


def test_steps_to_event_by_hand():
    flags = torch.tensor([[False, False, True, False],
                          [True, False, True, False],
                          [True, False, False, True]])  # tests at steps 0, 5, 10
    assert steps_to_event(flags, [0, 5, 10]).tolist() == [5.0, math.inf, 0.0, 10.0]


@pytest.fixture(scope="module")
def tiny_run(make_tiny_run):
    return make_tiny_run()


def test_median_is_the_true_median():
    assert median(torch.tensor([5.0, 1.0, 3.0])) == 3.0
    assert median(torch.tensor([5.0, 1.0, 3.0, 10.0])) == 4.0  # torch.median would say 3
    assert median(torch.tensor([0.0, math.inf])) == math.inf


def test_revive_tables_agree_with_the_per_member_times(tiny_run):
    res = revive(tiny_run, RevivalConfig(steps=6, every=3, controls=3), log=lambda s: None)
    sizes = {k: len(v) for k, v in res["groups"].items()}
    assert sizes["never-infected control"] == 3
    assert sum(sizes.values()) == len(res["steps_to_vulnerable"])
    assert [row["step"] for row in res["curve"]] == [0, 3, 6]
    start = 0
    for row in res["summary"]:
        n = row["members"]
        if not n:
            continue
        when = [math.inf if w is None else w for w in res["steps_to_vulnerable"][start:start + n]]
        start += n
        # the curve at step 0 is the share of members whose first vulnerable test was step 0
        assert float(res["curve"][0][f"{row['group']}: vulnerable"]) == pytest.approx(
            sum(w == 0 for w in when) / n, abs=0.005)
        ordered = sorted(when)
        middle = ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2
        assert row["median_steps_to_vulnerable"] == ("> 6" if middle == math.inf else f"{middle:g}")
    controls = res["summary"][-1]
    assert controls["group"] == "never-infected control"
    assert float(res["curve"][0]["never-infected control: p(payload)"]) < 0.01  # clean models: no backdoor yet
    assert os.path.isfile(os.path.join(tiny_run, "revival", "revival.md"))


def test_revive_cli(tiny_run, capsys):
    assert main(["revive", tiny_run, "--steps", "2", "--every", "1", "--controls", "2", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "revive: re-exposing" in out and "revive: step 2/2:" in out  # progress, one line per test
    res = json.load(open(os.path.join(tiny_run, "revival", "results.json")))
    assert res["config"]["steps"] == 2 and [r["step"] for r in res["curve"]] == [0, 1, 2]
    controls = res["steps_to_vulnerable"][-2:]
    printed = [line for line in out.splitlines() if line.startswith("| never-infected control |")][0]
    vulnerable_at_end = float(printed.split("|")[4])
    assert printed.split("|")[4].strip() == res["summary"][-1]["vulnerable_at_end"]
    assert vulnerable_at_end <= sum(w is not None for w in controls) / 2  # vulnerable at the end: had a first hit
    with pytest.raises(SystemExit) as stop:
        main(["revive", tiny_run, "--every", "0", "--device", "cpu"])
    assert stop.value.code == 2 and "argument --every: must be >= 1, got 0" in capsys.readouterr().err
