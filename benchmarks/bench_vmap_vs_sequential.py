"""Batched popgpt training against the plain sequential loop, same device, same batches.

Sequential: one ``MicroGPT`` ``nn.Module`` with ``torch.optim.Adam`` per
member, trained one member after another. Batched: one ``Population`` of all
members, each popgpt engine asked for. Both consume the same batch indices,
so both must hold the same parameters. In float32 they agree only up to
rounding, and Adam amplifies rounding where a gradient is near zero (an
update is g / (sqrt(v) + eps): a gradient of 1e-9 with rounding noise of
1e-10 moves a weight by up to lr/10), so a few weights of a few members end
apart by up to ~1e-3; the share of members agreeing within 1e-5 is
reported. The verdict comes from the same comparison repeated in float64 on
the first ``--check-members`` members over the same steps and batches, where
rounding is 1e-16 and every weight must agree within ``--tolerance``: a
wiring bug (a member fed another's batch, a reduction across members, a
wrong optimizer) fails it by orders of magnitude. Warm-up steps (compile,
capture) are excluded from the timings; CUDA is synchronised around every
timed region.

Each engine is timed on the packed path and on the padded one (``Engine(packed=False)``), and the
step's FLOP count (on the positions that matter, as packed, as padded) and this machine's rate for the
step's own matrix-product shapes are printed (``benchmarks/limits.py``), so the share of that limit
a step reaches is a printed number.

Sequential member-steps/s do not depend on P (members run one at a time), so
for large P the sequential loop is timed on the first ``--seq-cap`` members
and the equality check covers those members.

    python benchmarks/bench_vmap_vs_sequential.py --device cpu --threads 2
    python benchmarks/bench_vmap_vs_sequential.py --device cuda --sizes 1,10,50,200,1000,10000 --engines eager,graph
"""

import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import base_parser, describe, environment, markdown_table, setup, timed, write_results  # noqa: E402
from benchmarks.limits import dense_rate, gemm_rate, step_flops  # noqa: E402
from popgpt import MicroGPT, ModelConfig, Population, TrainConfig  # noqa: E402
from popgpt.data import IGNORE, NAMES_FILE, docs_to_tensor, inputs_targets, load_names  # noqa: E402
from popgpt.device import CPU_MEMBER_BLOCK  # noqa: E402
from popgpt.engine import ENGINES, Engine, plan_multiple  # noqa: E402
from popgpt.population import default_seeds  # noqa: E402
from popgpt.step import Batches  # noqa: E402


def int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise SystemExit(f"--sizes: expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise SystemExit(f"--sizes: every size must be >= 1, got {text!r}")
    return values


def sequential(models, opts, rows, idx):
    for s in range(idx.shape[0]):
        for i, (model, opt) in enumerate(zip(models, opts)):
            x, y = inputs_targets(rows[idx[s, i]])  # (B, T)
            loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten(), ignore_index=IGNORE)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()


def stacked(models, names) -> dict:
    return {k: torch.stack([m.get_parameter(k).detach() for m in models]) for k in names}


def member_diffs(pop, reference: dict, n: int) -> torch.Tensor:
    """Largest |parameter difference| of each of the first n members: [n]."""
    return torch.stack([(pop.params[k][:n] - reference[k]).abs().flatten(1).amax(1) for k in pop.params]).amax(0)


def sequential_models(cfg, seeds, tcfg, device, dtype):
    models = [MicroGPT(cfg, generator=torch.Generator().manual_seed(s)).to(device, dtype) for s in seeds]
    opts = [torch.optim.Adam(m.parameters(), lr=tcfg.lr, betas=(tcfg.beta1, tcfg.beta2), eps=tcfg.eps)
            for m in models]
    return models, opts


def population(cfg, seeds, device, dtype):
    pop = Population.from_seeds(cfg, seeds, device=device)
    return Population(cfg, {k: v.to(dtype) for k, v in pop.params.items()})


def float64_check(kind, cfg, seeds, tcfg, rows, idx, device) -> float:
    """Max |param difference| between the engine and the sequential loop, both in float64."""
    models, opts = sequential_models(cfg, seeds, tcfg, device, torch.float64)
    sequential(models, opts, rows, idx)
    pop = population(cfg, seeds, device, torch.float64)
    Engine(kind).run(pop, Batches.shared(rows, idx), tcfg)
    return float(member_diffs(pop, stacked(models, pop.params), len(seeds)).max())


