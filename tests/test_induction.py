"""Induction scores, phase steps, the causal check and popgpt induction, on cases with known answers."""

import csv
import json
import math
import os

import pytest
import torch
from conftest import NAMES

from popgpt import ModelConfig, Population
from popgpt.cli import main
from popgpt.data import BOUNDARY, IGNORE, load_names
from popgpt.lens.cache import Edit
from popgpt.lens.induction import (
    InductionConfig,
    causal_check,
    copy_losses,
    first_step,
    head_scores,
    phase_steps,
    repeat_rows,
    repeated_sequences,
    seed_dependence,
)

CFG = ModelConfig(n_layer=2, block_size=21)
N = 6  # scoring string length: sequences of 13 tokens


@pytest.fixture(scope="module")
def pop():
    return Population.from_seeds(CFG, [11, 12, 13])


@pytest.fixture(scope="module")
def seqs():
    return repeated_sequences(5, N, torch.Generator().manual_seed(0))


def test_repeat_rows_hold_a_string_written_twice_after_a_prefix():
    rows = repeat_rows(200, 3, 6, 20, torch.Generator().manual_seed(1))
    prefixes = set()
    for row in rows.tolist():
        assert row[0] == BOUNDARY
        end = row.index(BOUNDARY, 1)
        assert all(t == IGNORE for t in row[end + 1:])
        letters = row[1:end]
        found = [k for k in range(3, 7) if len(letters) >= 2 * k and letters[-k:] == letters[-2 * k:-k]]
        assert found, row
        prefixes.add(len(letters) - 2 * found[-1])
    assert len(prefixes) > 5  # the repeat starts at many positions


def fixed_pattern(kind: str, T: int) -> torch.Tensor:
    """(T, T) causal pattern putting all mass on one key per query."""
    n = (T - 1) // 2
    pat = torch.zeros(T, T)
    for q in range(T):
        if kind == "previous":
            k = max(q - 1, 0)
        elif kind == "induction":
            k = q - n + 1 if q > n else q
        else:
            k = q - n if q > n else q
        pat[q, k] = 1.0
    return pat


@pytest.mark.parametrize("kind", ["previous", "duplicate", "induction"])
def test_scores_of_written_in_patterns(pop, seqs, kind):
    T = seqs.shape[1]
    pat = fixed_pattern(kind, T)
    edit = Edit("blocks.1.attn.hook_pattern", torch.ones(3, 1, 1, 1, 1, dtype=torch.bool),
                pat.expand(3, 1, 4, T, T).clone())
    s = head_scores(pop, seqs, [edit])
    assert torch.allclose(s[kind][:, 1], torch.ones(3, 4))
    for other in {"previous", "duplicate", "induction"} - {kind}:
        assert s[other][:, 1].max() < 0.2  # only a few queries coincide (previous: query n+1 on key n)
    assert s["previous"][:, 0].max() < 0.9  # layer 0 untouched: a random model's scores


def test_scores_and_copy_losses_equal_single_models(pop, seqs):
    s = head_scores(pop, seqs)
    n = N
    for i in range(3):
        logits, cache = pop.member(i)(seqs, return_cache=True)
        for layer in range(2):
            pat = cache[f"blocks.{layer}.attn.hook_pattern"]  # (B, H, T, T)
            ind = torch.stack([pat[:, :, n + j, j + 1] for j in range(1, n + 1)], -1).mean((0, 2))
            prev = torch.stack([pat[:, :, t, t - 1] for t in range(1, 2 * n + 1)], -1).mean((0, 2))
            torch.testing.assert_close(s["induction"][i, layer], ind, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(s["previous"][i, layer], prev, rtol=1e-5, atol=1e-6)
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), seqs[:, 1:], reduction="none")
        assert s["loss_first"][i].item() == pytest.approx(nll[:, 1:n].mean().item(), rel=1e-5)
        assert s["loss_second"][i].item() == pytest.approx(nll[:, n + 1:].mean().item(), rel=1e-5)


def test_copy_losses_of_a_perfect_copier():
    seqs = repeated_sequences(4, 5, torch.Generator().manual_seed(3))
    logits = torch.full((1, 4, 11, 27), -30.0)
    logits[0, torch.arange(4)[:, None], torch.arange(10), seqs[:, 1:]] = 30.0  # knows every next token
    first, second = copy_losses(logits, seqs)
    assert first.item() < 1e-6 and second.item() < 1e-6


