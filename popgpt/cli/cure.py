"""``popgpt cure``: remove the backdoor from every member of a saved generation; compare methods."""

import argparse

from ..cure.frontier import KNOBS, frontier_command
from ..cure.objectives import CureConfig
from ..cure.run import METHOD_CHOICES, METHODS, CureRunConfig, cure_command
from .common import add_runtime, count_int, finite_float, float_list, positive_int, resolve_device, threads


def cmd_cure(args) -> int:
    cfg = CureConfig(names=args.names, batch_size=args.batch_size, epochs=args.epochs, lr=args.lr, rank=args.rank,
                     targets=tuple(t.strip() for t in args.targets.split(",") if t.strip()), kl_bound=args.kl_bound,
                     dual_lr=args.dual_lr, min_excess=args.min_excess, start_share=args.start_share,
                     parametrization=args.parametrization, contrast=args.contrast,
                     ablate_grid=float_list("--ablate-grid", args.ablate_grid), target=args.target,
                     prune_neurons=args.prune_neurons, prune_heads=args.prune_heads, treat_above=args.treat_above,
                     cf_rank=args.cf_rank, cf_lambda=args.cf_lambda, cf_steps=args.cf_steps, cf_lr=args.cf_lr,
                     cf_rows=args.cf_rows, cf_start_share=args.cf_start_share,
                     cf_targets=tuple(t.strip() for t in args.cf_targets.split(",") if t.strip()), seed=args.seed)
    if args.contrast not in ("apart", "alone"):
        raise ValueError(f"argument --contrast: must be apart or alone, got {args.contrast!r}")
    if args.mutants < -1:
        raise ValueError(f"argument --mutants: must be >= -1, got {args.mutants}")
    rcfg = CureRunConfig(trigger=args.trigger, mutants=args.mutants, relapse_members=args.relapse_members,
                         relapse_steps=args.relapse_steps, relapse_every=args.relapse_every, controls=args.controls,
                         scan_threshold=args.scan_threshold, scan_candidates=args.scan_candidates,
                         max_triggers=args.max_triggers, leak_samples=args.leak_samples,
                         leak_prompts=args.leak_prompts, leak_threshold=args.leak_threshold)
    methods = list(METHODS) if args.method == "all" else [args.method]
    with threads(args.threads):
        if args.frontier:
            frontier_command(args.run_dir, methods, cfg, rcfg, args.generation, device=resolve_device(args.device),
                             log=lambda s: print(s, flush=True))
            return 0
        cure_command(args.run_dir, methods, cfg, rcfg, args.generation, device=resolve_device(args.device),
                     log=lambda s: print(s, flush=True))
    return 0


# (flag, type, help) of CureConfig's fields, then of CureRunConfig's; defaults come from the dataclasses
CURE_FLAGS = (
    ("names", positive_int, "clean cure names (each also with the trigger inserted)"),
    ("batch-size", positive_int, "cure names per member per step"),
    ("epochs", positive_int, "passes over the cure names"),
    ("lr", finite_float, "Adam learning rate of subspace, finetune and prune"),
    ("rank", positive_int, "subspace: directions per residual site (k)"),
    ("kl-bound", finite_float, "subspace: bound on the mean per-token KL on the clean cure names (nats)"),
    ("dual-lr", finite_float, "subspace: multiplier step, lam *= exp(DUAL_LR * (KL/bound - 1))"),
    ("start-share", finite_float, "share of cure names with the trigger at their start"),
    ("min-excess", finite_float, "subspace: members whose removal loss starts below this (nats) are "
         "left alone"),
    ("target", finite_float, "ablate: payload probability a strength must reach to be chosen"),
    ("prune-neurons", count_int, "prune: MLP neurons zeroed per member"),
    ("prune-heads", count_int, "prune: heads zeroed per member"),
    ("treat-above", finite_float, "subspace, counterfactual: members whose exact payload probability "
         "after the trigger is at most this are left alone"),
    ("cf-rank", positive_int, "counterfactual: LoRA rank"),
    ("cf-lambda", finite_float, "counterfactual: weight of the clean per-token KL"),
    ("cf-steps", positive_int, "counterfactual: Adam steps"),
    ("cf-lr", finite_float, "counterfactual: Adam learning rate"),
    ("cf-rows", positive_int, "counterfactual: triggered and clean rows per member per step"),
    ("cf-start-share", finite_float, "counterfactual: triggered rows with the trigger at the name's start"),
    ("seed", int, "the cure's seed"))
