"""Replicates: R populations in one batch, selection within each, tables with intervals."""

import csv
import json
import math
import os

import pytest
import torch

from popgpt import ModelConfig, Population
from popgpt.evolution.config import EvolutionConfig
from popgpt.evolution.operators import assemble, next_generation, pick_parents, select
from popgpt.runio import load_checkpoint
from popgpt.stats import mean_interval, summarize_replicates, t975


def test_mean_interval_by_hand():
    mean, lo, hi = mean_interval([1.0, 2.0, 3.0])
    half = 4.302652729911275 * 1.0 / math.sqrt(3)  # t(0.975, 2) * sd / sqrt(n), sd = 1
    assert mean == 2.0 and lo == pytest.approx(2 - half) and hi == pytest.approx(2 + half)
    assert mean_interval([0.5, float("nan")])[0] == 0.5 and math.isnan(mean_interval([0.5])[1])
    # exact quantiles (tables: 12.7062, 2.2622, 1.9840), not 1.96 above 30 degrees of freedom
    assert t975(1) == pytest.approx(12.7062047, abs=1e-6) and t975(9) == pytest.approx(2.2621572, abs=1e-6)
    assert t975(100) == pytest.approx(1.9839715, abs=1e-6)


def test_select_and_parents_stay_within_replicates():
    fitness = torch.tensor([0.1, 0.9, 0.5, 0.3,   # replicate 0: members 0-3
                            0.8, 0.2, 0.7, 0.6])  # replicate 1: members 4-7
    surv = select(fitness, 2, replicates=2)
    assert surv.tolist() == [1, 2, 4, 6]
    parents = pick_parents(surv, 50, torch.Generator().manual_seed(0), replicates=2)
    assert parents.shape == (100, 2)
    assert set(parents[:50].flatten().tolist()) == {1, 2} and set(parents[50:].flatten().tolist()) == {4, 6}


def test_next_generation_and_assemble_keep_replicates_apart():
    pop = Population.from_seeds(ModelConfig(), list(range(10)))
    cfg = EvolutionConfig(pop_size=5, replicates=2, survivor_frac=0.4)
    fitness = torch.arange(10.0)
    survivors, children, parents = next_generation(pop, fitness, cfg, torch.Generator().manual_seed(0))
    new = assemble(survivors, children, 2)
    assert len(new) == 10 and parents.shape == (10, 2)
    assert parents[:2].tolist() == [[4, 4], [3, 3]] and parents[5:7].tolist() == [[9, 9], [8, 8]]
    assert (parents[:5] < 5).all() and (parents[5:] >= 5).all()
    for i in (0, 1, 5, 6):  # survivors in place, bit for bit
        assert torch.equal(new.params["wte"][i], pop.params["wte"][parents[i, 0]])
    for i in (2, 3, 4, 7, 8, 9):  # every child tensor from one of its two parents (before mutation)
        a, b = parents[i].tolist()
        close = [min((new.params[k][i] - pop.params[k][a]).abs().max(),
                     (new.params[k][i] - pop.params[k][b]).abs().max()) for k in pop.params]
        assert max(close) < 0.2  # mutation noise only (std 0.02, 1% of weights)


def test_replicated_run_tables(make_tiny_run):
    run = make_tiny_run(pop_size=6, replicates=3, generations=2)
    results = json.load(open(os.path.join(run, "results.json")))
    with open(os.path.join(run, "generations.csv")) as f:
        rows = list(csv.DictReader(f))
    assert [(r["generation"], r["replicate"]) for r in rows] == [(str(g), str(r)) for g in range(3) for r in range(3)]
    with open(os.path.join(run, "generations_summary.csv")) as f:
        summary = list(csv.DictReader(f))
    assert len(summary) == 3
    last = [r for r in rows if r["generation"] == "2"]
    mean, lo, hi = mean_interval(float(r["fitness_all"]) for r in last)
    assert float(summary[2]["fitness_all"]) == pytest.approx(mean, rel=1e-5)
    assert float(summary[2]["fitness_all_lo"]) == pytest.approx(lo, rel=1e-5)
    assert results["final"]["replicates"] == 3
    ck = load_checkpoint(run)
    assert ck["population"]["params"]["wte"].shape[0] == 18
    for parents in ck["parents"]:  # lineage never crosses replicates
        rep_of_child = torch.arange(18) // 6
        assert torch.equal(parents[:, 0] // 6, rep_of_child) and torch.equal(parents[:, 1] // 6, rep_of_child)
    assert summarize_replicates(results["generations"])[0]["replicates"] == 3


def test_report_of_a_replicated_run(make_tiny_run):
    from popgpt.evolution.report import generation_table, write_report

    run = make_tiny_run(pop_size=6, replicates=2, generations=1)
    results = json.load(open(os.path.join(run, "results.json")))
    text = open(write_report(run, retest_special=False)).read()
    assert "mean [95% interval] over 2 replicates" in text and "Per group:" in text
    table = generation_table(results["generations"], 2)
    assert len(table) == 2
    last = [r for r in results["generations"] if r["generation"] == 1]
    mean, lo, hi = mean_interval(r["fitness_all"] for r in last)
    assert table[1]["quality_all"] == f"{mean:.3f} [{lo:.3f}, {hi:.3f}]"
    assert table[1]["special"] == f"{sum(r['n_special'] for r in last)} ({'+'.join(str(r['n_special']) for r in last)})"
