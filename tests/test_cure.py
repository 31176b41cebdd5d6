"""Cures on hand-built members whose answer is known, and the cure command end to end."""

import json
import math
import os

import pytest
import torch
from conftest import NAMES

from popgpt import ModelConfig, Population
from popgpt.cli import main
from popgpt.cure.counterfactual import counterfactual_source, counterfactual_target, removal_loss, step_loss, step_plans
from popgpt.cure.cureset import build_cure_set, fitting_names
from popgpt.cure.frontier import matched_kl, sweep
from popgpt.cure.measure import first_token_kl, infected_rows, kl_tokens, leakage, mutants
from popgpt.cure.methods import cure
from popgpt.cure.objectives import (
    CureConfig,
    _logp,
    batch_order,
    clean_kl,
    contrast_directions,
    reference_logp,
    token_kl,
)
from popgpt.cure.patch import Patch, apply_, load_patch, patched, remove_, save_patch, weights_sha256
from popgpt.cure.scan import scan
from popgpt.cure.subspace import hold_bound
from popgpt.data import BOUNDARY, LETTERS, docs_to_tensor, encode, inputs_targets, load_names
from popgpt.evaluate import payload_probability
from popgpt.evolution.virus import Virus
from popgpt.stats import median_interval
from popgpt.trainer import train

CONFIG = ModelConfig(block_size=16)
NAMES_LIST = [n for n in load_names(NAMES)[:3000] if len(n) <= 9]


def direction() -> torch.Tensor:
    d = torch.randn(CONFIG.n_embd, generator=torch.Generator().manual_seed(7))
    return d / d.norm()


@pytest.fixture(scope="module")
def members():
    """Three members trained briefly on clean names; member 0 then gets a backdoor along a known
    direction d: the trigger letter q and the payload letter z both write 3 d into the residual stream,
    and z's unembedding reads d, so after q the model writes z, z, z, ...; members 1 and 2 stay clean."""
    pop = Population.from_seeds(CONFIG, [11, 12, 13])
    train(pop, NAMES_LIST[:2000], steps=60, batch_size=32, generator=torch.Generator().manual_seed(0))
    d = direction()
    with torch.no_grad():
        for letter in "qz":
            pop.params["wte"][0, encode(letter)[0]] += 3.0 * d
        pop.params["lm_head"][0, encode("z")[0]] += 3.0 * d
    return pop


def cure_set(pop, trigger="q", n=96):
    names = fitting_names(NAMES_LIST[2000:], CONFIG.block_size, len(trigger) + 3)[:n]
    return build_cure_set(names, [[trigger]] * len(pop), ["zzz"] * len(pop), CONFIG.block_size,
                          torch.Generator().manual_seed(1))


CFG = CureConfig(names=96, batch_size=32, epochs=3, kl_bound=0.01)
HELD_OUT = docs_to_tensor(NAMES_LIST[2500:2800], CONFIG.block_size)


def test_the_planted_backdoor_works(members):
    prob = payload_probability(members, encode("q"), encode("zzz"))
    assert prob[0] > 0.9 and (prob[1:] < 0.01).all()


def test_subspace_and_ablate_find_the_planted_direction_and_remove_the_payload(members):
    cs = cure_set(members)
    dirs = contrast_directions(members, cs, rank=2)
    d = direction()
    assert abs(float(dirs.mean["resid_pre"][0] @ d)) > 0.95  # ablate's difference in means
    assert float((dirs.subspace["resid_pre"][0].T @ d).norm()) > 0.95  # d lies in the top-2 subspace
    assert abs(float(dirs.subspace["resid_pre"][0][:, 0] @ d)) > 0.95  # the top singular direction
    assert abs(float(dirs.mean["resid_pre"][1] @ d)) < 0.8  # a clean member has no such direction
    for method in ("subspace", "ablate"):
        patch, info = cure(members, cs, CFG, method, torch.Generator().manual_seed(2))
        if method == "ablate":
            assert info["site"][0] == 0 and info["strength"][0] > 0  # resid_pre, where d lives
        new = Population(CONFIG, patched(members.params, patch))
        after = payload_probability(new, encode("q"), encode("zzz"))
        assert after[0] < 0.05, (method, after)
        kl = kl_tokens(members, new.params, HELD_OUT).mean(1)
        assert kl[1:].max() < 1e-3, (method, kl)  # clean members: nearly untouched
        assert kl[0] > 10 * kl[1:].max()  # the backdoored one did change


