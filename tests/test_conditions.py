"""Conditions on the population axis: per-member data and hyperparameters, sweeps."""

import csv
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F
from conftest import NAMES

from popgpt import MicroGPT, ModelConfig, Population, Virus, immunity
from popgpt.cli import main, parse_grid
from popgpt.data import docs_to_tensor, encode, load_names
from popgpt.engine import Engine
from popgpt.evolution.config import EvolutionConfig, RunConfig, condition_configs
from popgpt.evolution.layout import Layout
from popgpt.evolution.summary import special_ceiling, special_members, special_population
from popgpt.stats import cell, proportion_interval, summarize_replicates
from popgpt.step import Batches, Hyper, draw_rows

CONFIG = ModelConfig(block_size=16)
LRS = [1e-3, 3e-3, 1e-2, 2e-2]
DECAY = [0.0, 0.1, 0.0, 0.5]
BETAS = [(0.9, 0.99), (0.8, 0.95), (0.9, 0.999), (0.5, 0.9)]


@pytest.fixture(scope="module")
def bank():
    names = [n for n in load_names(NAMES)[:600] if len(n) < 15]
    return torch.stack([docs_to_tensor(names[:250], CONFIG.block_size),
                        docs_to_tensor(names[250:500], CONFIG.block_size)]).to(torch.int8)  # 2 tables


def hyper(dtype):
    return Hyper(torch.tensor(LRS, dtype=dtype), torch.tensor([b[0] for b in BETAS], dtype=dtype),
                 torch.tensor([b[1] for b in BETAS], dtype=dtype), torch.full((4,), 1e-8, dtype=dtype),
                 torch.tensor(DECAY, dtype=dtype))


def rounds(bank):
    """Two rounds: in the first only members 0 and 2 train (so step counts differ after it); in the
    second members 2 and 3 stop early. Members 0, 2 read table 0; 1, 3 table 1."""
    g = torch.Generator().manual_seed(0)
    table = torch.tensor([0, 1, 0, 1])
    lengths = torch.tensor([250, 250])
    first = draw_rows(lengths, table, 3, 4, g)
    second = draw_rows(lengths, table, 4, 4, g)
    act1 = torch.tensor([[True, False, True, False]]).expand(3, 4)
    act2 = torch.arange(4)[:, None] < torch.tensor([4, 4, 2, 3])[None, :]
    return [Batches(bank, table, first, act1), Batches(bank, table, second, act2)]


def loop_of_single_models(bank, dtype):
    """Each member alone: a MicroGPT with torch.optim.AdamW, trained on its own steps only."""
    models, opts = [], []
    for i in range(4):
        m = MicroGPT(CONFIG, generator=torch.Generator().manual_seed(i)).to(dtype)
        models.append(m)
        opts.append(torch.optim.AdamW(m.parameters(), lr=LRS[i], betas=BETAS[i], eps=1e-8, weight_decay=DECAY[i]))
    for batches in rounds(bank):
        for s in range(batches.steps):
            x, y = batches.at(s)
            for i in range(4):
                if not batches.active[s, i]:
                    continue
                loss = F.cross_entropy(models[i](x[i]).flatten(0, 1), y[i].flatten(), ignore_index=-1)
                opts[i].zero_grad()
                loss.backward()
                opts[i].step()
    return models


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["eager", "graph", "compile"])
def test_members_with_their_own_data_hyperparameters_and_steps_equal_single_models(bank, kind):
    dtype = torch.float32 if kind == "compile" else torch.float64
    pop = Population.from_seeds(CONFIG, [0, 1, 2, 3])
    pop = Population(CONFIG, {k: v.to(dtype) for k, v in pop.params.items()})
    engine = Engine(kind, member_block=2) if kind == "eager" else Engine(kind)
    for batches in rounds(bank):
        engine.run(pop, batches, hyper(dtype))
    assert pop.opt.step.tolist() == [7, 4, 5, 3]
    reference = loop_of_single_models(bank, dtype)
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-9, atol=1e-11)
    for i, model in enumerate(reference):
        for name, p in model.named_parameters():
            torch.testing.assert_close(pop.params[name][i], p.detach(), **tol, msg=f"member {i} {name}")


def test_per_member_triggers_equal_one_test_per_trigger():
    pop = Population.from_seeds(ModelConfig(), [1, 2, 3, 4])
    triggers = torch.tensor([encode("qx"), encode("ab"), encode("qx"), encode("zz")])
    both = immunity(pop, Virus("qx", "zzz"), torch.Generator().manual_seed(0), triggers=triggers)
    for i, trig in enumerate(["qx", "ab", "qx", "zz"]):
        alone = immunity(pop[[i]], Virus(trig, "zzz"), torch.Generator().manual_seed(0))
        assert both.payload_prob[i].item() == pytest.approx(alone.payload_prob.item(), rel=1e-5)
    assert len(set(both.payload_prob.tolist())) == 4  # the triggers matter


