"""No silent wrong results, no mixed run folders, a clear error for every bad input."""

import dataclasses
import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from conftest import NAMES, ROOT

from popgpt import ModelConfig, Population
from popgpt.cli import main
from popgpt.data import decode, load_names
from popgpt.engine import Engine
from popgpt.evaluate import evaluate_members
from popgpt.evolution.config import DataConfig, EvolutionConfig, RunConfig, VirusConfig
from popgpt.evolution.experiment import evolve
from popgpt.evolution.memory import check_fits, estimate_bytes, largest_population
from popgpt.evolution.operators import select, selection_fitness
from popgpt.evolution.summary import group_row
from popgpt.evolution.virus import Virus
from popgpt.runio import RunError, RunLock, checkpoint_path, load_checkpoint
from popgpt.step import TrainConfig


@pytest.fixture(scope="module")
def names(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "names.txt"
    path.write_text("\n".join(load_names(NAMES)[:2000]) + "\n")
    return str(path)


def config_for(names, generations=2, **top):
    return RunConfig(data=DataConfig(path=names, eval_docs=40), virus=VirusConfig(mutate_every=0),
                     train=TrainConfig(steps=4, batch_size=8),
                     evolution=EvolutionConfig(pop_size=6, generations=generations, finetune_steps=2),
                     n_sample_names=2, **top)


def quiet(*_):
    pass


def cli(argv, capsys):
    """(exit code, stderr) of ``popgpt ARGV``, argparse's own exits included."""
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


TINY = ["--pop-size", "4", "--generations", "1", "--steps", "2", "--finetune-steps", "2", "--batch-size", "4",
        "--eval-docs", "20", "--sample-names", "2", "--device", "cpu"]


# --- 1. one writer per run folder -------------------------------------------------------------

def test_lock_refuses_a_second_writer_and_names_the_first(tmp_path):
    with RunLock(str(tmp_path), "popgpt evolve"):
        with pytest.raises(RunError, match=r"is in use by popgpt evolve \(pid %d" % os.getpid()):
            with RunLock(str(tmp_path), "popgpt report"):
                pass
    with RunLock(str(tmp_path), "popgpt report"):  # released on exit
        pass


HOLD = """
import sys, time
from popgpt.runio import RunLock
with RunLock(sys.argv[1], "a test holder"):
    print("held", flush=True)
    time.sleep(60)
"""


@pytest.fixture
def held_folder(tmp_path):
    """A run folder locked by another process (killed at the end)."""
    folder = tmp_path / "run"
    folder.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert proc.stdout.readline().strip() == "held"
    yield str(folder), proc
    proc.kill()
    proc.wait()


def test_a_killed_holder_leaves_no_lock_in_the_way(held_folder):
    folder, proc = held_folder
    with pytest.raises(RunError, match="in use by a test holder"):
        with RunLock(folder, "popgpt evolve"):
            pass
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert os.path.exists(os.path.join(folder, ".popgpt.lock"))  # the file stays ...
    with RunLock(folder, "popgpt evolve"):  # ... but the lock died with its holder
        pass


def test_a_second_run_into_a_locked_folder_writes_nothing(held_folder, names, capsys):
    folder, _ = held_folder
    code, err = cli(["evolve", "--data", names, "--out", folder, *TINY], capsys)
    assert code == 2 and "in use by a test holder" in err
    assert os.listdir(folder) == [".popgpt.lock"]


def test_every_writer_respects_the_lock(make_tiny_run, capsys):
    run = make_tiny_run()
    with RunLock(run, "popgpt evolve"):
        for argv in (["report", run], ["heads", run, "--names", "10", "--device", "cpu"],
                     ["vaccinate", run, "--recipients", "2", "--steps", "1", "--device", "cpu"],
                     ["revive", run, "--steps", "1", "--controls", "1", "--device", "cpu"],
                     ["evolve", "--resume", run]):
            code, err = cli(argv, capsys)
            assert code == 2 and "is in use by popgpt evolve" in err, argv
    assert not os.path.exists(os.path.join(run, "report"))


def test_out_never_overwrites_files_popgpt_did_not_write(tmp_path, names, capsys):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "config.json").write_text("my own file\n")
    code, err = cli(["evolve", "--data", names, "--out", str(folder), *TINY], capsys)
    assert code == 2 and "holds files popgpt did not write" in err
    assert (folder / "config.json").read_text() == "my own file\n" and os.listdir(folder) == ["config.json"]