def test_first_step_and_phase_steps():
    steps = torch.tensor([0, 10, 20, 30])
    values = torch.tensor([[0.1, 0.1, 0.0], [0.5, 0.2, 0.0], [0.3, 0.6, 0.0], [0.7, 0.7, 0.1]])
    out = first_step(values, steps, lambda v: v >= 0.4)
    assert out[:2].tolist() == [10.0, 20.0] and math.isnan(out[2])
    cfg = InductionConfig(score_threshold=0.4, icl_loss=1.0)
    traj = {"steps": steps, "induction": values[:, :, None, None].expand(4, 3, 2, 4),
            "loss_second": torch.tensor([[3.0, 3.0, 3.0], [2.0, 0.9, 3.0], [0.5, 0.5, 3.0], [0.4, 0.4, 2.0]])}
    p = phase_steps(traj, cfg)
    assert p["phase_step"][:2].tolist() == [10.0, 20.0] and p["loss_step"][:2].tolist() == [20.0, 10.0]


def test_seed_dependence_separates_init_from_order():
    layout = [{"task": "repeat", "init": i, "order": o} for i in range(3) for o in range(2)]
    by_init = torch.tensor([100.0, 100.0, 200.0, 200.0, 300.0, 300.0])
    s = seed_dependence(by_init, layout, "repeat")
    assert s["init_share"] == pytest.approx(1.0) and s["order_share"] == pytest.approx(0.0)
    assert seed_dependence(torch.full((6,), float("nan")), layout, "repeat")["n"] == 0


def test_causal_check_ablates_the_detected_heads_and_one_other(pop, seqs):
    induction = torch.zeros(3, 2, 4)
    induction[0, 1, 2] = 0.9  # member 0: one induction head
    induction[1, 1, 0], induction[1, 1, 3] = 0.5, 0.6  # member 1: two
    induction[2, 0, 1] = 0.2  # member 2: none passes; its best head is ablated
    out = causal_check(pop, seqs, induction, 0.4, torch.Generator().manual_seed(0))
    assert out["detected"].tolist() == [True, True, False]
    assert out["induction_heads"].flatten(1).nonzero().tolist() == [[0, 6], [1, 4], [1, 7], [2, 1]]
    assert (out["random_head"].flatten(1).sum(1) == 1).all()
    assert not (out["random_head"] & out["induction_heads"]).any()
    for i in range(3):
        model = pop.member(i)
        for label in ("induction", "random"):
            mask = 1.0 - out[f"{label}_heads" if label == "induction" else "random_head"][i].float()
            with torch.no_grad():
                ref = copy_losses(model(seqs, head_mask=mask)[None], seqs)[1] - copy_losses(model(seqs)[None], seqs)[1]
            assert out[f"{label}_second"][i].item() == pytest.approx(ref.item(), abs=1e-5)


def _run(tmp_path, name, *extra):
    out = str(tmp_path / name)
    names = tmp_path / "names.txt"
    if not names.exists():
        names.write_text("\n".join(load_names(NAMES)[:400]) + "\n")
    argv = ["induction", "--data", str(names), "--depths", "1,2", "--inits", "2", "--orders", "1", "--steps", "6",
            "--every", "3", "--eval-seqs", "8", "--block-size", "21", "--threads", "1", "--out", out, *extra]
    assert main(argv) == 0
    return out


def test_induction_cli_writes_its_tables_and_repeats_itself(tmp_path, capsys):
    out = _run(tmp_path, "a")
    printed = capsys.readouterr().out
    assert "grew induction heads" in printed
    for f in ("induction.json", "results.json", "members.csv", "induction.md"):
        assert os.path.isfile(os.path.join(out, f)), f
    members = list(csv.DictReader(open(os.path.join(out, "members.csv"))))
    assert len(members) == 2 * 2 * 2  # depths x tasks x inits
    res = json.load(open(os.path.join(out, "results.json")))
    assert [r["members"] for r in res["table"]] == [2, 2, 2, 2]
    assert res["trajectories (per member: best head's score over checkpoints)"][0]["steps"] == [0, 3, 6]
    again = _run(tmp_path, "b")
    assert open(os.path.join(again, "members.csv")).read() == open(os.path.join(out, "members.csv")).read()


@pytest.mark.parametrize("flags,message", [(["--tasks", "repeat,copy"], "--tasks"),
                                           (["--max-len", "16"], "--max-len"),
                                           (["--depths", "1,x"], "--depths"),
                                           (["--score-threshold", "1.5"], "--score-threshold")])
def test_induction_bad_flags_name_the_flag(tmp_path, capsys, flags, message):
    assert main(["induction", "--out", str(tmp_path / "x"), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("popgpt: error:") and message in err
    assert not os.path.exists(tmp_path / "x")


def test_induction_refuses_a_folder_it_did_not_write(tmp_path, capsys):
    (tmp_path / "mine.txt").write_text("keep")
    assert main(["induction", "--out", str(tmp_path), "--steps", "2"]) == 2
    assert "did not write" in capsys.readouterr().err