def test_layout_of_conditions_replicates_and_tables():
    config = RunConfig(evolution=EvolutionConfig(pop_size=4, replicates=2),
                       conditions=({"finetune_infection": 0.0}, {"finetune_infection": 0.05}, {}, {"lr": 1e-3}))
    layout = Layout.of(config)
    assert layout.n_groups == 8 and layout.n_lineages == 8 and config.n_members == 32
    assert layout.train_table == tuple(range(8))
    clean = layout.clean_table
    assert layout.finetune_table == (clean, clean, 9, 10, 4, 5, 6, 7) and layout.n_tables == 11
    assert layout.hyper(False, "cpu").lr.tolist()[-8:] == pytest.approx([1e-3] * 8)
    shared = Layout.of(RunConfig(evolution=EvolutionConfig(pop_size=4, replicates=3, replicate_data="shared"),
                                 conditions=({}, {"lr": 1e-3})))
    assert shared.n_lineages == 2 and [shared.lineage_of_group(g) for g in range(6)] == [0, 0, 0, 1, 1, 1]
    assert [c.train.lr for c in condition_configs(config)] == [0.01, 0.01, 0.01, 1e-3]


def test_grid_parsing():
    conds = parse_grid(["lr=1e-3,1e-2", "finetune_infection=0,none", "mutation_order=source,before-breeding"])
    assert len(conds) == 8 and conds[1] == {"lr": 1e-3, "finetune_infection": 0.0, "mutation_order": "before-breeding"}
    assert conds[2]["finetune_infection"] is None
    for bad, message in ((["pop_size=3,4"], "unknown field 'pop_size'"), (["lr"], "expected FIELD=V1"),
                         (["lr=nan"], "not a valid value"), (["lr=1", "lr=2"], "given twice")):
        with pytest.raises(ValueError, match=message):
            parse_grid(bad)


def test_proportion_intervals_stay_inside_0_1_and_cells_count_replicates():
    mean, lo, hi = proportion_interval([0.0, 0.0, 1 / 32, 0.0], [32] * 4)
    assert 0.0 <= lo <= mean <= hi <= 1.0 and mean == pytest.approx(1 / 128)
    mean, lo, hi = proportion_interval([1.0, 1.0], [10, 10])
    assert hi == 1.0 and 0.8 < lo < 1.0
    rows = [{"generation": 0, "condition": 0, "trigger": "qx", "virus_generation": 0, "n_members": 10,
             "immune_frac": f, "fitness_immune": q} for f, q in ((0.0, math.nan), (0.2, 0.3), (0.4, 0.5))]
    summary = summarize_replicates(rows)[0]
    assert summary["fitness_immune_n"] == 2 and cell(summary, "fitness_immune").endswith("(n=2)")
    assert 0.0 <= summary["immune_frac_lo"] and summary["immune_frac_hi"] <= 1.0


def test_special_member_rules_and_their_ceiling():
    assert special_ceiling(3) == pytest.approx(2 / math.sqrt(3)) and special_ceiling(3) < 1.5 <= special_ceiling(4)
    q = torch.tensor([0.40, 0.31, 0.29, 0.20, 0.21, 0.22, 0.19, 0.18])
    immune = torch.tensor([True, True, True, False, False, False, False, False])
    assert not special_members(q, immune).any()  # 3 immune members: the source's rule cannot fire
    assert special_population(q, immune).tolist() == [True] + [False] * 7  # mean 0.25 + 1.5 x sd 0.075 = 0.362


@pytest.fixture(scope="module")
def sweep_run(tmp_path_factory):
    names = tmp_path_factory.mktemp("data") / "names.txt"
    names.write_text("\n".join(load_names(NAMES)[:1500]) + "\n")
    run = str(tmp_path_factory.mktemp("sweep") / "run")
    argv = ["sweep", "--data", str(names), "--out", run, "--pop-size", "5", "--generations", "2", "--steps", "4",
            "--batch-size", "4", "--eval-docs", "30", "--sample-names", "2", "--device", "cpu", "--replicates", "2",
            "--finetune-steps", "3", "--grid", "finetune_steps=0,3", "--grid", "lr=1e-3,1e-2"]
    assert main(argv) == 0
    return run