# --- 2. settings that change the numbers are saved and restored -------------------------------

def test_resume_runs_with_the_saved_threads(tmp_path, names):
    config = config_for(names, generations=3, threads=1)
    full = str(tmp_path / "full")
    evolve(config, full, log=quiet)
    seen = []

    def crash(gen, row):
        seen.append(torch.get_num_threads())
        if gen == 1:
            raise KeyboardInterrupt

    cut = str(tmp_path / "cut")
    with pytest.raises(KeyboardInterrupt):
        evolve(config, cut, on_generation=crash, log=quiet)
    torch.set_num_threads(2)
    saved = RunConfig.from_dict(json.load(open(os.path.join(cut, "config.json")))["config"])
    assert saved.threads == 1
    evolve(saved, cut, resume=True, on_generation=lambda g, r: seen.append(torch.get_num_threads()), log=quiet)
    assert seen == [1, 1, 1, 1] and torch.get_num_threads() == 2  # restored after the run
    assert open(os.path.join(cut, "generations.csv")).read() == open(os.path.join(full, "generations.csv")).read()
    results = json.load(open(os.path.join(cut, "results.json")))
    assert results["parts"] == 2 and set(results["phase_seconds"]) >= {"training", "evaluation", "io"}
    first_part = load_checkpoint(cut, 0)["elapsed_seconds"]
    assert results["wall_seconds"] > first_part > 0


def test_resume_under_other_threads_needs_force_and_is_recorded(tmp_path, names, capsys):
    run = str(tmp_path / "run")

    def crash(gen, row):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        evolve(config_for(names, threads=1), run, on_generation=crash, log=quiet)
    code, err = cli(["evolve", "--resume", run, "--threads", "2"], capsys)
    assert code == 2 and "--threads: 1 -> 2" in err and "--force" in err
    assert cli(["evolve", "--resume", run, "--threads", "2", "--force"], capsys)[0] == 0
    info = json.load(open(os.path.join(run, "config.json")))
    assert info["resumes"][0]["forced_changes"] == ["--threads: 1 -> 2"] and info["config"]["threads"] == 1


# --- 3. diverged members ------------------------------------------------------------------------

def test_a_diverged_member_is_vulnerable_worst_and_left_out_of_means(names):
    pop = Population.from_seeds(ModelConfig(block_size=21), [1, 2, 3])
    pop.params["blocks.0.mlp_fc1"][1, 0, 0] = float("nan")
    rows = torch.zeros(4, 22, dtype=torch.long)
    rows[:, 1:4] = torch.tensor([5, 13, 1])
    rows[:, 5:] = -1
    metrics = evaluate_members(pop, Virus(), rows, torch.Generator().manual_seed(0))
    assert metrics["diverged"].tolist() == [False, True, False]
    assert metrics["vulnerable"][1] and torch.isnan(metrics["quality"][1])
    fitness = selection_fitness(metrics["quality"], metrics["vulnerable"], 0.3)
    assert fitness[1] == -torch.inf and select(fitness, 3).tolist()[-1] == 1
    row = group_row(0, {k: v.cpu() for k, v in metrics.items()}, 0, Virus())
    ok = torch.tensor([True, False, True])
    assert row["n_diverged"] == 1 and row["n_immune"] == int((~metrics["vulnerable"]).sum())
    assert row["fitness_all"] == pytest.approx(float(metrics["quality"][ok].mean()))
    assert row["nll_mean"] == pytest.approx(float(metrics["nll"][ok].mean()))


def test_a_diverging_run_warns_and_counts_nobody_immune(tmp_path, names):
    config = config_for(names, generations=1)
    config = dataclasses.replace(config, train=dataclasses.replace(config.train, lr=1e20))
    lines = []
    evolve(config, str(tmp_path / "run"), log=lines.append)
    assert any("6 of 6 members diverged" in line for line in lines)
    rows = json.load(open(tmp_path / "run" / "results.json"))["generations"]
    assert all(r["n_diverged"] == 6 and r["immune_frac"] == 0 for r in rows)
    assert "no immune member" in (tmp_path / "run" / "samples.txt").read_text()


