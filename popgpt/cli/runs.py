"""``popgpt sample | report | vaccinate | revive``: looking at and experimenting on a finished run."""

import sys

from ..evolution.analysis import sample_member
from ..evolution.report import write_report
from ..evolution.revival import RevivalConfig, revive
from ..evolution.runs import open_run
from ..evolution.vaccine import VaccineConfig, vaccinate
from .common import add_runtime, count_int, finite_float, positive_int, resolve_device, threads

RUN_DIR = "a run folder written by popgpt evolve"


def cmd_sample(args) -> int:
    run = open_run(args.run_dir)
    if run.note(args.generation):
        print(run.note(args.generation), file=sys.stderr)
    with threads(args.threads):
        names = sample_member(run, args.member, args.count, args.generation, args.seed,
                              device=resolve_device(args.device))
    for name in names:
        print(name)
    return 0


def cmd_report(args) -> int:
    with threads(args.threads):
        write_report(args.run_dir, sigma=args.sigma, retest_special=not args.no_retest,
                     device=resolve_device(args.device))
    return 0


def cmd_vaccinate(args) -> int:
    cfg = VaccineConfig(tensors=tuple(t for t in args.tensors.split(",") if t), n_donors=args.donors,
                        recipients=args.recipients, steps=args.steps, challenge_steps=args.challenge_steps,
                        n_triggers=args.triggers, sigma=args.sigma, seed=args.seed)
    with threads(args.threads):
        vaccinate(args.run_dir, cfg, device=resolve_device(args.device))
    return 0


def cmd_revive(args) -> int:
    cfg = RevivalConfig(steps=args.steps, every=args.every, controls=args.controls, sigma=args.sigma, seed=args.seed)
    with threads(args.threads):
        revive(args.run_dir, cfg, device=resolve_device(args.device))
    return 0


def register(sub) -> None:
    sm = sub.add_parser("sample", help="print names sampled from one saved member")
    sm.add_argument("run_dir", help=RUN_DIR)
    sm.add_argument("--member", type=count_int, required=True, help="member index in that generation")
    sm.add_argument("--count", type=positive_int, default=20, help="names to print (default: 20)")
    sm.add_argument("--generation", type=count_int, help="saved generation (default: the newest)")
    sm.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    add_runtime(sm)
    sm.set_defaults(func=cmd_sample)

    rp = sub.add_parser("report", help="tables, plots and report.md for a finished run")
    rp.add_argument("run_dir", help=RUN_DIR)
    rp.add_argument("--sigma", type=finite_float, default=1.5,
                    help="special members: immune and quality >= mean + SIGMA sd of the immune (default: 1.5)")
    rp.add_argument("--no-retest", action="store_true",
                    help="skip re-evaluating special members on fresh names and samples")
    add_runtime(rp)
    rp.set_defaults(func=cmd_report)

    vd = VaccineConfig()
    vc = sub.add_parser("vaccinate", help="transplant tensors from immune donors into fresh members")
    vc.add_argument("run_dir", help=RUN_DIR)
    vc.add_argument("--tensors", default=",".join(vd.tensors),
                    help=f"comma-separated parameter names (default: {','.join(vd.tensors)})")
    vc.add_argument("--donors", type=positive_int, default=vd.n_donors,
                    help=f"best special (else immune) members used (default: {vd.n_donors})")
    vc.add_argument("--recipients", type=positive_int, default=vd.recipients,
                    help=f"vaccinated members, and as many controls (default: {vd.recipients})")
    vc.add_argument("--steps", type=count_int, default=vd.steps, help=f"clean training steps (default: {vd.steps})")
    vc.add_argument("--challenge-steps", type=count_int, default=vd.challenge_steps,
                    help=f"then training steps on infected names (default: {vd.challenge_steps}, no challenge)")
    vc.add_argument("--triggers", type=count_int, default=vd.n_triggers,
                    help=f"mutated triggers tested (default: {vd.n_triggers})")
    vc.add_argument("--sigma", type=finite_float, default=vd.sigma, help=f"special-member rule (default: {vd.sigma})")
    vc.add_argument("--seed", type=int, default=vd.seed, help=f"the experiment's seed (default: {vd.seed})")
    add_runtime(vc)
    vc.set_defaults(func=cmd_vaccinate)

    rd = RevivalConfig()
    rv = sub.add_parser("revive", help="re-expose immune members to infected names: how fast does the backdoor return?")
    rv.add_argument("run_dir", help=RUN_DIR)
    rv.add_argument("--steps", type=positive_int, default=rd.steps,
                    help=f"infected training steps at most (default: {rd.steps})")
    rv.add_argument("--every", type=positive_int, default=rd.every,
                    help=f"immunity test every N steps (default: {rd.every})")
    rv.add_argument("--controls", type=count_int, default=rd.controls,
                    help=f"never-infected controls (default: {rd.controls})")
    rv.add_argument("--sigma", type=finite_float, default=rd.sigma, help=f"special-member rule (default: {rd.sigma})")
    rv.add_argument("--seed", type=int, default=rd.seed, help=f"the experiment's seed (default: {rd.seed})")
    add_runtime(rv)
    rv.set_defaults(func=cmd_revive)
