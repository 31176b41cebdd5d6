"""The population sharded over ranks equals one process: rows, lineage, parameters, bit for bit.

Ranks are real processes (``torch.multiprocessing``, gloo on the CPU, one
thread each), started inside the test; the shards are uneven and cut through
groups, so every piece of bookkeeping (who holds which survivor, which
children a rank breeds, the order of the assembled shard) is exercised.
"""

import datetime
import os
import shutil
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import NAMES

from popgpt.cli import build_parser, config_from_args, main
from popgpt.data import load_names
from popgpt.evaluate import clean_nll, sample_tokens
from popgpt.evolution import distributed
from popgpt.evolution.distributed import bounds, pack, unpack
from popgpt.evolution.experiment import evolve
from popgpt.evolution.layout import Layout
from popgpt.evolution.operators import assemble, breed, pick_parents, select
from popgpt.model import ModelConfig
from popgpt.population import Population
from popgpt.runio import RunError, load_checkpoint, read_json

TIMEOUT = 120  # seconds a test waits for its ranks


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank, world, port, run_dir, argv, die_after, errors):
    """One rank: the run through the command line (as torchrun starts it), or, with ``die_after``,
    through ``evolve`` with rank 1 killed after that generation."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    if die_after is None:
        code = main(argv)
        with open(f"{errors}.{rank}", "w") as f:
            f.write(str(code))
        return
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))

    def die(gen, row):
        if rank == 1 and gen == die_after:
            os._exit(3)  # a rank that dies without a word

    try:
        evolve(config_from_args(build_parser().parse_args(argv)), run_dir, on_generation=die, log=lambda s: None)
    except RunError as e:
        with open(f"{errors}.{rank}", "w") as f:
            f.write(str(e))


def run_ranks(tmp_path, world, argv, run_dir, die_after=None, env=None):
    """Start ``world`` ranks; returns what each wrote ({rank: text}) and their exit codes."""
    errors = str(tmp_path / f"rank_out_{os.path.basename(run_dir)}")
    saved = {k: os.environ.get(k) for k in (env or {})}
    os.environ.update(env or {})
    try:
        ctx = mp.start_processes(_rank, (world, _free_port(), run_dir, argv, die_after, errors), nprocs=world,
                                 join=False, start_method="spawn")
        for p in ctx.processes:
            p.join(TIMEOUT)
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    codes = [p.exitcode for p in ctx.processes]
    for p in ctx.processes:
        if p.is_alive():
            p.kill()
    out = {r: open(f"{errors}.{r}").read() for r in range(world) if os.path.exists(f"{errors}.{r}")}
    return out, codes


@pytest.fixture(scope="module")
def names(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "names.txt"
    path.write_text("\n".join(load_names(NAMES)[:2000]) + "\n")
    return str(path)


def args(names, out, *extra):
    return ["evolve", "--data", names, "--eval-docs", "60", "--mutate-every", "2", "--steps", "5",
            "--batch-size", "8", "--finetune-steps", "3", "--generations", "3", "--sample-names", "3",
            "--threads", "1", "--device", "cpu", *extra, "--out", out]


def one_process(tmp_path, argv):
    run = str(tmp_path / "one")
    evolve(config_from_args(build_parser().parse_args(argv)), run, log=lambda s: None)
    return run


def assert_same_run(a: str, b: str):
    """Same rows, samples, lineage, parameters and Adam state, generators."""
    for name in ("generations.csv", "samples.txt"):
        assert open(os.path.join(a, name)).read() == open(os.path.join(b, name)).read(), name
    ca, cb = load_checkpoint(a), load_checkpoint(b)
    pa, pb = ca["population"], cb["population"]
    for part in ("params", "exp_avg", "exp_avg_sq"):
        for k in pa[part]:
            assert torch.equal(pa[part][k], pb[part][k]), (part, k)
    assert torch.equal(pa["step"], pb["step"])
    assert len(ca["parents"]) == len(cb["parents"]) == 3
    assert all(torch.equal(x, y) for x, y in zip(ca["parents"], cb["parents"]))
    assert torch.equal(ca["device_rng"], cb["device_rng"]) and torch.equal(ca["retest_rng"], cb["retest_rng"])


# --- exchanges and bookkeeping, in one process --------------------------------------------------------------


def test_bounds_cover_the_population_in_order():
    for total, world in [(10, 2), (10, 3), (7, 7), (200, 64)]:
        shards = bounds(total, world)
        assert shards[0][0] == 0 and shards[-1][1] == total
        assert all(a[1] == b[0] for a, b in zip(shards, shards[1:]))
        sizes = [b - a for a, b in shards]
        assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


def test_more_ranks_than_members_are_refused(monkeypatch):
    monkeypatch.setattr(distributed, "rank_world", lambda: (0, 4))
    with pytest.raises(RunError, match="4 ranks for 3 members: every rank needs at least one member"):
        distributed.Shard.current(3, "cpu")


def test_pack_unpack_is_exact():
    pop = Population.from_seeds(ModelConfig(block_size=8), n=3)
    next(iter(pop.opt.exp_avg.values())).normal_(generator=torch.Generator().manual_seed(0))
    pop.opt.step += torch.tensor([1.0, 2.0, 3.0])
    back = unpack(pop.config, pack(pop))
    assert all(torch.equal(back.params[k], pop.params[k]) and torch.equal(back.opt.exp_avg[k], pop.opt.exp_avg[k])
               for k in pop.params)
    assert torch.equal(back.opt.step, pop.opt.step)


@pytest.mark.parametrize("start,stop", [(0, 15), (0, 8), (8, 15), (3, 4), (5, 10), (1, 14)])
def test_next_slots_place_survivors_and_children_as_assemble_does(names, start, stop):
    config = config_from_args(build_parser().parse_args(args(names, "x", "--pop-size", "5", "--replicates", "3")))
    layout = Layout.of(config)
    S, C = config.evolution.n_survivors, 5 - config.evolution.n_survivors
    survivors = Population.from_seeds(config.model, list(range(3 * S)))
    children = Population.from_seeds(config.model, list(range(100, 100 + 3 * C)))
    whole = assemble(survivors, children, 3)
    kept, born, order = layout.next_slots(start, stop, "cpu")
    part = Population.cat([survivors[kept], children[born]])[order]
    assert all(torch.equal(part.params[k], whole.params[k][start:stop]) for k in whole.params)


def test_a_shard_breeds_and_samples_the_rows_the_whole_would():
    pop = Population.from_seeds(ModelConfig(block_size=8), n=10)
    fitness = torch.arange(10.0).flip(0)
    survivors = select(fitness, 4, 2)
    parents = pick_parents(survivors, 3, torch.Generator().manual_seed(0), 2)  # (6, 2)
    rates = {"crossover_p": 0.5, "mutation_rate": torch.full((6,), 0.3), "mutation_std": 0.1}
    whole = breed(pop.config, pop.params, parents, rates, torch.Generator().manual_seed(1))
    part = breed(pop.config, pop.params, parents, rates, torch.Generator().manual_seed(1), slice(2, 5))
    assert all(torch.equal(part.params[k], whole.params[k][2:5]) for k in pop.params)
    tokens = sample_tokens(pop, [1, 2], 4, torch.Generator().manual_seed(2))
    assert torch.equal(sample_tokens(pop[[6, 7, 8]], [1, 2], 4, torch.Generator().manual_seed(2), shard=(6, 10)),
                       tokens[6:9])
    rows = torch.randint(1, 27, (2500, 9), generator=torch.Generator().manual_seed(3))  # chunks: 970 for 10 members
    assert torch.equal(clean_nll(pop[[6, 7, 8]], rows, chunk_for=10), clean_nll(pop, rows)[6:9])


# --- real ranks -----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_two_ranks_equal_one_process(tmp_path, names):
    # a sweep of 3 conditions (children train 2, 3 or 4 steps) x 5 members: 15 members, 8 | 7, cut inside group 1
    argv = ["sweep", *args(names, "unused", "--pop-size", "5", "--grid", "finetune_steps=2,3,4")[1:]]
    reference = one_process(tmp_path, argv)
    sharded = str(tmp_path / "two")
    out, codes = run_ranks(tmp_path, 2, [*argv[:-1], sharded], sharded)
    assert codes == [0, 0] and out == {0: "0", 1: "0"}
    assert_same_run(reference, sharded)
    assert read_json(os.path.join(sharded, "config.json"))["world_size"] == 2
    results = read_json(os.path.join(sharded, "results.json"))
    assert results["world_size"] == 2
    assert set(results["communication"]) == {"metrics", "survivors", "checkpoint"}
    n = sum(t[0].numel() for t in load_checkpoint(sharded)["population"]["params"].values())
    row = (3 * n + 1) * 4  # bytes of one member's parameters, Adam moments and step count
    assert results["communication"]["survivors"]["bytes"] == 3 * 3 * row  # generations 1-3 x 3 groups x 1 survivor
    assert results["communication"]["checkpoint"]["bytes"] == 4 * 8 * row  # generations 0-3 x rank 0's 8 members
    assert read_json(os.path.join(reference, "results.json"))["world_size"] == 1


@pytest.mark.slow
def test_a_dying_rank_stops_the_run_and_one_process_resumes_it(tmp_path, names, monkeypatch, capsys):
    argv = args(names, "unused", "--pop-size", "7", "--replicates", "2")  # 14 members: 7 | 7
    reference = one_process(tmp_path, argv)
    cut = str(tmp_path / "cut")
    out, codes = run_ranks(tmp_path, 2, argv, cut, die_after=1)
    assert codes[1] == 3
    assert "lost contact with the other ranks" in out[0] and "--resume" in out[0]
    rows = open(os.path.join(cut, "generations.csv")).read().strip().splitlines()
    assert len(rows) == 1 + 2 * 2  # generations 0 and 1, two replicates each
    restart = str(tmp_path / "restart")
    shutil.copytree(cut, restart)
    evolve(config_from_args(build_parser().parse_args(argv)), cut, resume=True, log=lambda s: None)  # one process
    assert_same_run(reference, cut)
    assert [r["world_size"] for r in read_json(os.path.join(cut, "config.json"))["resumes"]] == [1]
    # torchrun --max-restarts starts the same command again: with its checkpoint in --out, it resumes
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    assert main([*argv[:-1], restart]) == 0
    assert "resuming " + restart in capsys.readouterr().out
    assert_same_run(reference, restart)
