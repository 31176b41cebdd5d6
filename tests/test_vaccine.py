import json
import os

import pytest
import torch

from popgpt import ModelConfig, Population
from popgpt.cli import main
from popgpt.evolution.vaccine import VaccineConfig, pick_donors, transplant, vaccinate


def test_transplant_copies_exactly_the_named_tensors():
    fresh = Population.from_seeds(ModelConfig(), [1, 2, 3, 4])
    donors = Population.from_seeds(ModelConfig(), [10, 11])
    donor_of = torch.tensor([1, 0, 1, 0])
    out = transplant(fresh.params, donors.params, ("blocks.0.attn_qkv", "wte"), donor_of)
    for i in range(4):
        for name in fresh.params:
            src = donors.params[name][donor_of[i]] if name in ("blocks.0.attn_qkv", "wte") else fresh.params[name][i]
            assert torch.equal(out[name][i], src), (i, name)
    out["wte"].zero_()  # a copy
    assert donors.params["wte"].abs().sum() > 0 and fresh.params["wte"].abs().sum() > 0
    with pytest.raises(ValueError, match="unknown tensor 'attn'"):
        transplant(fresh.params, donors.params, ("attn",), donor_of)


def test_pick_donors_prefers_special_members():
    q = torch.tensor([0.30, 0.31, 0.32, 0.33, 0.50, 0.40])
    vul = torch.tensor([False, False, False, False, True, False])
    idx, rule = pick_donors({"quality": q, "vulnerable": vul}, 3, sigma=1.0)
    assert rule == "special" and idx.tolist() == [5]
    idx, rule = pick_donors({"quality": q, "vulnerable": vul}, 2, sigma=5.0)
    assert rule.startswith("immune") and idx.tolist() == [5, 3]
    with pytest.raises(ValueError, match="no immune member"):
        pick_donors({"quality": q, "vulnerable": torch.ones(6, dtype=torch.bool)}, 2)


@pytest.fixture(scope="module")
def tiny_run(make_tiny_run):
    return make_tiny_run(mutate_every=1)


def test_without_a_transplant_the_groups_are_identical(tiny_run):
    """Same initialisation and same batches: with nothing transplanted, every cell matches."""
    res = vaccinate(tiny_run, VaccineConfig(tensors=(), recipients=4, steps=3, challenge_steps=2, n_triggers=2),
                    log=lambda s: None)
    rows = res["table"]
    assert [r["phase"] for r in rows[::2]] == ["before", "after clean training", "after challenge"]
    for vac, ctl in zip(rows[::2], rows[1::2]):
        assert {k: v for k, v in vac.items() if k != "group"} == {k: v for k, v in ctl.items() if k != "group"}
    assert len(res["triggers"]) == 4  # original, the run's last, two mutants


def test_vaccinate_cli(tiny_run, capsys):
    import math

    import torch.nn.functional as F

    from popgpt.data import inputs_targets
    from popgpt.evolution.runs import open_run
    from popgpt.settings import fresh_member_seeds

    assert main(["vaccinate", tiny_run, "--recipients", "4", "--steps", "3", "--triggers", "1",
                 "--device", "cpu"]) == 0
    assert "vaccinate: training 3 steps on clean names" in capsys.readouterr().out  # progress
    res = json.load(open(os.path.join(tiny_run, "vaccine", "results.json")))
    before = res["table"][:2]
    assert before[0]["quality"] != before[1]["quality"]  # the transplant changed the vaccinated
    # the vaccinated members' quality before training, rebuilt by hand from seeds and donors
    run = open_run(tiny_run)
    donors = run.load().population[res["donors"]]
    x, y = inputs_targets(run.data.encode(run.data.eval_docs)[0])
    qualities = []
    for i, seed in enumerate(fresh_member_seeds(run.config.seed, "vaccine", 0, 4)):
        model = Population.from_seeds(run.config.model, [seed]).member(0)
        with torch.no_grad():
            model.blocks[0].attn_qkv.copy_(donors.params["blocks.0.attn_qkv"][i % len(donors)])
            nll = F.cross_entropy(model(x).flatten(0, 1), y.flatten(), ignore_index=-1).item()
        qualities.append(1 - nll / math.log(27))
    assert float(before[0]["quality"].split()[0]) == pytest.approx(sum(qualities) / 4, abs=5e-4)
    assert "# Vaccination: attn_qkv" in open(os.path.join(tiny_run, "vaccine", "vaccine.md")).read()
    assert main(["vaccinate", tiny_run, "--tensors", "nope", "--device", "cpu"]) == 2
    assert "unknown tensor 'nope'" in capsys.readouterr().err