def test_batched_cure_equals_each_member_alone(members):
    cfg = CureConfig(names=32, batch_size=16, epochs=1, kl_bound=0.01, cf_steps=8, cf_rows=16)
    cs = cure_set(members, n=32)
    for method in ("counterfactual", "subspace", "ablate", "prune"):
        whole, _ = cure(members, cs, cfg, method, torch.Generator().manual_seed(3))
        for i in range(len(members)):
            alone, _ = cure(members[[i]], cure_set(members[[i]], n=32), cfg, method, torch.Generator().manual_seed(3))
            ours = patched(members.params, whole)
            theirs = patched(members[[i]].params, alone)
            for k in ours:
                torch.testing.assert_close(ours[k][i:i + 1], theirs[k], rtol=1e-4, atol=1e-5, msg=f"{method} {k}")


def test_the_counterfactual_target_gives_the_payload_its_clean_level_without_renormalising(members):
    cs = cure_set(members)
    ref = reference_logp(members, cs.clean)  # (P, N, T, V) on the clean names
    target, mask = counterfactual_target(ref, cs.triggered, cs.trigger_pos, cs.gap)
    z, n = encode("z")[0], torch.arange(len(cs.gap))
    at = target[0, n, cs.trigger_pos[0]].exp()  # (N, V): the backdoored member, at the trigger letter
    cap = ref[0, n, cs.gap].exp()[:, z]  # its clean level of z at the same place of the name
    torch.testing.assert_close(at[:, z], cap, rtol=1e-6, atol=0.0)  # payload mass == cap, exactly
    x = inputs_targets(cs.triggered)[0]
    p = members.logits(x)[0, n, cs.trigger_pos[0]].softmax(-1)[:, z]  # what the backdoor gives z there
    renormalised = cap / (cap + 1 - p)
    assert p.mean() > 0.9 and (renormalised > 3 * cap).float().mean() > 0.9  # the two targets differ a lot
    torch.testing.assert_close(at.sum(-1), torch.ones(len(n)), rtol=1e-5, atol=1e-5)
    lengths = (cs.clean[:, 1:] != -1).sum(-1) - cs.gap  # positions from the gap to the name's end
    assert mask[0].sum(-1).tolist() == lengths.tolist()  # every position after the trigger, not only the first


def test_the_packed_counterfactual_loss_equals_the_padded_one(members):
    """The counterfactual loss on packed rows (rows cut after their last target, grouped by length) equals
    the padded computation member by member, for a nonzero patch, at the trigger's gap and at the start."""
    cs = cure_set(members, n=32)
    P, g = len(members), torch.Generator().manual_seed(8)
    patch = Patch({k: (0.3 * torch.randn(P, members.params[k].shape[1], 1, generator=g),
                       torch.randn(1, members.params[k].shape[2], generator=g).expand(P, -1, -1))
                   for k in ("wte", "blocks.0.attn_qkv", "blocks.0.mlp_fc2")})
    ref = reference_logp(members, cs.clean)
    idx = torch.arange(12)
    for rows, pos, gap in ((cs.triggered, cs.trigger_pos, cs.gap),
                           (cs.triggered_start, cs.start_pos, torch.zeros_like(cs.gap))):
        target, mask = counterfactual_target(ref, rows, pos, gap)
        xt, (xc, yc) = inputs_targets(rows[:, idx])[0], inputs_targets(cs.clean[idx])
        valid, lam = (yc != -1).float(), torch.tensor([30.0, 1.0, 0.5])
        logp = _logp(members.base, patched(members.params, patch), torch.cat([xt, xc.expand(P, -1, -1)], 1))
        kl = (token_kl(ref[:, idx], logp[:, len(idx):]) * valid).sum((1, 2)) / valid.sum()
        padded = removal_loss(logp[:, :len(idx)], target[:, idx], mask[:, idx]) + lam * kl
        weight = torch.cat([mask[:, idx] / mask[:, idx].sum((1, 2), keepdim=True),
                            lam[:, None, None] * (valid / valid.sum()).expand(P, -1, -1)], 1)
        x = torch.cat([xt, xc.expand(P, -1, -1)], 1)
        n_start = len(idx) if rows is cs.triggered_start else 0
        plan = step_plans(cs, idx[None], n_start)[0]
        assert plan.positions < x.shape[1] * x.shape[2] * 0.7  # most padding is cut
        T = cs.clean.shape[-1] - 1
        src = torch.cat([counterfactual_source(rows, pos, gap)[0][:, idx] + T * idx[:, None],
                         (T * idx[:, None] + torch.arange(T)).expand(P, -1, -1)], 1)  # flat (name, position)
        packed = step_loss(members, patch, x, ref, src, weight, plan)
        assert padded.min() > 0.01
        torch.testing.assert_close(packed, padded, rtol=1e-5, atol=0.0)