def bench_size(P, args, engines, rows, device, cfg, tcfg):
    seeds = default_seeds(P)
    g = torch.Generator(device).manual_seed(P)
    idx = torch.randint(len(rows), (args.warmup + args.steps, P, tcfg.batch_size), generator=g, device=device)
    warm, timed_idx = idx[: args.warmup], idx[args.warmup:]

    n_seq = min(P, args.seq_cap)
    models, opts = sequential_models(cfg, seeds[:n_seq], tcfg, device, torch.float32)
    sequential(models, opts, rows, warm)
    seq_s = timed(lambda: sequential(models, opts, rows, timed_idx), device)
    seq_rate = n_seq * args.steps / seq_s
    seq_params = stacked(models, cfg.param_shapes())

    plan = Batches.shared(rows, timed_idx).planned(plan_multiple("eager")).plan  # eager and graph engines' plan
    flops = step_flops(cfg, inputs_targets(rows[timed_idx])[1], plan)
    block = min(P, CPU_MEMBER_BLOCK) if device.type == "cpu" else P
    gemm = gemm_rate(cfg, plan.positions, block, device)
    out = []
    for kind in engines:
        padded = population(cfg, seeds, device, torch.float32)
        engine = Engine(kind, packed=False)
        timed(lambda: engine.run(padded, Batches.shared(rows, warm), tcfg), device)
        padded_s = timed(lambda: engine.run(padded, Batches.shared(rows, timed_idx), tcfg), device)
        pop = population(cfg, seeds, device, torch.float32)
        engine = Engine(kind)
        warm_s = timed(lambda: engine.run(pop, Batches.shared(rows, warm), tcfg), device)
        run_s = timed(lambda: engine.run(pop, Batches.shared(rows, timed_idx), tcfg), device)
        agree = float((member_diffs(pop, seq_params, n_seq) <= 1e-5).float().mean())
        n_check = min(P, args.check_members)
        check = float64_check(kind, cfg, seeds[:n_check], tcfg, rows, idx[:, :n_check], device)
        rate = P * args.steps / run_s
        achieved = flops["real"] * rate / 1e9
        out.append({"P": P, "engine": kind, "batched_member_steps_per_s": rate,
                    "sequential_member_steps_per_s": seq_rate, "sequential_members_timed": n_seq,
                    "speedup": rate / seq_rate, "batched_ms_per_step": 1000 * run_s / args.steps,
                    "padded_member_steps_per_s": P * args.steps / padded_s, "packed_vs_padded": padded_s / run_s,
                    "real_mflop": flops["real"] / 1e6, "packed_mflop": flops["packed"] / 1e6,
                    "padded_mflop": flops["padded"] / 1e6, "real_gflop_per_s": achieved,
                    "gemm_gflop_per_s": gemm, "share_of_gemm": achieved / gemm,
                    "warmup_s": warm_s, "float32_members_agreeing": agree,
                    "float64_max_diff": check, "float64_members_checked": n_check,
                    "equal": check <= args.tolerance})
        r = out[-1]
        print(f"P={P:>6} {kind:>7}: batched {rate:12,.0f} member-steps/s | sequential {seq_rate:9,.0f} "
              f"({n_seq} members) | speedup {r['speedup']:6.1f}x | float32: {100 * agree:.0f}% of members "
              f"within 1e-5 | float64 max |dparam| {check:.1e} {'ok' if r['equal'] else 'MISMATCH'}",
              flush=True)
        print(f"{'':>15} packed {r['packed_vs_padded']:.2f}x padded | MFLOP per member-step: real "
              f"{r['real_mflop']:.1f}, packed {r['packed_mflop']:.1f}, padded {r['padded_mflop']:.1f} | "
              f"{achieved:.2f} GFLOP/s real = {100 * r['share_of_gemm']:.0f}% of the step's GEMM shapes alone "
              f"({gemm:.1f} GFLOP/s, blocks of {block})", flush=True)
    return out


def main(argv=None) -> int:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--sizes", help="population sizes (default: 1,10,50,200 on CPU; "
                        "1,10,50,200,1000,10000 on CUDA)")
    parser.add_argument("--engines", default=None, help=f"batched engines, from {','.join(ENGINES)} "
                        "(default: eager on CPU, eager,graph on CUDA)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (default: 10)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (default: 2)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-cap", type=int, default=200,
                        help="time the sequential loop on at most this many members (default: 200)")
    parser.add_argument("--check-members", type=int, default=8,
                        help="members compared in float64 (default: 8)")
    parser.add_argument("--tolerance", type=float, default=1e-9,
                        help="max float64 |param difference| counted as equal (default: 1e-9)")
    args = parser.parse_args(argv)
    device = setup(args)
    on_gpu = device.type == "cuda"
    sizes = int_list(args.sizes or ("1,10,50,200,1000,10000" if on_gpu else "1,10,50,200"))
    engines = (args.engines or ("eager,graph" if on_gpu else "eager")).split(",")
    bad = [e for e in engines if e not in ENGINES]
    if bad:
        raise SystemExit(f"--engines: unknown engine {bad[0]!r}; choose from {', '.join(ENGINES)}")
    if min(args.steps, args.warmup, args.seq_cap, args.check_members) < 1:
        raise SystemExit("--steps, --warmup, --seq-cap and --check-members must be >= 1")

    env = environment(device)
    cfg = ModelConfig(block_size=21)
    tcfg = TrainConfig(batch_size=args.batch_size)
    rows = docs_to_tensor([n for n in load_names(NAMES_FILE) if len(n) < cfg.block_size], cfg.block_size).to(device)
    print(describe(env))
    print(f"config: {cfg} | {tcfg} | steps {args.steps} (+{args.warmup} warm-up) | sizes {sizes} | engines {engines}")
    env["dense_gemm_gflop_per_s"] = dense_rate(device)
    print(f"dense float32 GEMM 1024^3 on this device: {env['dense_gemm_gflop_per_s']:.1f} GFLOP/s (for scale)")
    results = []
    for P in sizes:
        try:
            results += bench_size(P, args, engines, rows, device, cfg, tcfg)
        except torch.OutOfMemoryError:
            print(f"P={P}: out of memory, skipped")
            results.append({"P": P, "engine": "-", "out_of_memory": True})
            torch.cuda.empty_cache()
    ok = [r for r in results if "equal" in r]
    table = (f"Batched vs sequential training, {describe(env)}\n\n"
             + markdown_table(ok, ["P", "engine", "batched_member_steps_per_s", "sequential_member_steps_per_s",
                                   "speedup", "batched_ms_per_step", "packed_vs_padded", "real_mflop",
                                   "padded_mflop", "real_gflop_per_s", "gemm_gflop_per_s", "share_of_gemm",
                                   "float64_max_diff", "equal"]))
    print(table)
    write_results(args.out, "bench_vmap_vs_sequential",
                  {"environment": env, "args": vars(args), "model": vars(cfg), "train": vars(tcfg),
                   "results": results}, table)
    return 0 if all(r["equal"] for r in ok) else 1


if __name__ == "__main__":
    sys.exit(main())
