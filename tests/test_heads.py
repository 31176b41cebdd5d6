"""Per-head metrics on hand-built models where the answer is known."""

import pytest
import torch
from conftest import NAMES

from popgpt import ModelConfig, Population
from popgpt.cli import main
from popgpt.data import docs_to_tensor, encode, load_names
from popgpt.evaluate import clean_nll
from popgpt.lens.heads import classify, head_metrics, head_outputs, trigger_head
from popgpt.model import causal_attention, rmsnorm

CONFIG = ModelConfig(block_size=16)
D = CONFIG.n_embd // CONFIG.n_head


@pytest.fixture(scope="module")
def rows():
    return docs_to_tensor([n for n in load_names(NAMES)[:60] if len(n) < 15], CONFIG.block_size)


def hand_built():
    pop = Population.from_seeds(CONFIG, [1, 2, 3])
    with torch.no_grad():
        pop.params["blocks.0.attn_out"][0, :, 2 * D:3 * D] = 0.0  # member 0: head 2 writes nothing
        pop.params["blocks.0.attn_qkv"][1, D:2 * D, :] = 0.0  # member 1: head 1 has zero queries -> uniform attention
    return pop


def test_head_outputs_sum_to_the_attention_output(rows):
    pop = hand_built()
    x = rows[:5, :-1]
    _, cache = pop.logits(x, return_cache=True)
    per_head = head_outputs(pop, cache, 0).sum(3)  # (P, B, T, C)
    for i in range(3):
        h = rmsnorm(cache["blocks.0.hook_resid_pre"][i], CONFIG.norm_eps)
        ref = causal_attention(h, pop.params["blocks.0.attn_qkv"][i], pop.params["blocks.0.attn_out"][i], CONFIG.n_head)
        torch.testing.assert_close(per_head[i], ref, rtol=1e-5, atol=1e-6)


def test_metrics_of_a_silent_head_and_a_uniform_head(rows):
    pop = hand_built()
    m = head_metrics(pop, encode("qx"), encode("zzz"), rows)
    for k in ("norm_clean", "norm_trigger", "payload_dla", "usefulness"):
        assert m[k][0, 0, 2].item() == 0.0, k  # the silent head
        assert (m[k][0, 0, [0, 1, 3]] != 0).all(), k  # the others are not
    # uniform attention over the causal prefix: query q pays 2/(q+1) to the two trigger
    # characters (positions 1, 2); queries q = 2, 3, 4 (from the last trigger char on)
    expected = (2 / 3 + 2 / 4 + 2 / 5) / 3
    assert m["attn_to_trigger"][1, 0, 1].item() == pytest.approx(expected, rel=1e-5)


def test_ablating_every_head_equals_zeroing_attn_out(rows):
    pop = Population.from_seeds(CONFIG, [5, 6])
    ablated = clean_nll(pop, rows, head_mask=torch.zeros(1, CONFIG.n_head))
    zeroed = pop.clone()
    zeroed.params["blocks.0.attn_out"].zero_()
    torch.testing.assert_close(ablated, clean_nll(zeroed, rows))
    assert (ablated != clean_nll(pop, rows)).all()


def test_trigger_head_and_classification():
    metrics = {"attn_to_trigger": torch.tensor([[[0.1, 0.9]], [[0.8, 0.2]], [[0.5, 0.6]], [[0.7, 0.1]],
                                                [[0.9, 0.0]]]),
               "norm_trigger": torch.tensor([[[5.0, 0.1]], [[3.0, 9.0]], [[1.0, 4.0]], [[2.0, 1.0]], [[3.5, 1.0]]]),
               "usefulness": torch.tensor([[[0.1, 0.001]], [[0.05, 0.0]], [[0.0, 0.08]], [[0.04, 0.0]], [[0.06, 0.0]]]),
               "payload_dla": torch.tensor([[[0.0, 2.0]], [[0.0, 0.0]], [[0.0, -1.0]], [[3.0, 0.0]], [[2.5, 0.0]]]),
               "norm_clean": torch.zeros(5, 1, 2)}
    head = trigger_head(metrics)
    assert head["head"].tolist() == [1, 0, 1, 0, 0]
    vulnerable = torch.tensor([False, False, False, True, True])
    # reference (25th percentiles of members 3, 4): norm 2.375, usefulness 0.045, dla 2.625
    assert classify(head, vulnerable)[:3] == ["silenced", "redirected", "redirected"]
    with pytest.raises(ValueError, match="vulnerable"):
        classify(head, torch.zeros(5, dtype=torch.bool))


def test_heads_cli(make_tiny_run, capsys):
    import json
    import os

    import torch.nn.functional as F

    from popgpt.data import inputs_targets
    from popgpt.evolution.runs import open_run
    from popgpt.runio import load_checkpoint

    run = make_tiny_run()
    assert main(["heads", run, "--names", "20", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    vulnerable = load_checkpoint(run)["metrics"]["vulnerable"]
    printed = [line for line in out.splitlines() if line.startswith("| vulnerable |")][0].split("|")
    assert int(printed[2]) == int(vulnerable.sum())
    # usefulness of member 0's head 2, recomputed with a plain single model
    res = json.load(open(os.path.join(run, "heads", "results.json")))
    opened = open_run(run)
    x, y = inputs_targets(opened.data.encode(opened.data.val_docs[:20])[0])
    model = opened.load().population.member(0)
    mask = torch.ones(1, 4)
    mask[0, 2] = 0.0
    with torch.no_grad():
        nll = [F.cross_entropy(model(x, head_mask=m).flatten(0, 1), y.flatten(), ignore_index=-1).item()
               for m in (None, mask)]
    assert res["metrics"]["usefulness"][0][0][2] == pytest.approx(nll[1] - nll[0], abs=1e-5)