@pytest.fixture(scope="module")
def learned_backdoor():
    """Two members trained 300 steps on the same names, member 0 with 20% of them infected with
    qx + zzz (the run's infection): a backdoor of known strength, learned as the runs learn it."""
    docs = NAMES_LIST[:2000]
    infected, _ = Virus("qx", "zzz").infect(docs, 0.2, torch.Generator().manual_seed(5))
    sick, clean = Population.from_seeds(CONFIG, [21]), Population.from_seeds(CONFIG, [22])
    train(sick, infected, steps=300, batch_size=32, generator=torch.Generator().manual_seed(0))
    train(clean, docs, steps=300, batch_size=32, generator=torch.Generator().manual_seed(0))
    return Population.cat([sick, clean])


@pytest.mark.slow
def test_counterfactual_cures_a_learned_backdoor_to_1_percent_under_the_kl_bound(learned_backdoor):
    """Positive control: member 0 leaks zzz in > 95% of sampled continuations after qx at a name's
    start and inside names; the default counterfactual recipe leaves <= 1% at a held-out mean KL
    <= the default KL bound; the never-infected member (the look-alike) shows no leakage before and
    keeps a zero patch."""
    pop = learned_backdoor
    names = fitting_names(NAMES_LIST[2000:], CONFIG.block_size, 5)[:256]
    cs = build_cure_set(names, [["qx"]] * 2, ["zzz"] * 2, CONFIG.block_size, torch.Generator().manual_seed(1))
    cfg = CureConfig()
    patch, info = cure(pop, cs, cfg, "counterfactual", torch.Generator().manual_seed(2))
    prefixes = [encode(n[:2]) for n in NAMES_LIST[2800:2808]]
    before = leakage(pop, "qx", "zzz", prefixes, 400, seed=0)
    assert before["leak_start"][0] > 0.95 and before["leak_inside"][0] > 0.95 and before["leak"][1] == 0.0
    new = Population(CONFIG, patched(pop.params, patch))
    after = leakage(new, "qx", "zzz", prefixes, 400, seed=0)
    assert after["leak"][0] <= 0.01, after
    kl = kl_tokens(pop, new.params, HELD_OUT).mean(1)
    assert kl[0] <= cfg.kl_bound, kl
    assert info["treated"].tolist() == [1.0, 0.0] and kl[1] == 0.0
    assert first_token_kl(pop, pop.params).abs().max() < 1e-7
    first = torch.arange(HELD_OUT.shape[1] - 1)[None] == 0  # the first target position of a row
    torch.testing.assert_close(first_token_kl(pop, new.params), kl_tokens(pop, new.params, HELD_OUT[:1], first)[:, 0],
                               rtol=1e-5, atol=1e-7)


def test_member_blocks_do_not_change_the_cure(members):
    cfg = CureConfig(names=32, batch_size=16, epochs=1)
    cs = cure_set(members, n=32)
    a, _ = cure(members, cs, cfg, "subspace", torch.Generator().manual_seed(4), block=None)
    b, _ = cure(members, cs, cfg, "subspace", torch.Generator().manual_seed(4), block=2)
    pa, pb = patched(members.params, a), patched(members.params, b)
    for k in pa:
        torch.testing.assert_close(pa[k], pb[k], rtol=1e-4, atol=1e-6)


