"""Where a generation's time goes on a GPU, and which calls make the host wait.

Builds the run of ``--preset`` (full: P=200, 100 fine-tuning steps), runs
generations 0 and 1 untimed (graph capture, kernel loading), then:

1. sync audit: two more generations under ``torch.cuda.set_sync_debug_mode("warn")``;
   every synchronising call is listed with the popgpt line that made it
   (the generation's one intended read, ``device.host_read``, is allowed);
2. profile: one fine-tuning generation under ``torch.profiler``: kernels
   launched, graph replays, GPU busy time against wall time, and the top
   operators by device time.

    python benchmarks/profile_generation.py --device cuda --engine graph
"""

import collections
import os
import sys
import time
import traceback
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import base_parser, describe, environment, write_results  # noqa: E402
from popgpt.data import NAMES_FILE  # noqa: E402
from popgpt.engine import ENGINES, Engine  # noqa: E402
from popgpt.evolution.config import DataConfig, EvolutionConfig, RunConfig  # noqa: E402
from popgpt.evolution.experiment import make_context, prepare  # noqa: E402
from popgpt.evolution.generation import generation, init_state  # noqa: E402
from popgpt.step import TrainConfig  # noqa: E402


def sync_audit(state, ctx, generations: int):
    """Synchronising calls made by ``generations`` generations: {popgpt frame: count}."""
    found = collections.Counter()

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" not in str(message):
            return
        frames = [f for f in traceback.extract_stack() if "popgpt" in f.filename and "benchmarks" not in f.filename]
        where = " <- ".join(f"{os.path.basename(f.filename)}:{f.lineno} {f.name}" for f in reversed(frames[-3:]))
        found[where or "(outside popgpt)"] += 1

    torch.cuda.synchronize()
    old = warnings.showwarning
    warnings.showwarning = record
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = record
            torch.cuda.set_sync_debug_mode("warn")
            for _ in range(generations):
                state, _ = generation(state, ctx)
    finally:
        torch.cuda.set_sync_debug_mode(0)
        warnings.showwarning = old
    return state, found


def profile(state, ctx):
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        state, _ = generation(state, ctx)
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    events = prof.key_averages()
    launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC"))
    replays = sum(e.count for e in events if e.key == "cudaGraphLaunch")
    kernel_us = sum(e.self_device_time_total for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    table = events.table(sort_by="self_device_time_total", row_limit=25, max_name_column_width=60)
    return state, {"wall_s": wall, "kernel_launches": launches, "graph_replays": replays,
                   "gpu_busy_s": kernel_us / 1e6, "gpu_busy_frac": kernel_us / 1e6 / wall}, table


def main(argv=None) -> int:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--engine", choices=ENGINES, default="graph")
    parser.add_argument("--pop-size", type=int, default=200)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--finetune-steps", type=int, default=100)
    args = parser.parse_args(argv)
    if args.device not in ("auto", "cuda") and not args.device.startswith("cuda"):
        raise SystemExit("--device: this profile needs a CUDA device")
    env = environment(torch.device("cuda"))
    config = RunConfig(data=DataConfig(path=NAMES_FILE), train=TrainConfig(steps=args.steps), device="cuda",
                       evolution=EvolutionConfig(pop_size=args.pop_size, generations=20,
                                                 finetune_steps=args.finetune_steps), engine=args.engine)
    data, config = prepare(config)
    ctx = make_context(config, data, Engine(args.engine))
    state = init_state(ctx)
    print(describe(env), flush=True)
    for _ in range(2):
        state, _ = generation(state, ctx)
    state, syncs = sync_audit(state, ctx, 7)  # generations 2-8: a mutation at the end of 7
    lines = [f"sync audit (generations 2-8, P={args.pop_size}, engine {args.engine}): "
             f"{sum(syncs.values())} synchronising calls"]
    lines += [f"  {n:5d}  {where}" for where, n in syncs.most_common()]
    state, summary, table = profile(state, ctx)
    lines += ["", "profile of generation 9: " + ", ".join(f"{k} {v:.4g}" for k, v in summary.items()), "", table]
    text = "\n".join(lines)
    print(text)
    write_results(args.out, f"profile_generation_{args.engine}",
                  {"environment": env, "args": vars(args), "syncs": dict(syncs), "profile": summary}, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
