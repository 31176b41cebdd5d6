"""Induction task rows, scores with chance levels, planted circuits (positive and negative controls),
phase steps, the causal check and popgpt induction."""

import csv
import json
import math
import os

import pytest
import torch
from conftest import NAMES
from planted import induction_circuit, planted_config, population_of, window_head

from popgpt import ModelConfig, Population
from popgpt.cli import main
from popgpt.data import BOUNDARY, IGNORE, load_names
from popgpt.lens.cache import Edit
from popgpt.lens.induction import (
    InductionConfig,
    candidate_heads,
    causal_check,
    composition,
    first_step,
    phase_steps,
    seed_dependence,
)
from popgpt.lens.induction_scores import chance, head_scores, k_composition, k_composition_chance
from popgpt.lens.induction_task import TaskSpec, fixed_rows, scoring_rows, task_rows

SPEC = TaskSpec(min_len=3, max_len=8, gap_max=4, distinct=True, vocab=16, block_size=24)
PLANTED = planted_config(vocab=16, block_size=24)


@pytest.fixture(scope="module")
def rows():
    return scoring_rows(SPEC, 40, torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def planted():
    """Member 0: induction circuit; 1: a layer-1 window head 5 back; 2: a layer-0 window head 5 back."""
    return population_of(PLANTED, [induction_circuit(PLANTED), window_head(PLANTED, 5), window_head(PLANTED, 5, 0)])


@pytest.mark.parametrize("loss", ["first+second", "second"])
def test_task_rows_hold_a_string_twice_with_a_gap(loss):
    spec = TaskSpec(3, 6, 4, True, 40, 24)
    x, y = task_rows(spec, 300, loss, torch.Generator().manual_seed(1))
    lengths, gaps, prefixes = set(), set(), set()
    for xr, yr in zip(x, y):
        trained = (yr != IGNORE).nonzero().flatten()
        last = int(trained.max()) if loss == "first+second" else None
        tokens = xr[1:last].tolist() if last else None
        if loss == "first+second":
            assert yr[last] == BOUNDARY and (xr[1:last + 1] == yr[:last]).all()
            assert len(set(tokens)) < len(tokens)  # a string repeats
        else:
            assert trained.numel() >= 2 and (trained.diff() == 1).all()  # one run: the second copy's s_1..
            q = int(trained.min())  # holds s_0 of the second copy
            k = trained.numel() + 1
            s = xr[q:q + k].tolist()
            first = xr[:q].tolist()
            start = [i for i in range(len(first) - k + 1) if first[i:i + k] == s]
            assert len(start) == 1, (xr, s)
            lengths.add(k)
            gaps.add(q - start[0] - k)
            prefixes.add(start[0] - 1)
            assert len(set(xr[1:q + k].tolist()) - {BOUNDARY}) == q + k - 1 - k  # distinct but the repeat
            assert (yr[trained] == xr[trained + 1]).all()
    if loss == "second":
        assert lengths == set(range(3, 7)) and gaps == set(range(5)) and len(prefixes) > 3


def test_scoring_rows_point_at_the_twin(rows):
    q_tok = rows.tokens[rows.row, rows.query]
    assert (q_tok == rows.tokens[rows.row, rows.twin]).all() and (rows.twin < rows.query).all()
    assert (rows.target == rows.tokens[rows.row, rows.query + 1]).all()
    for b in range(len(rows.tokens)):
        real = rows.tokens[b, 1:rows.ends[b]].tolist()
        k = int((rows.row == b).sum()) + 1
        assert len(set(real)) == len(real) - k  # distinct tokens except the second copy


def test_task_spec_errors_name_the_flag():
    for spec, flag in [(TaskSpec(3, 8, 10, True, 16, 24), "--gap-max"), (TaskSpec(3, 8, 4, True, 10, 24), "--vocab"),
                       (TaskSpec(1, 8, 0, True, 30, 24), "--min-len"), (TaskSpec(3, 8, -1, True, 30, 24), "--gap-max")]:
        with pytest.raises(ValueError, match=flag):
            spec.check()
    with pytest.raises(ValueError, match="--loss"):
        task_rows(SPEC, 2, "third", torch.Generator())


def _pattern_edit(rows, P: int, H: int, key_of) -> Edit:
    """Layer-1 pattern: every scored query on ``key_of(twin)``, every other query on itself."""
    B, T = rows.tokens.shape
    pat = torch.eye(T).expand(B, T, T).clone()
    pat[rows.row, rows.query] = 0.0
    pat[rows.row, rows.query, key_of(rows.twin)] = 1.0
    return Edit("blocks.1.attn.hook_pattern", torch.ones(P, 1, 1, 1, 1, dtype=torch.bool),
                pat[None, :, None].expand(P, B, H, T, T).clone())


@pytest.mark.parametrize("offset", [0, 1, 3])
def test_written_in_patterns_score_where_they_point(rows, offset):
    cfg = ModelConfig(n_layer=2, block_size=24, vocab_size=16)
    pop = Population.from_seeds(cfg, [1, 2])
    s = head_scores(pop, rows, [_pattern_edit(rows, 2, 4, lambda t: t + offset)])
    assert torch.allclose(s["shifted"][:, 1], torch.ones(2, 4))
    assert (s["shift"][:, 1] == offset).all()
    name = {0: "duplicate", 1: "induction"}.get(offset)
    for score in ("duplicate", "induction"):
        assert torch.allclose(s[score][:, 1], torch.full((2, 4), 1.0 if score == name else 0.0))


def test_a_uniform_head_scores_chance(rows):
    cfg = ModelConfig(n_layer=2, block_size=24, vocab_size=16)
    pop = Population.from_seeds(cfg, [1])
    B, T = rows.tokens.shape
    uniform = torch.ones(T, T).tril() / torch.arange(1, T + 1)[:, None]
    edit = Edit("blocks.1.attn.hook_pattern", torch.ones(1, 1, 1, 1, 1, dtype=torch.bool),
                uniform.expand(1, B, 4, T, T).clone())
    s, c = head_scores(pop, rows, [edit]), chance(rows)
    for score in ("induction", "duplicate", "shifted", "previous"):
        torch.testing.assert_close(s[score][0, 1], torch.full((4,), c[score], dtype=torch.float32), rtol=1e-5, atol=0)
    assert 0.02 < c["induction"] < c["previous"] < 0.3


def test_scores_equal_single_models(rows):
    cfg = ModelConfig(n_layer=2, block_size=24, vocab_size=16)
    pop = Population.from_seeds(cfg, [11, 12, 13])
    s = head_scores(pop, rows)
    for i in range(3):
        logits, cache = pop.member(i)(rows.tokens, return_cache=True)
        for layer in range(2):
            pat = cache[f"blocks.{layer}.attn.hook_pattern"]  # (B, H, T, T)
            ind = pat[rows.row, :, rows.query, rows.twin + 1].mean(0)
            torch.testing.assert_close(s["induction"][i, layer], ind, rtol=1e-5, atol=1e-7)
        nll = torch.nn.functional.cross_entropy(logits[rows.row, rows.query], rows.target)
        assert s["loss_second"][i].item() == pytest.approx(nll.item(), rel=1e-5)


def test_planted_induction_circuit_is_found_near_its_ceiling(planted, rows):
    s = head_scores(planted, rows)
    assert s["induction"][0, 1, 0] > 0.95 and s["previous"][0, 0, 0] > 0.95  # ceiling 1: distinct tokens
    assert s["copying"][0, 1, 0] > 5.0 and s["loss_second"][0] < 0.05 < 1.0 < s["loss_first"][0]
    detected, heads = candidate_heads(s["induction"], 0.4)
    assert detected[0] and heads[0].nonzero().tolist() == [[1, 0]]
    comp = composition(planted, s, 0.4)
    assert comp["textbook"][0] and comp["k_composition"][0] > 2 * comp["k_chance"]
    out = causal_check(planted, rows, s, 0.4, torch.Generator().manual_seed(0))
    assert out["excluded"][0, 0, 0]  # the previous-token head it reads from is no control
    assert not out["random_head"][0, 0, 0] and not out["random_head"][0, 1, 0]
    assert out["induction_second"][0] > 2.0 and abs(out["random_second"][0]) < 0.05


def test_planted_window_heads_are_not_induction_heads(planted, rows):
    """A head attending 5 back scores 1.0 on the old fixed-length test set, not on scoring rows; and a
    layer-0 head never counts."""
    old = fixed_rows(40, 6, 16, torch.Generator().manual_seed(0))
    assert head_scores(planted, old)["induction"][1, 1, 0] > 0.95  # the false positive, planted
    assert head_scores(planted, old)["induction"][2, 0, 0] > 0.95
    s = head_scores(planted, rows)
    assert s["induction"][1, 1, 0] < 0.3 and s["induction"][2, 0, 0] < 0.3
    detected, _ = candidate_heads(head_scores(planted, old)["induction"], 0.4)
    assert detected.tolist() == [True, True, False]  # on the old set only layer >= 1 can be fooled
    detected, _ = candidate_heads(s["induction"], 0.4)
    assert detected.tolist() == [True, False, False]
    assert not composition(planted, s, 0.4)["textbook"][1:].any()


def test_k_composition_of_planted_and_random_heads(planted):
    kc = k_composition(planted)  # (P, H0, H1)
    chance_level = k_composition_chance(planted)
    assert kc[0, 0, 0] > 2 * chance_level
    assert (kc[1:] == 0).all()  # window heads: nothing written in the other layer
    rand = Population.from_seeds(planted.config, [5, 6, 7, 8])
    assert k_composition(rand).mean() == pytest.approx(chance_level, rel=0.25)  # random init: chance


def test_first_step_and_phase_steps():
    steps = torch.tensor([0, 10, 20, 30])
    values = torch.tensor([[0.1, 0.1, 0.0], [0.5, 0.2, 0.0], [0.3, 0.6, 0.0], [0.7, 0.7, 0.1]])
    out = first_step(values, steps, lambda v: v >= 0.4)
    assert out[:2].tolist() == [10.0, 20.0] and math.isnan(out[2])
    cfg = InductionConfig(score_threshold=0.4, icl_loss=1.0)
    induction = torch.zeros(4, 3, 2, 4)
    induction[:, :, 1] = values[:, :, None]
    induction[:, 2, 0] = 0.9  # member 2: a layer-0 head above the threshold does not count
    traj = {"steps": steps, "induction": induction,
            "loss_second": torch.tensor([[3.0, 3.0, 3.0], [2.0, 0.9, 3.0], [0.5, 0.5, 3.0], [0.4, 0.4, 2.0]])}
    p = phase_steps(traj, cfg)
    assert p["phase_step"][:2].tolist() == [10.0, 20.0] and math.isnan(p["phase_step"][2])
    assert p["loss_step"][:2].tolist() == [20.0, 10.0]


def test_seed_dependence_separates_init_from_order():
    layout = [{"task": "repeat", "init": i, "order": o} for i in range(3) for o in range(2)]
    by_init = torch.tensor([100.0, 100.0, 200.0, 200.0, 300.0, 300.0])
    s = seed_dependence(by_init, layout, "repeat")
    assert s["init_share"] == pytest.approx(1.0) and s["order_share"] == pytest.approx(0.0)
    assert seed_dependence(torch.full((6,), float("nan")), layout, "repeat")["n"] == 0


def test_causal_check_ablates_the_candidates_and_a_control(rows):
    cfg = ModelConfig(n_layer=2, block_size=24, vocab_size=16)
    pop = Population.from_seeds(cfg, [11, 12, 13])
    induction, previous = torch.zeros(3, 2, 4), torch.zeros(3, 2, 4)
    induction[0, 1, 2] = 0.9  # member 0: one induction head
    induction[1, 1, 0], induction[1, 1, 3] = 0.5, 0.6  # member 1: two
    induction[2, 0, 1], induction[2, 1, 3] = 0.9, 0.2  # member 2: layer 0 does not count; its best layer-1 head
    previous[:, 0, 1] = 0.8  # a previous-token head: never the control
    out = causal_check(pop, rows, {"induction": induction, "previous": previous}, 0.4,
                       torch.Generator().manual_seed(0))
    assert out["detected"].tolist() == [True, True, False]
    assert out["induction_heads"].flatten(1).nonzero().tolist() == [[0, 6], [1, 4], [1, 7], [2, 7]]
    assert (out["random_head"].flatten(1).sum(1) == 1).all()
    assert not (out["random_head"] & out["excluded"]).any() and out["excluded"][:, 0, 1].all()
    for i in range(3):
        model = pop.member(i)
        for label in ("induction", "random"):
            mask = 1.0 - out[f"{label}_heads" if label == "induction" else "random_head"][i].float()
            with torch.no_grad():
                after, before = model(rows.tokens, head_mask=mask), model(rows.tokens)
            nll = [torch.nn.functional.cross_entropy(lg[rows.row, rows.query], rows.target) for lg in (after, before)]
            assert out[f"{label}_second"][i].item() == pytest.approx((nll[0] - nll[1]).item(), abs=1e-5)


def _run(tmp_path, name, *extra):
    out = str(tmp_path / name)
    names = tmp_path / "names.txt"
    if not names.exists():
        names.write_text("\n".join(load_names(NAMES)[:400]) + "\n")
    argv = ["induction", "--data", str(names), "--depths", "1,2", "--inits", "2", "--orders", "1", "--steps", "6",
            "--every", "3", "--eval-seqs", "8", "--block-size", "21", "--max-len", "8", "--gap-max", "4",
            "--threads", "1", "--out", out, *extra]
    assert main(argv) == 0
    return out


def test_induction_cli_writes_its_tables_and_repeats_itself(tmp_path, capsys):
    out = _run(tmp_path, "a")
    printed = capsys.readouterr().out
    assert "grew induction heads (layer >= 1)" in printed and "(chance 0." in printed
    for f in ("induction.json", "results.json", "members.csv", "induction.md"):
        assert os.path.isfile(os.path.join(out, f)), f
    members = list(csv.DictReader(open(os.path.join(out, "members.csv"))))
    assert len(members) == 2 * 2 * 2  # depths x tasks x inits
    res = json.load(open(os.path.join(out, "results.json")))
    assert [r["members"] for r in res["table"]] == [2, 2, 2, 2]
    assert res["trajectories (per member: best head's score over checkpoints)"][0]["steps"] == [0, 3, 6]
    again = _run(tmp_path, "b")
    assert open(os.path.join(again, "members.csv")).read() == open(os.path.join(out, "members.csv")).read()


def test_induction_cli_task_and_model_flags(tmp_path, capsys):
    out = _run(tmp_path, "c", "--tasks", "repeat", "--distinct-letters", "--loss", "second", "--vocab", "40",
               "--attn-only", "--n-embd", "16", "--n-head", "2")
    cfg = json.load(open(os.path.join(out, "results.json")))["config"]
    assert (cfg["distinct_letters"], cfg["loss"], cfg["vocab"], cfg["attn_only"], cfg["n_embd"]) == (
        True, "second", 40, True, 16)
    assert "attention only" in capsys.readouterr().out


@pytest.mark.parametrize("flags,message", [(["--tasks", "repeat,copy"], "--tasks"),
                                           (["--max-len", "16"], "--max-len"),
                                           (["--depths", "1,x"], "--depths"),
                                           (["--score-threshold", "1.5"], "--score-threshold"),
                                           (["--loss", "first"], "--loss"),
                                           (["--vocab", "20"], "--vocab"),
                                           (["--n-embd", "30"], "--n-head"),
                                           (["--n-layer", "3", "--depths", "2"], "--n-layer")])
def test_induction_bad_flags_name_the_flag(tmp_path, capsys, flags, message):
    assert main(["induction", "--out", str(tmp_path / "x"), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("popgpt: error:") and message in err
    assert not os.path.exists(tmp_path / "x")


def test_induction_refuses_a_folder_it_did_not_write(tmp_path, capsys):
    (tmp_path / "mine.txt").write_text("keep")
    assert main(["induction", "--out", str(tmp_path), "--steps", "2"]) == 2
    assert "did not write" in capsys.readouterr().err