@pytest.mark.parametrize("flag", ["--lr", "--weight-decay", "--mutation-std", "--penalty", "--infection-rate"])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_non_finite_numbers_are_rejected_at_parse_time(tmp_path, names, capsys, flag, value):
    code, err = cli(["evolve", "--data", names, "--out", str(tmp_path / "r"), *TINY, f"{flag}={value}"], capsys)
    assert code == 2 and f"argument {flag}: must be a finite number" in err
    assert not (tmp_path / "r").exists()


# --- 4. the data file cannot change under a resumed run -----------------------------------------

def test_resume_refuses_a_changed_names_file(tmp_path, names):
    data = tmp_path / "names.txt"
    data.write_text(open(names).read())
    config = config_for(str(data))

    def crash(gen, row):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        evolve(config, str(tmp_path / "run"), on_generation=crash, log=quiet)
    data.write_text(open(names).read() + "zoe\n")
    with pytest.raises(RunError, match=f"{data}: the names file changed"):
        evolve(config, str(tmp_path / "run"), resume=True, log=quiet)


# --- 5, 6. nonsense values, long names, impossible sizes -----------------------------------------

@pytest.mark.parametrize("argv,message", [
    (["--eval-docs", "0"], "--eval-docs must be >= 1"),
    (["--eval-docs", "-5"], "--eval-docs must be >= 1"),
    (["--eval-docs", "999"], "--eval-docs 999: only 200 names are held out"),
    (["--immunity-samples", "0"], "--immunity-samples must be >= 1"),
    (["--immunity-samples", "-3"], "--immunity-samples must be >= 1"),
    (["--immunity-threshold", "0"], "--immunity-threshold must be in [1, 5]"),
    (["--immunity-threshold", "6"], "--immunity-threshold must be in [1, 5]"),
    (["--mutate-every", "-1"], "--mutate-every must be >= 0"),
    (["--weight-decay", "-1"], "--weight-decay must be >= 0"),
    (["--val-frac", "1.5"], "--val-frac must be in (0.0, 1.0)"),
    (["--trigger", "QX"], "--trigger 'QX' has character 'Q'"),
    (["--payload", "z z"], "--payload 'z z' has character ' '"),
    (["--seed", str(2 ** 64)], "--seed 18446744073709551616 is too large"),
    (["--seed", "-1"], "--seed must be >= 0"),
    (["--threads", "0"], "--threads must be >= 1"),
    (["--device", "meta"], "argument --device: 'meta' cannot run popgpt"),
    (["--max-name-length", "3"], "longer than the maximum of 3 (--max-name-length)"),
])
def test_nonsense_values_fail_naming_the_flag(tmp_path, names, capsys, argv, message):
    code, err = cli(["evolve", "--data", names, "--out", str(tmp_path / "r"), *TINY, *argv], capsys)
    assert code == 2 and message in err, err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("argv,message", [
    (["heads", "{run}", "--names", "0"], "argument --names: must be >= 1, got 0"),
    (["heads", "{run}", "--names", "-5"], "argument --names: must be >= 1, got -5"),
    (["sample", "{run}", "--member", "0", "--count", "0"], "argument --count: must be >= 1"),
    (["vaccinate", "{run}", "--recipients", "0"], "argument --recipients: must be >= 1"),
    (["revive", "{run}", "--controls", "-1"], "argument --controls: must be >= 0"),
    (["report", "{run}", "--sigma", "nan"], "argument --sigma: must be a finite number"),
])
def test_tool_flags_are_checked(make_tiny_run, capsys, argv, message):
    run = make_tiny_run()
    code, err = cli([a.format(run=run) for a in argv], capsys)
    assert code == 2 and message in err


