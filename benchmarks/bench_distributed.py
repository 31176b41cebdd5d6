"""The population sharded over ranks: member-steps/s and what the ranks exchange per generation.

Runs the real ``popgpt.evolve`` once per rank count, each rank a process
started here (``torch.multiprocessing``; gloo on the CPU, NCCL on GPUs with
one GPU per rank), with the same seed and flags, and reports for each:

- member-steps/s: the run's member-steps (generation 0's and the children's
  fine-tuning) over its wall time and over its training time (the slowest
  rank's);
- per generation and per rank: bytes handed to each exchange (metrics
  all-gather, survivors' all-reduce, checkpoint gather to rank 0) and the
  seconds spent in it (waiting for slower ranks included);
- whether ``generations.csv`` equals the 1-rank run's byte for byte;
- the draws every rank makes for the whole population (breeding noise,
  batch rows, immunity-sample noise), timed on one process: the part of a
  generation that sharding does not divide.

    python benchmarks/bench_distributed.py --ranks 1,2 --threads 1
    python benchmarks/bench_distributed.py --device cuda --ranks 1,2,4,8 --pop-size 2000
"""

import datetime
import json
import os
import socket
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import base_parser, describe, environment, markdown_table, setup, write_results  # noqa: E402
from popgpt.data import NAMES_FILE  # noqa: E402
from popgpt.evolution.config import DataConfig, EvolutionConfig, RunConfig  # noqa: E402
from popgpt.evolution.experiment import PhaseTimer, evolve, prepare  # noqa: E402
from popgpt.evolution.operators import breed, pick_parents, select  # noqa: E402
from popgpt.population import Population  # noqa: E402
from popgpt.step import TrainConfig, draw_rows  # noqa: E402


def _rank(rank, world, port, config_dict, run_dir, threads, out):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(threads)
    config = RunConfig.from_dict(config_dict)
    if world > 1:
        backend = "nccl" if config.device.startswith("cuda") else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=600))
    timer = PhaseTimer(sync=True)
    results = evolve(config, run_dir, log=lambda s: None, timer=timer)
    with open(f"{out}.{rank}", "w") as f:
        json.dump({"phases": timer.seconds, "wall_s": results["wall_seconds"],
                   "communication": results.get("communication", {})}, f)
    if world > 1:
        dist.destroy_process_group()


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(config: RunConfig, world: int, threads: int, tmp: str) -> dict:
    run_dir, out = os.path.join(tmp, f"ranks{world}"), os.path.join(tmp, f"out{world}")
    t0 = time.perf_counter()
    mp.start_processes(_rank, (world, _port(), config.to_dict(), run_dir, threads, out), nprocs=world,
                       start_method="spawn")
    wall = time.perf_counter() - t0
    ranks = [json.load(open(f"{out}.{r}")) for r in range(world)]
    with open(os.path.join(run_dir, "generations.csv")) as f:
        csv = f.read()
    return {"ranks": ranks, "launch_wall_s": wall, "csv": csv}


def member_steps(config: RunConfig) -> int:
    ev = config.evolution
    children = ev.pop_size - ev.n_survivors
    return config.n_members * config.train.steps + ev.generations * config.n_members // ev.pop_size * children \
        * ev.finetune_steps


def draw_seconds(config: RunConfig, device: torch.device, repeat: int = 3) -> float:
    """Seconds of the draws one generation makes for the whole population (on one process)."""
    ev, P = config.evolution, config.n_members
    pop = Population.from_seeds(config.model, n=P, device=device)
    C = ev.pop_size - ev.n_survivors
    g = torch.Generator(device).manual_seed(0)
    rates = {"crossover_p": ev.crossover_p, "mutation_rate": ev.mutation_rate, "mutation_std": ev.mutation_std}
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        survivors = select(torch.rand(P, generator=g, device=device), ev.n_survivors)
        parents = pick_parents(survivors, C, g)
        breed(pop.config, pop.params, parents, rates, g, slice(0, 1))  # every draw, one child's arithmetic
        table = torch.zeros(C, dtype=torch.long, device=device)
        draw_rows(torch.tensor([25000]), table, ev.finetune_steps, config.train.batch_size, g)
        for _t in range(2 * (config.model.block_size - 2)):  # the immunity test's and the retest's noise
            torch.empty(P, config.virus.n_samples, config.model.vocab_size, device=device).exponential_(generator=g)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return best


def summarize(world: int, result: dict, config: RunConfig, reference: str | None) -> dict:
    ranks, G = result["ranks"], config.evolution.generations
    training = max(r["phases"].get("training", 0.0) for r in ranks)
    wall = ranks[0]["wall_s"]
    comm = ranks[0]["communication"]
    row = {"ranks": world, "wall_s": wall, "training_s": training,
           "member_steps_per_s": member_steps(config) / wall,
           "training_member_steps_per_s": member_steps(config) / training,
           "same_csv_as_1_rank": reference is None or result["csv"] == reference}
    for kind, gens in (("metrics", G + 1), ("survivors", G), ("checkpoint", G + 1)):
        c = comm.get(kind, {"bytes": 0, "seconds": 0.0})
        row[f"{kind}_MB_per_gen"] = c["bytes"] / gens / 1e6
        row[f"{kind}_s_per_gen"] = c["seconds"] / gens
    return row


def main(argv=None) -> int:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--ranks", default="1,2", help="rank counts to run, comma-separated (default: 1,2)")
    parser.add_argument("--pop-size", type=int, default=48)
    parser.add_argument("--generations", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--finetune-steps", type=int, default=20)
    parser.add_argument("--eval-docs", type=int, default=200)
    args = parser.parse_args(argv)
    if args.threads is None:
        args.threads = 1
    device = setup(args)
    worlds = [int(w) for w in args.ranks.split(",")]
    config = RunConfig(data=DataConfig(path=NAMES_FILE, eval_docs=args.eval_docs), train=TrainConfig(steps=args.steps),
                       evolution=EvolutionConfig(pop_size=args.pop_size, generations=args.generations,
                                                 finetune_steps=args.finetune_steps),
                       device=str(device), threads=args.threads, n_sample_names=3)
    env = environment(device)
    print(describe(env) + f" | {args.threads} thread(s) per rank")
    print(f"run: P={args.pop_size}, {args.generations} generations, {args.steps} steps at generation 0, "
          f"{args.finetune_steps} fine-tuning steps, {args.eval_docs} held-out names; "
          f"{member_steps(config)} member-steps")
    rows, reference = [], None
    with tempfile.TemporaryDirectory() as tmp:
        for world in worlds:
            result = run(config, world, args.threads, tmp)
            rows.append(summarize(world, result, config, reference))
            reference = reference or result["csv"]
            print(f"{world} rank(s): {rows[-1]['member_steps_per_s']:.0f} member-steps/s, "
                  f"same generations.csv as the first: {rows[-1]['same_csv_as_1_rank']}", flush=True)
    draws = draw_seconds(prepare(config)[1], device)
    print(f"draws for the whole population per generation (every rank makes them): {draws * 1000:.1f} ms")
    columns = list(rows[0])
    table = markdown_table(rows, columns)
    print(table)
    write_results(args.out, "bench_distributed", {"environment": env, "threads_per_rank": args.threads,
                                                   "config": config.to_dict(), "results": rows,
                                                   "whole_population_draws_s": draws}, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