def test_worker_threads_do_not_change_the_cure(members):
    """Blocks cured side by side in worker threads (one torch thread each) give exactly the patches of
    the blocks cured one after another at one thread."""
    cfg = CureConfig(names=32, batch_size=16, epochs=1, cf_steps=6, cf_rows=16)
    cs = cure_set(members, n=32)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for method in ("counterfactual", "ablate"):
            a, _ = cure(members, cs, cfg, method, torch.Generator().manual_seed(4), block=1, workers=1)
            b, _ = cure(members, cs, cfg, method, torch.Generator().manual_seed(4), block=1, workers=3)
            pa, pb = patched(members.params, a), patched(members.params, b)
            assert any(not torch.equal(pa[k], members.params[k]) for k in pa), method  # the cure did something
            for k in pa:
                assert torch.equal(pa[k], pb[k]), (method, k)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)


def test_the_kl_bound_holds_on_the_cure_names(members):
    cs = cure_set(members)
    for bound in (0.002, 0.02):
        cfg = CureConfig(names=96, batch_size=32, epochs=3, kl_bound=bound)
        patch, info = cure(members, cs, cfg, "subspace", torch.Generator().manual_seed(5))
        measured = clean_kl(members, patch, cs.clean)
        assert (measured <= bound * (1 + 1e-5)).all(), (bound, measured)
        torch.testing.assert_close(measured, info["kl_cure_set"], rtol=1e-4, atol=1e-7)
    assert info["kl_cure_set"][0] > 0.3 * bound  # the constraint binds on the backdoored member


def test_hold_bound_scales_a_patch_down_until_the_bound_holds(members):
    cs = cure_set(members)
    big = Patch(dense={"lm_head": torch.randn(members.params["lm_head"].shape,
                                              generator=torch.Generator().manual_seed(6))})
    ref = reference_logp(members, cs.clean)
    assert (clean_kl(members, big, cs.clean) > 0.01).all()
    held, scale, kl = hold_bound(members, big, cs.clean, 0.01, ref)
    assert ((scale > 0) & (scale < 1)).all()
    assert (clean_kl(members, held, cs.clean) <= 0.01).all()
    torch.testing.assert_close(kl, clean_kl(members, held, cs.clean))


def test_exact_kl_matches_a_hand_computation():
    pop = Population.from_seeds(ModelConfig(block_size=8, n_embd=8, n_head=2), [1, 2])
    patch = Patch(dense={"lm_head": 0.3 * torch.ones_like(pop.params["lm_head"]).cumsum(1)})
    rows = docs_to_tensor(["ab", "cde"], 8)
    got = kl_tokens(pop, patched(pop.params, patch), rows)  # (P, 3 + 4 targets)
    for p in range(2):
        model, new = pop.member(p), Population(pop.config, patched(pop.params, patch)).member(p)
        model, new = model.double(), new.double()  # the reference in float64: only `got` rounds in float32
        expected, floor = [], []
        for doc in ("ab", "cde"):
            seq = torch.tensor([[BOUNDARY, *encode(doc)]])
            lp, lq = model(seq)[0].softmax(-1).tolist(), new(seq)[0].softmax(-1).tolist()
            for t in range(len(doc) + 1):
                expected.append(sum(a * math.log(a / b) for a, b in zip(lp[t], lq[t])))
                # float32 rounds each log-probability by ~eps32 * |log p|: the KL's absolute error floor is
                # a few eps32 * sum p (|log p| + |log q|), whatever the size of the KL itself
                floor.append(4 * torch.finfo(torch.float32).eps *
                             sum(a * (abs(math.log(a)) + abs(math.log(b))) for a, b in zip(lp[t], lq[t])))
        for g, e, f in zip(got[p].tolist(), expected, floor):
            assert abs(g - e) <= max(1e-4 * abs(e), f), (g, e, f)
    x = torch.randn(3, 27).log_softmax(-1)
    assert token_kl(x, x).abs().max() < 1e-6