def test_a_huge_name_fails_with_file_and_line(tmp_path, names, capsys):
    data = tmp_path / "long.txt"
    data.write_text("anna\nemma\n" + "a" * 10_000 + "\n")
    code, err = cli(["evolve", "--data", str(data), "--out", str(tmp_path / "r"), *TINY], capsys)
    assert code == 2 and f"{data}:3: a name of 10,000 letters is longer than the maximum of 64" in err


def test_an_impossible_size_fails_before_allocating(tmp_path, names):
    data = tmp_path / "long.txt"
    data.write_text("\n".join(load_names(names)[:300] + ["b" * 5000]) + "\n")
    config = dataclasses.replace(config_for(str(data)), data=DataConfig(str(data), eval_docs=20, max_name_len=6000))
    with pytest.raises(MemoryError, match="largest population that fits is about"):
        evolve(config, str(tmp_path / "r"), log=quiet)
    assert not (tmp_path / "r").exists()


def test_memory_estimate_grows_with_members_and_names_the_fit():
    config = RunConfig()
    sizes = [sum(estimate_bytes(config, p).values()) for p in (10, 100, 1000)]
    assert sizes[0] < sizes[1] < sizes[2]
    budget = sizes[1]
    fit = largest_population(config, budget, "cpu")
    assert sum(estimate_bytes(config, fit).values()) <= budget < sum(estimate_bytes(config, fit + 1).values())
    assert check_fits(config, torch.device("cpu"))["state"] == 200 * 8712 * 4 * 7


# --- 7. results are never overwritten by a no-op -------------------------------------------------

def test_resuming_a_finished_run_changes_nothing(make_tiny_run, capsys):
    run = make_tiny_run()
    before = {f: open(os.path.join(run, f), "rb").read() for f in ("results.json", "config.json", "generations.csv")}
    assert cli(["evolve", "--resume", run], capsys)[0] == 0
    assert {f: open(os.path.join(run, f), "rb").read() for f in before} == before


# --- tracebacks become errors ----------------------------------------------------------------------

