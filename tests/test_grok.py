"""Grokking of modular addition: task, batched model = single models, Fourier analysis, grokking times, CLI."""

import json
import math
import os

import pytest
import torch

from popgpt.cli import main
from popgpt.grok.analysis import ablation_losses, embedding_spectrum, first_step, key_frequencies, sum_directions
from popgpt.grok.task import GrokConfig, answer_logits, answer_loss, init_population, pairs, splits, train
from popgpt.model import MicroGPT


def test_pairs_and_per_member_splits():
    x, y = pairs(7)
    assert x.shape == (49, 3) and bool((x[:, 2] == 7).all())
    assert torch.equal(y, (x[:, 0] + x[:, 1]) % 7)
    cfg = GrokConfig(p=7, members=3, train_frac=0.3)
    s = splits(cfg)
    assert s.shape == (3, 15)  # round(0.3 * 49)
    assert all(len(set(row.tolist())) == 15 for row in s)
    assert not torch.equal(s[0], s[1])  # every member its own split
    assert torch.equal(s, splits(cfg))  # same seed, same splits


@pytest.mark.parametrize("norm", [False, True])
def test_batched_logits_and_loss_equal_single_models(norm):
    cfg = GrokConfig(p=11, members=3, d_model=16, n_head=4, norm=norm, init_std=0.2)
    pop = init_population(cfg)
    x, y = pairs(11)
    batched = answer_logits(pop.logits(x), 11)  # (P, p^2, p)
    losses = answer_loss(11)(pop.logits(x[None].expand(3, -1, -1)), y[None].expand(3, -1))
    for i in range(3):
        model = MicroGPT(cfg.model)
        model.load_state_dict({k: v[i] for k, v in pop.params.items()})
        single = model(x)[:, -1, :11]
        torch.testing.assert_close(batched[i], single, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(losses[i], torch.nn.functional.cross_entropy(single, y), atol=1e-5, rtol=1e-5)


def test_fourier_analysis_recovers_a_hand_built_embedding_frequency():
    p, k = 31, 7
    a = torch.arange(p, dtype=torch.float)
    wte = torch.zeros(2, p + 1, 8)
    wte[0, :p, 0], wte[0, :p, 1] = torch.cos(2 * math.pi * k * a / p), torch.sin(2 * math.pi * k * a / p)
    wte[0, p] = 5.0  # the "=" row is not a number: ignored
    wte[1, :p, 3] = torch.cos(2 * math.pi * 3 * a / p) + 0.5 * torch.sin(2 * math.pi * 11 * a / p)
    spectrum = embedding_spectrum(wte, p)
    assert spectrum.shape == (2, 15)
    torch.testing.assert_close(spectrum.sum(1), torch.ones(2, dtype=torch.float64))  # Parseval
    assert spectrum[0, k - 1] == pytest.approx(1.0)
    assert key_frequencies(spectrum, 0.1) == [[7], [3, 11]]
    assert spectrum[1, 2] == pytest.approx(0.8) and spectrum[1, 10] == pytest.approx(0.2)


def test_restricted_and_excluded_loss_on_a_pure_frequency_logit_table():
    # logits that are exactly cos(w_k (a + b - c)): all their energy lies on frequency k's a+b directions
    p, k = 13, 4
    d = sum_directions(p, [k])
    assert d.shape == (2, p * p)
    torch.testing.assert_close(d @ d.T, torch.eye(2, dtype=torch.float64))
    x, y = pairs(p)
    c = torch.arange(p, dtype=torch.float64)
    logits = 8 * torch.cos(2 * math.pi * k * ((x[:, 0] + x[:, 1]).double()[:, None] - c) / p)
    centred = logits - logits.mean(0)
    on = d.T @ (d @ centred)
    torch.testing.assert_close(on, centred)


def test_grokking_time_on_a_synthetic_accuracy_curve():
    steps = [0, 100, 200, 300, 400]
    curve = torch.tensor([[0.1, 0.1, 0.2], [0.5, 0.995, 0.3], [0.99, 1.0, 0.4], [0.991, 1.0, 0.5],
                          [1.0, 1.0, 0.9]])  # (E, P)
    got = first_step(curve, steps, 0.99)
    assert got[0] == 300 and got[1] == 100  # 0.99 itself does not pass "> 0.99"
    assert math.isnan(got[2])


def test_a_tiny_run_reaches_full_train_accuracy():
    cfg = GrokConfig(p=7, members=2, d_model=16, n_head=2, train_frac=0.5, steps=150, lr=1e-2, weight_decay=0.1,
                     init_std=0.2, eval_every=50)
    run = train(cfg)
    assert run["steps"] == [0, 50, 100, 150]
    assert bool((run["history"]["train_acc"][-1] == 1.0).all()), run["history"]["train_acc"]
    assert run["history"]["train_acc"][0].max() < 0.5
    # batched training equals each member trained alone (members independent)
    alone = train(GrokConfig(**{**vars(cfg), "members": 1}))
    torch.testing.assert_close(alone["params"]["wte"][0], run["params"]["wte"][0], atol=1e-5, rtol=1e-4)
    keys = key_frequencies(embedding_spectrum(run["params"]["wte"], 7), 0.05)
    abl = ablation_losses(run["params"], cfg, keys, run["mask"])
    assert abl["restricted_loss"].shape == (2,) and bool((abl["logit_share"] <= 1 + 1e-9).all())


def test_grok_cli_writes_tables_and_refuses_bad_flags(tmp_path, capsys):
    out = str(tmp_path / "g")
    assert main(["grok", "--preset", "quick", "--p", "7", "--members", "2", "--d-model", "8", "--steps", "20",
                 "--eval-every", "10", "--out", out, "--threads", "1"]) == 0
    res = json.load(open(os.path.join(out, "results.json")))
    assert len(res["rows"]) == 2 and res["steps"] == [0, 10, 20]
    assert os.path.isfile(os.path.join(out, "grok.md"))
    assert main(["grok", "--p", "2", "--out", str(tmp_path / "h")]) == 2
    assert "popgpt: error: invalid configuration: p must be >= 3" in capsys.readouterr().err
    assert main(["grok", "--d-model", "10", "--n-head", "4", "--out", str(tmp_path / "h")]) == 2
    assert "not divisible" in capsys.readouterr().err