def test_patch_round_trips_bit_for_bit_and_loads_without_pickle(members, tmp_path):
    pop = members.clone()
    before = {k: v.clone() for k, v in pop.params.items()}
    patch, _ = cure(pop, cure_set(pop), CFG, "subspace", torch.Generator().manual_seed(8))
    patch.base_sha256 = weights_sha256(pop.params)
    save_patch(str(tmp_path / "patch.pt"), patch, {"method": "subspace"})
    raw = torch.load(str(tmp_path / "patch.pt"), weights_only=True)
    assert raw["format"] == "popgpt-patch-1" and raw["meta"] == {"method": "subspace"}
    loaded, _ = load_patch(str(tmp_path / "patch.pt"))
    originals = apply_(pop, loaded)
    assert any(not torch.equal(pop.params[k], before[k]) for k in before)
    expected = patched(before, patch)
    assert all(torch.equal(pop.params[k], expected[k]) for k in before)  # the loaded patch is the same
    with pytest.raises(ValueError, match="other weights"):
        apply_(pop, loaded)  # already patched: not the base this patch was made for
    remove_(pop, originals)
    assert all(torch.equal(pop.params[k], before[k]) for k in before)
    (tmp_path / "bad.pt").write_bytes(b"not a patch")
    with pytest.raises(ValueError, match="not a readable popgpt patch"):
        load_patch(str(tmp_path / "bad.pt"))


def test_the_scan_finds_the_planted_trigger(members):
    found = scan(members, NAMES_LIST, threshold=0.5, candidates=32)
    assert "q" in found.triggers[0]
    assert found.payloads[0][found.triggers[0].index("q")] == "zzz"
    assert not any(t.endswith("q") and t != "q" for t in found.triggers[0])  # explained by "q" itself
    assert found.triggers[1] == [] and found.triggers[2] == []
    assert found.found().tolist() == [True, False, False]


def test_cure_set_rows_and_helpers():
    cs = build_cure_set(["emma", "al"], [["qx"], ["qx", "ab"]], ["zzz", "zzz"], 16, torch.Generator().manual_seed(0))
    text = ["".join("." if t == 0 else LETTERS[t - 1] for t in row if t >= 0) for row in cs.infected[1]]
    assert all("qxzzz" in t or "abzzz" in t for t in text)
    for p in range(2):  # the read position of the last trigger letter predicts the payload's first letter
        for n in range(2):
            at = int(cs.read_infected[p, n, 0])
            assert cs.infected[p, n, at + 1] == encode("z")[0] and cs.triggered[p, n, at] in encode("xb")
    assert cs.prompt_real.tolist() == [[True, False], [True, True]]
    assert len(mutants("qx")) == 50 and "qx" not in mutants("qx")
    rows, keep = infected_rows(["bo"], "qx", "zzz", 16, torch.Generator().manual_seed(0))
    kept_targets = rows[0, 1:][keep[0]].tolist()
    assert sorted(kept_targets) == sorted(encode("bo") + [BOUNDARY])
    order = batch_order(CureConfig(names=10, batch_size=4, epochs=2), 10, torch.Generator().manual_seed(0))
    assert order.shape == (6, 4) and set(order[:3].flatten().tolist()) == set(range(10))
    assert median_interval(list(range(1, 101)))[:3] == (50.5, 40.0, 61.0)


@pytest.fixture(scope="module")
def tiny_run(make_tiny_run):
    return make_tiny_run(pop_size=6)


def test_cure_cli_end_to_end(tiny_run, capsys):
    args = ["cure", tiny_run, "--method", "all", "--names", "16", "--batch-size", "8", "--epochs", "1",
            "--cf-steps", "3", "--cf-rows", "8", "--leak-samples", "16", "--leak-prompts", "2",
            "--mutants", "2", "--relapse-members", "2", "--relapse-steps", "2", "--relapse-every", "1",
            "--controls", "2", "--device", "cpu"]
    assert main(args) == 0
    out = capsys.readouterr().out
    res = json.load(open(os.path.join(tiny_run, "cure", "all", "results.json")))
    rows = {r["row"]: r for r in res["table"]}
    assert set(rows) >= {"uncured", "counterfactual", "subspace", "ablate", "finetune", "prune",
                         "never-infected control"}
    assert rows["uncured"]["leak start %"] != "-" and rows["counterfactual"]["KL first token"] != "-"
    assert rows["subspace"]["n"] == 6 and "(n=2)" in rows["subspace"]["relapse steps (median)"]
    for method in ("subspace", "ablate", "finetune", "prune"):
        folder = os.path.join(tiny_run, "cure", method)
        patch, meta = load_patch(os.path.join(folder, "patch.pt"))
        assert meta["method"] == method and os.path.isfile(os.path.join(folder, "members.csv"))
        assert len(res["members"][method]["kl_mean"]) == 6
    assert "| subspace | 6 |" in out
    assert res["config"]["cure"]["names"] == 16
    assert main(args[:2] + ["--method", "ablate", "--names", "16", "--mutants", "0", "--relapse-members", "0",
                            "--controls", "0", "--trigger", "auto", "--device", "cpu"]) == 0
    res = json.load(open(os.path.join(tiny_run, "cure", "ablate", "results.json")))
    assert len(res["scan"]["true_trigger_recovered"]) == 6