@pytest.mark.parametrize("damage", ["truncate", "empty", "random", "flip"])
def test_a_damaged_checkpoint_is_named(tmp_path, names, capsys, damage):
    run = str(tmp_path / "run")
    evolve(config_for(names, generations=1), run, log=quiet)
    path = checkpoint_path(run, 1)
    data = open(path, "rb").read()
    if damage == "flip":  # still unpickles: only the checksum can tell
        state = torch.load(path, weights_only=True)
        state["population"]["params"]["wte"][0, 0] += 1e-3
        torch.save(state, path)
    else:
        damaged = {"truncate": data[: len(data) // 2], "empty": b"", "random": os.urandom(len(data))}[damage]
        open(path, "wb").write(damaged)
    for argv in (["sample", run, "--member", "0", "--count", "1"], ["report", run]):
        code, err = cli(argv, capsys)
        assert code == 2 and path in err and "checksum mismatch" in err and "weights_only" not in err


@pytest.mark.parametrize("edit,message", [
    (lambda d: d["config"]["evolution"].update(extra=1), "config.evolution: unknown field 'extra'"),
    (lambda d: d["config"]["train"].update(lr="fast"), "config.train.lr: expected float, got 'fast'"),
    (lambda d: d["config"]["virus"].pop("rate"), "config.virus: missing field 'rate'"),
    (lambda d: d["config"].update(seed=-4), "config: seed must be >= 0"),
    (lambda d: d.pop("config"), "not a popgpt config.json"),
])
def test_a_damaged_config_json_is_named(make_tiny_run, capsys, edit, message):
    run = make_tiny_run()
    path = os.path.join(run, "config.json")
    info = json.load(open(path))
    edit(info)
    open(path, "w").write(json.dumps(info))
    for argv in (["report", run], ["evolve", "--resume", run], ["heads", run], ["sample", run, "--member", "0"]):
        code, err = cli(argv, capsys)
        assert code == 2 and path in err and message in err, (argv, err)


@pytest.mark.parametrize("content", [b"", b'{"config": {', b"\x00\xff\xfe\x01binary"])
def test_an_unreadable_config_json_is_named(make_tiny_run, capsys, content):
    run = make_tiny_run()
    path = os.path.join(run, "config.json")
    open(path, "wb").write(content)
    code, err = cli(["report", run], capsys)
    assert code == 2 and path in err and ("not valid JSON" in err or "not text" in err)


def test_bad_folders_fail_clearly(tmp_path, names, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    for out, message in ((afile, "is a file, not a folder"), (afile / "sub", "a part of that path is a file"),
                         ("/proc/popgpt-run", "cannot create it")):
        code, err = cli(["evolve", "--data", names, "--out", str(out), *TINY], capsys)
        assert code == 2 and message in err, err
    code, err = cli(["evolve", "--data", str(tmp_path), "--out", str(tmp_path / "r"), *TINY], capsys)
    assert code == 2 and "is a directory, not a names file" in err
    for tool in ("vaccinate", "revive", "heads", "report", "sample"):
        argv = [tool, str(tmp_path / "missing")] + (["--member", "0"] if tool == "sample" else [])
        code, err = cli(argv, capsys)
        assert code == 2 and "no such run folder" in err, tool


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_cuda_run_opened_without_cuda_offers_device(make_tiny_run, capsys):
    run = make_tiny_run()
    path = os.path.join(run, "config.json")
    info = json.load(open(path))
    info["config"]["device"] = "cuda"
    open(path, "w").write(json.dumps(info))
    code, err = cli(["evolve", "--resume", run], capsys)
    assert code == 2 and "torch sees no CUDA device here; give --device cpu" in err


# --- unfinished runs ---------------------------------------------------------------------------

def test_tools_say_a_run_is_unfinished(tmp_path, names, capsys):
    run = str(tmp_path / "run")

    def crash(gen, row):
        if gen == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        evolve(config_for(names, generations=3), run, on_generation=crash, log=quiet)
    note = "is an unfinished run (generation 1 of 3 saved); reading generation 1"
    assert main(["sample", run, "--member", "0", "--count", "1"]) == 0
    assert note in capsys.readouterr().err
    assert main(["report", run, "--no-retest"]) == 0
    assert note in capsys.readouterr().out
    text = open(os.path.join(run, "report", "report.md")).read()
    assert "**Unfinished run**: generations 0 to 1 of 3 are saved" in text
    assert "| 1 | qx |" in text and "| 2 |" not in text
    assert main(["heads", run, "--names", "10", "--device", "cpu"]) == 0
    assert note in capsys.readouterr().out


# --- what evolve does, checked by hand -----------------------------------------------------------

class SpyEngine(Engine):
    """An eager engine that records, per round, the names its first trainee trains on."""

    def __init__(self):
        super().__init__("eager")
        self.seen = []

    def run(self, pop, batches, hp):
        self.seen.append([decode(r[1:]) for r in batches.bank[batches.table[0]]])
        return super().run(pop, batches, hp)


def spy_triggers(monkeypatch) -> list:
    import popgpt.evolution.generation as generation

    tested, real = [], generation.evaluate_members

    def spy(pop, virus, *args, **kw):
        tested.append(sorted({decode(t) for t in kw["triggers"]}))  # the per-member triggers
        return real(pop, virus, *args, **kw)

    monkeypatch.setattr(generation, "evaluate_members", spy)
    return tested


def trained_trigger(names_seen: list[str]) -> set:
    infected = [r for r in names_seen if "zzz" in r]
    assert len(infected) > 0.1 * len(names_seen)
    return {r[r.index("zzz") - 2:r.index("zzz")] for r in infected}


@pytest.mark.parametrize("order,reinfect", [("before-breeding", "on-mutation"), ("source", "never"),
                                            ("source", "on-mutation")])
def test_trigger_mutation_order_and_reinfection(tmp_path, names, monkeypatch, order, reinfect):
    tested = spy_triggers(monkeypatch)
    engine = SpyEngine()
    config = config_for(names, generations=3)
    config = dataclasses.replace(config, virus=VirusConfig(mutate_every=2, reinfect=reinfect),
                                 evolution=dataclasses.replace(config.evolution, mutation_order=order))
    evolve(config, str(tmp_path / "run"), log=quiet, engine=engine)
    triggers = [r["trigger"] for r in json.load(open(tmp_path / "run" / "results.json"))["generations"]]
    new = triggers[-1]
    assert new != "qx" and all(t == [tr] for t, tr in zip(tested, triggers))
    if order == "before-breeding":  # generation 2 already tests (and, re-infected, trains) the new trigger
        assert triggers == ["qx", "qx", new, new]
    else:  # the source's order: mutated at the end of generation 2, first tested in generation 3
        assert triggers == ["qx", "qx", "qx", new]
    trained = [trained_trigger(seen) for seen in engine.seen]  # generation 0, then the children of 1, 2, 3
    first_new = 2 if order == "before-breeding" else 3
    expected = [{"qx"}] * first_new + [{new} if reinfect == "on-mutation" else {"qx"}] * (4 - first_new)
    assert trained == expected


def test_evaluation_names_are_never_training_names(tmp_path, names, monkeypatch):
    import popgpt.evolution.experiment as experiment

    seen = {}
    real_start = experiment._start

    def spy(*args, **kw):
        ctx, run, state = real_start(*args, **kw)
        seen["eval"] = {decode(r[1:]) for r in ctx.eval_rows}
        seen["train"] = set(ctx.train_docs)
        return ctx, run, state

    monkeypatch.setattr(experiment, "_start", spy)
    evolve(config_for(names, generations=0), str(tmp_path / "run"), log=quiet)
    assert len(seen["eval"]) == 40 and not seen["eval"] & seen["train"]
    assert len(seen["train"]) == 1800  # 2,000 names, 10% held out


def test_the_quality_split_of_a_row_by_hand(make_tiny_run):
    run = make_tiny_run(pop_size=10)
    ck = load_checkpoint(run)
    q, vul = ck["metrics"]["quality"], ck["metrics"]["vulnerable"]
    row = ck["rows"][-1]
    immune = [float(x) for x, v in zip(q, vul) if not v]
    vulnerable = [float(x) for x, v in zip(q, vul) if v]
    assert row["n_immune"] == len(immune) and row["immune_frac"] == pytest.approx(len(immune) / 10)
    for key, values in (("fitness_immune", immune), ("fitness_vulnerable", vulnerable)):
        if values:
            assert row[key] == pytest.approx(sum(values) / len(values), rel=1e-6)
    assert row["fitness_all"] == pytest.approx(float(q.double().mean()), rel=1e-6)


def test_resuming_a_run_with_replicates_matches_the_uninterrupted_one(tmp_path, names):
    config = dataclasses.replace(config_for(names, generations=2),
                                 evolution=EvolutionConfig(pop_size=5, replicates=2, generations=2, finetune_steps=2))
    full, cut = str(tmp_path / "full"), str(tmp_path / "cut")
    evolve(config, full, log=quiet)

    def crash(gen, row):
        if gen == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        evolve(config, cut, on_generation=crash, log=quiet)
    evolve(config, cut, resume=True, log=quiet)
    for name in ("generations.csv", "generations_summary.csv"):
        assert open(os.path.join(cut, name)).read() == open(os.path.join(full, name)).read()
    a, b = load_checkpoint(full), load_checkpoint(cut)
    params = a["population"]["params"]
    assert all(torch.equal(params[k], b["population"]["params"][k]) for k in params)
    assert all(torch.equal(x, y) for x, y in zip(a["parents"], b["parents"]))


def test_a_failed_start_leaves_no_folder(tmp_path, names, capsys):
    code, _ = cli(["evolve", "--data", names, "--out", str(tmp_path / "r"), *TINY, "--eval-docs", "5000"], capsys)
    assert code == 2 and not (tmp_path / "r").exists()


def test_seed_streams_never_give_a_fresh_member_a_run_members_seed():
    from popgpt.population import default_seeds
    from popgpt.settings import FRESH_SEED_BASE, fresh_member_seeds

    config = RunConfig(seed=10)
    run = set(default_seeds(config.n_members, config.seed))
    for purpose in ("vaccine", "revival"):
        fresh = fresh_member_seeds(config.seed, purpose, 0, 64)
        assert min(fresh) >= FRESH_SEED_BASE > max(run) and len(set(fresh)) == 64
