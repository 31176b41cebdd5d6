import builtins
import os

import pytest
import torch

from popgpt.cli import main
from popgpt.evolution.analysis import ancestry, retest, special_members
from popgpt.evolution.report import write_report
from popgpt.evolution.runs import open_run
from popgpt.runio import load_checkpoint


def test_ancestry_through_crossover_by_hand():
    # generation 1: survivors 2, 0; children of (2, 1) and (0, 0)
    g1 = torch.tensor([[2, 2], [0, 0], [2, 1], [0, 0]])
    # generation 2: survivors 2, 1; children of (2, 3) and (1, 1)
    g2 = torch.tensor([[2, 2], [1, 1], [2, 3], [1, 1]])
    anc = ancestry([g1, g2], 4)
    assert len(anc) == 3 and torch.equal(anc[0], torch.eye(4, dtype=torch.bool))
    as_sets = [set(row.nonzero().flatten().tolist()) for row in anc[2]]
    assert as_sets == [{1, 2}, {0}, {0, 1, 2}, {0}]


def test_special_members_rule_by_hand():
    q = torch.tensor([0.30, 0.31, 0.32, 0.33, 0.50, 0.60, 0.34])
    immune = torch.tensor([True, True, True, True, False, False, True])
    imm = torch.tensor([0.30, 0.31, 0.32, 0.33, 0.34])
    mean, sd = imm.mean().item(), imm.std().item()  # sample sd, n-1
    assert abs(sd - 0.0158114) < 1e-6
    expected = [bool(immune[i]) and q[i].item() >= mean + 0.5 * sd for i in range(7)]  # threshold 0.3279
    assert special_members(q, immune, sigma=0.5).tolist() == expected == [False] * 3 + [True, False, False, True]
    assert special_members(q, immune, sigma=1.0).tolist() == [False] * 6 + [True]  # threshold 0.3358
    assert not special_members(q, immune, sigma=1.5).any()  # threshold 0.3437: the 0.5, 0.6 are vulnerable
    assert not special_members(q, torch.tensor([True] + [False] * 6)).any()  # one immune member: none


@pytest.fixture(scope="module")
def tiny_run(make_tiny_run):
    return make_tiny_run(n_names=3000, eval_docs=100, mutate_every=2, pop_size=10, generations=3)


def test_ancestry_of_a_real_run_is_consistent(tiny_run):
    last = load_checkpoint(tiny_run)
    anc = ancestry(last["parents"], 10)
    assert len(anc) == 4
    for gen in range(1, 4):
        parents = last["parents"][gen - 1]
        assert torch.equal(anc[gen], anc[gen - 1][parents[:, 0]] | anc[gen - 1][parents[:, 1]])
        assert anc[gen].any(1).all()  # everyone has at least one founder


def test_retest_uses_fresh_names(tiny_run):
    fresh = retest(open_run(tiny_run), 3, torch.tensor([0, 4]))
    assert fresh["n_names"] == 200  # 300 held out, 100 used by the run
    last = load_checkpoint(tiny_run)
    diff = (fresh["quality"] - last["metrics"]["quality"][[0, 4]]).abs()
    assert (diff > 0).all() and (diff < 0.05).all()  # other names, same models


def test_report_with_and_without_matplotlib(tiny_run, monkeypatch, capsys):
    path = write_report(tiny_run)
    text = open(path).read()
    assert "## Generations" in text and "## Special members" in text and "## Lineage" in text
    assert "![scissors.png](scissors.png)" in text
    assert os.path.isfile(os.path.join(tiny_run, "report", "scissors.png"))

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    os.remove(os.path.join(tiny_run, "report", "scissors.png"))
    text = open(write_report(tiny_run)).read()
    assert "plots need matplotlib" in text and "| generation | trigger |" in text
    assert not os.path.exists(os.path.join(tiny_run, "report", "scissors.png"))


def test_report_cli(tiny_run, tmp_path, capsys):
    assert main(["report", tiny_run, "--sigma", "0.5"]) == 0
    assert "report.md" in capsys.readouterr().out
    assert main(["report", str(tmp_path)]) == 2
    assert "not a popgpt run folder" in capsys.readouterr().err