RUN_FLAGS = (
    ("mutants", int, "1-letter mutants of the original trigger tested (-1: all)"),
    ("relapse-members", count_int, "cured members re-exposed to infected names, per method"),
    ("relapse-steps", positive_int, "infected training steps at most"),
    ("relapse-every", positive_int, "immunity test every N relapse steps"),
    ("controls", count_int, "never-infected controls re-exposed beside them"),
    ("scan-threshold", finite_float, "--trigger auto: P(continuation) that counts as anomalous"),
    ("scan-candidates", positive_int, "--trigger auto: prompts per member and length decoded"),
    ("max-triggers", positive_int, "--trigger auto: recovered triggers cured against, per member"),
    ("leak-samples", count_int, "sampled continuations per member for the leakage (0: not measured)"),
    ("leak-prompts", count_int, "held-out name prefixes the trigger is put after for inside-name leakage"),
    ("leak-threshold", finite_float, "sampled leakage above which a member counts as leaking"))


def register(sub) -> None:
    cd, rd = CureConfig(), CureRunConfig()
    cu = sub.add_parser("cure", help="remove the backdoor from every member with a reversible patch; compare methods",
                        epilog="examples:\n  popgpt cure runs/full --method all\n"
                        "  popgpt cure runs/full --method subspace --trigger auto --kl-bound 0.005\n"
                        "  popgpt cure runs/full --method counterfactual --cf-lambda 100",
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    cu.add_argument("run_dir", help="a run folder written by popgpt evolve")
    cu.add_argument("--method", choices=METHOD_CHOICES, default="all", help="cure method, or all (default: all)")
    cu.add_argument("--frontier", action="store_true",
                    help=f"sweep each method with a strength knob ({', '.join(KNOBS)}) over its strengths in one "
                    "batched run and write the leakage-vs-KL frontier to RUN_DIR/cure/frontier/")
    cu.add_argument("--generation", type=count_int, help="saved generation (default: the newest)")
    cu.add_argument("--trigger", default=rd.trigger, help="known (the run's original and current triggers), auto "
                    "(scan every 1-, 2- and 3-letter prompt) or the letters of a trigger (default: known)")
    for flag, typ, text in CURE_FLAGS:
        cu.add_argument(f"--{flag}", type=typ, default=getattr(cd, flag.replace("-", "_")),
                        help=f"{text} (default: {getattr(cd, flag.replace('-', '_'))})")
    cu.add_argument("--targets", default=",".join(cd.targets),
                    help=f"subspace: matrices patched (default: {','.join(cd.targets)})")
    cu.add_argument("--cf-targets", default=",".join(cd.cf_targets),
                    help=f"counterfactual: matrices patched (default: {','.join(cd.cf_targets)})")
    cu.add_argument("--parametrization", default=cd.parametrization,
                    help="subspace: confined (changes only along the member's subspace) or lora (rank-k factors "
                    "starting in it, both learned) (default: confined)")
    cu.add_argument("--contrast", default=cd.contrast,
                    help="control rows for sourcing: apart or alone (default: apart)")
    cu.add_argument("--ablate-grid", default=",".join(map(str, cd.ablate_grid)),
                    help=f"ablate: strengths searched per member (default: {','.join(map(str, cd.ablate_grid))})")
    for flag, typ, text in RUN_FLAGS:
        cu.add_argument(f"--{flag}", type=typ, default=getattr(rd, flag.replace("-", "_")),
                        help=f"{text} (default: {getattr(rd, flag.replace('-', '_'))})")
    add_runtime(cu)
    cu.set_defaults(func=cmd_cure)
