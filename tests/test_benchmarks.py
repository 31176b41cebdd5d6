"""The benchmark scripts run end to end at tiny sizes (smoke tests: no timing assertions)."""

import json
import os
import sys

import pytest
from conftest import ROOT

sys.path.insert(0, ROOT)

from benchmarks import bench_experiment, bench_vmap_vs_sequential  # noqa: E402


def test_bench_vmap_vs_sequential_smoke(tmp_path, capsys):
    code = bench_vmap_vs_sequential.main(["--device", "cpu", "--sizes", "1,3", "--steps", "2", "--warmup", "1",
                                          "--engines", "eager,graph", "--batch-size", "4",
                                          "--out", str(tmp_path)])
    assert code == 0
    out = capsys.readouterr().out
    assert "threads" in out and "torch" in out
    data = json.loads((tmp_path / "bench_vmap_vs_sequential.json").read_text())
    assert [(r["P"], r["engine"]) for r in data["results"]] == [(1, "eager"), (1, "graph"), (3, "eager"), (3, "graph")]
    assert all(r["equal"] and r["float64_max_diff"] < 1e-9 for r in data["results"])  # vs torch.optim.Adam loops
    for r in data["results"]:  # the printed rates agree with the printed times
        assert r["batched_member_steps_per_s"] == pytest.approx(r["P"] * 1000 / r["batched_ms_per_step"])
        assert r["speedup"] == pytest.approx(r["batched_member_steps_per_s"] / r["sequential_member_steps_per_s"])
        assert 0 < r["real_mflop"] <= r["packed_mflop"] <= r["padded_mflop"]  # packing never adds work
        assert r["real_gflop_per_s"] == pytest.approx(r["real_mflop"] * r["batched_member_steps_per_s"] / 1000)
        assert r["share_of_gemm"] == pytest.approx(r["real_gflop_per_s"] / r["gemm_gflop_per_s"])
    assert os.path.isfile(tmp_path / "bench_vmap_vs_sequential.md")


@pytest.mark.slow
def test_bench_experiment_smoke(tmp_path, capsys):
    code = bench_experiment.main(["--device", "cpu", "--pop-size", "6", "--generations", "1", "--steps", "3",
                                  "--finetune-steps", "2", "--out", str(tmp_path)])
    assert code == 0
    data = json.loads((tmp_path / "bench_experiment.json").read_text())
    assert set(data["runs"]) == {"cold", "warm"}
    assert {"training_s", "evaluation_s", "evolution_ops_s", "io_s"} <= set(data["runs"]["warm"])
    for run in data["runs"].values():  # phases are parts of the wall time, never more
        phases = sum(v for k, v in run.items() if k.endswith("_s") and k != "wall_s")
        assert 0 < phases <= run["wall_s"]
    assert data["startup_s"] == pytest.approx(max(0.0, data["runs"]["cold"]["wall_s"] - data["runs"]["warm"]["wall_s"]))
    assert f"start-up (compile/capture) = cold - warm = {data['startup_s']:.2f} s" in capsys.readouterr().out


def test_bench_cure_smoke(make_tiny_run, tmp_path, capsys):
    from benchmarks import bench_cure

    run = make_tiny_run(pop_size=4)
    code = bench_cure.main([run, "--device", "cpu", "--members", "6", "--methods", "ablate,finetune",
                            "--best", "ablate", "--mutants", "0", "--out", str(tmp_path)])
    assert code == 0
    out = capsys.readouterr().out
    assert "threads" in out and "torch" in out and "goals:" in out
    assert "cure of 6 members (4 distinct, tiled) with ablate:" in out
    data = json.loads((tmp_path / "bench_cure.json").read_text())
    assert [r["method"] for r in data["results"]] == ["ablate", "finetune"]
    assert all(r["members"] == 4 for r in data["results"])
    assert data["phases"]["strength search"] > 0 and data["phases"]["optimisation"] > 0
    assert data["goals"]["method"] == "ablate"


def test_step_flops_by_hand():
    import torch

    from benchmarks.limits import step_flops
    from popgpt.model import ModelConfig
    from popgpt.packed import Plan

    cfg = ModelConfig(block_size=6)
    y = torch.full((1, 1, 2, 6), -1)
    y[..., 0, :3] = 1  # a row whose last real target is at position 2: 3 positions matter
    y[..., 1, :1] = 1  # one position
    per_pos = 2 * (3 * 24 * 24 + 24 * 24 + 8 * 24 * 24 + 24 * 27)
    flops = step_flops(cfg, y, Plan((1, 1), (4, 1)))
    assert flops["real"] == 3 * (per_pos * 4 + 4 * 24 * (6 + 1))
    assert flops["packed"] == 3 * (per_pos * 5 + 4 * 24 * (16 + 1))
    assert flops["padded"] == 3 * 2 * (per_pos * 6 + 4 * 24 * 36)