def test_a_sweep_runs_every_condition_and_replicate_in_one_batch(sweep_run):
    with open(os.path.join(sweep_run, "generations.csv")) as f:
        rows = list(csv.DictReader(f))
    assert [(r["generation"], r["condition"], r["replicate"]) for r in rows[:8]] == \
        [("0", str(c), str(r)) for c in range(4) for r in range(2)]
    assert {(r["finetune_steps"], r["lr"]) for r in rows} == {("0", "0.001"), ("0", "0.01"), ("3", "0.001"),
                                                             ("3", "0.01")}
    from popgpt.runio import load_checkpoint

    ck = load_checkpoint(sweep_run)
    steps = ck["population"]["step"].view(4, 2, 5)  # condition, replicate, member
    assert (steps[:2, :, 1:] == 0).all() and (steps[2:, :, 1:] == 3).all()  # children: 0 or 3 fine-tuning steps
    for parents in ck["parents"]:  # selection and lineage stay within each group of 5
        assert torch.equal(parents // 5, (torch.arange(40) // 5)[:, None].expand(-1, 2))
    with open(os.path.join(sweep_run, "generations_summary.csv")) as f:
        summary = list(csv.DictReader(f))
    assert len(summary) == 3 * 4 and all(s["replicates"] == "2" for s in summary)
    info = json.load(open(os.path.join(sweep_run, "config.json")))
    assert len(info["config"]["conditions"]) == 4 and len(info["member_seeds"]) == 40


def test_distance_to_the_source_by_hand():
    from popgpt.evolution.compare import distance_to_source

    rows = [{"generation": g, "immune_frac": f} for g, f in ((0, 0.27), (5, 0.54), (7, 0.9), (10, 0.61))]
    assert distance_to_source(rows) == pytest.approx(math.sqrt((0 + 100 + 100) / 3))  # generations 0, 5, 10
    assert math.isnan(distance_to_source([{"generation": 3, "immune_frac": 0.5}]))


def test_the_report_of_a_sweep_ranks_its_conditions(sweep_run, capsys):
    from popgpt.evolution.compare import distance_to_source

    assert main(["report", sweep_run, "--no-retest"]) == 0
    text = open(os.path.join(sweep_run, "report", "report.md")).read()
    assert "## Conditions, ranked by distance to the source's table" in text
    assert "### Condition 3: finetune_steps=3 lr=0.01" in text
    report = json.load(open(os.path.join(sweep_run, "report", "report.json")))
    rows = json.load(open(os.path.join(sweep_run, "results.json")))["generations"]
    for ranked in report["conditions"]:
        per_replicate = [distance_to_source([r for r in rows if r["condition"] == ranked["condition"]
                                             and r["replicate"] == k]) for k in (0, 1)]
        assert ranked["distance"] == pytest.approx(sum(per_replicate) / 2)
    distances = [r["distance"] for r in report["conditions"]]
    assert distances == sorted(distances)
    assert os.path.isfile(os.path.join(sweep_run, "report", "phase_diagram.png"))


def test_a_sweep_too_large_for_memory_fails_before_allocating(tmp_path, capsys):
    try:
        code = main(["sweep", "--grid", "lr=1e-3,1e-2", "--replicates", "2000000", "--out", str(tmp_path / "r"),
                     "--device", "cpu"])
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and "largest population that fits is about" in err and not (tmp_path / "r").exists()


@pytest.mark.parametrize("common", [False, True])
def test_common_random_numbers_pair_the_conditions(tmp_path, common):
    names = tmp_path / "names.txt"
    names.write_text("\n".join(load_names(NAMES)[:1500]) + "\n")
    run = str(tmp_path / "run")
    argv = ["sweep", "--data", str(names), "--out", run, "--pop-size", "4", "--generations", "1", "--steps", "4",
            "--batch-size", "4", "--eval-docs", "30", "--sample-names", "2", "--device", "cpu", "--replicates", "2",
            "--finetune-steps", "2", "--grid", "penalty=0.3,1.0", "--grid", "infection_rate=0.15,0.3"]
    assert main(argv + (["--common-random-numbers"] if common else [])) == 0
    from popgpt.runio import load_checkpoint

    gen0 = load_checkpoint(run, 0)["population"]["params"]["wte"].view(4, 2, 4, -1)  # condition, replicate, member
    info = json.load(open(os.path.join(run, "config.json")))
    with open(os.path.join(run, "generations.csv")) as f:
        rows = [r for r in csv.DictReader(f) if r["generation"] == "0"]
    nll = {(int(r["condition"]), int(r["replicate"])): r["nll_mean"] for r in rows}
    # conditions (penalty, infection): 0 (0.3, 15%), 1 (0.3, 30%), 2 (1.0, 15%), 3 (1.0, 30%); 0 and 2 differ
    # only in the selection penalty, which generation 0's training never sees
    same_training = nll[0, 0] == nll[2, 0] and nll[0, 1] == nll[2, 1]
    if common:
        assert info["config"]["evolution"]["common_random"] is True
        assert all(torch.equal(gen0[c], gen0[0]) is (c in (0, 2)) for c in range(4))  # 15% vs 30% infection
        assert same_training and len(set(info["member_seeds"])) == 8
        assert not torch.equal(gen0[0, 0], gen0[0, 1])  # replicates stay independent
    else:
        assert not same_training and len(set(info["member_seeds"])) == 32
