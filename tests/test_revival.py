import json
import math
import os

import pytest
import torch

from popgpt.cli import main
from popgpt.revival import RevivalConfig, revive, steps_to_event


def test_steps_to_event_by_hand():
    flags = torch.tensor([[False, False, True, False],
                          [True, False, True, False],
                          [True, False, False, True]])  # tests at steps 0, 5, 10
    assert steps_to_event(flags, [0, 5, 10]).tolist() == [5.0, math.inf, 0.0, 10.0]


@pytest.fixture(scope="module")
def tiny_run(make_tiny_run):
    return make_tiny_run()


def test_revive_groups_and_curves(tiny_run):
    res = revive(tiny_run, RevivalConfig(steps=6, every=3, controls=3), log=lambda s: None)
    sizes = {k: len(v) for k, v in res["groups"].items()}
    assert sizes["never-infected control"] == 3
    assert sum(sizes.values()) == len(res["steps_to_vulnerable"])
    assert [row["step"] for row in res["curve"]] == [0, 3, 6]
    assert all(s is None or s in (0, 3, 6) for s in res["steps_to_vulnerable"])
    assert os.path.isfile(os.path.join(tiny_run, "revival", "revival.md"))


def test_revive_cli(tiny_run, capsys):
    assert main(["revive", tiny_run, "--steps", "2", "--every", "1", "--controls", "2", "--device", "cpu"]) == 0
    res = json.load(open(os.path.join(tiny_run, "revival", "results.json")))
    assert res["config"]["steps"] == 2
    assert main(["revive", tiny_run, "--every", "0", "--device", "cpu"]) == 2