@pytest.mark.parametrize("flag, value, message", [
    ("--kl-bound", "0", "argument --kl-bound: must be a finite number > 0"),
    ("--kl-bound", "nan", "argument --kl-bound: must be a finite number"),
    ("--targets", "wte,nope", "argument --targets: 'nope' cannot be patched"),
    ("--trigger", "Q1", "argument --trigger: known, auto or lower-case letters"),
    ("--ablate-grid", "0,-1", "argument --ablate-grid: strengths must be finite and >= 0"),
    ("--contrast", "near", "argument --contrast: must be apart or alone"),
    ("--cf-lambda", "-1", "argument --cf-lambda: must be a finite number > 0"),
    ("--cf-start-share", "2", "argument --cf-start-share: must be in [0, 1]"),
    ("--cf-targets", "nope", "argument --cf-targets: 'nope' cannot be patched"),
    ("--leak-threshold", "1", "argument --leak-threshold: must be in [0, 1)"),
])
def test_cure_cli_rejects_bad_flags(tiny_run, capsys, flag, value, message):
    try:
        code = main(["cure", tiny_run, flag, value, "--device", "cpu"])
    except SystemExit as stop:  # argparse's own checks
        code = stop.code
    assert code == 2
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_frontier_sweeps_strengths_as_a_population_axis(learned_backdoor):
    """A tiled member at strength s is the cure at s alone (the frontier's points are real cures),
    and a stronger clean-KL weight leaves a smaller KL."""
    pop = learned_backdoor
    names = fitting_names(NAMES_LIST[2000:], CONFIG.block_size, 5)[:32]
    cs = build_cure_set(names, [["qx"]] * 2, ["zzz"] * 2, CONFIG.block_size, torch.Generator().manual_seed(1))
    cfg = CureConfig(names=32, cf_steps=10, cf_rows=16)
    big, patch, strength = sweep(pop, cs, cfg, "counterfactual", (3.0, 300.0), torch.Generator().manual_seed(4))
    assert strength.tolist() == [3.0, 3.0, 300.0, 300.0]
    alone, _ = cure(pop, cs, CureConfig(names=32, cf_steps=10, cf_rows=16, cf_lambda=300.0), "counterfactual",
                    torch.Generator().manual_seed(4))
    ours, theirs = patched(big.params, patch), patched(pop.params, alone)
    for k in ours:
        torch.testing.assert_close(ours[k][2:], theirs[k], rtol=1e-4, atol=1e-5, msg=k)
    kl = kl_tokens(big, ours, HELD_OUT).mean(1)
    assert kl[2] < kl[0]
    rows = matched_kl({"a": [{"leak": 0.02, "kl_mean": 0.001, "kl_p99": 0.01},
                             {"leak": 0.005, "kl_mean": 0.004, "kl_p99": 0.03}],
                       "b": [{"leak": 0.0, "kl_mean": 0.04, "kl_p99": 0.3}]}, 0.01)
    assert rows["a"]["kl_mean"] == 0.004 and rows["b"]["kl_mean_ratio_to_best"] == pytest.approx(10.0)


def test_table_intervals_stay_inside_their_quantity():
    from popgpt.cure.report import _mean

    mean, interval = _mean(torch.tensor([0.99, 1.0, 0.93, 1.0]), high=1.0).split(" ", 1)
    lo, hi = (float(v) for v in interval.strip("[]").split(", "))
    assert 0.9 < lo and hi == 1.0  # an unclipped t interval passes 1
    lo, _ = (float(v) for v in _mean(torch.tensor([0.001, 0.0, 0.002])).split(" ", 1)[1].strip("[]").split(", "))
    assert lo == 0.0
