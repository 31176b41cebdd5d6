"""``popgpt attribute``: which training names taught the backdoor?"""

import argparse

from ..attribution.attribute import POOLS, AttributionConfig, attribute
from .common import add_runtime, count_int, finite_float, positive_int, resolve_device, threads

ATTRIBUTE_EPILOG = """examples:
  popgpt attribute runs/quick --members 4 --lds-members 32      # a few minutes on a CPU
  popgpt attribute runs/full --proj-dim 2048 --device cuda
"""


def _steps(text: str) -> tuple:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ValueError(f"argument --checkpoints: expected steps like 0,20,40, got {text!r}") from None


def cmd_attribute(args) -> int:
    cfg = AttributionConfig(members=args.members, checkpoints=_steps(args.checkpoints), names=args.names,
                            chunk=args.chunk, proj_dim=args.proj_dim, damping=args.damping, gn_names=args.gn_names,
                            lds_members=args.lds_members, lds_frac=args.lds_frac, query_names=args.query_names,
                            pool=args.pool, top=args.top, seed=args.seed)
    with threads(args.threads):
        attribute(args.run_dir, cfg, device=resolve_device(args.device))
    return 0


def register(sub) -> None:
    ad = AttributionConfig()
    at = sub.add_parser("attribute", help="which training names taught the backdoor? attribution scored against "
                        "the planted truth", epilog=ATTRIBUTE_EPILOG,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    at.add_argument("run_dir", help="a run folder written by popgpt evolve (its generation 0 is replayed)")
    at.add_argument("--members", type=positive_int, default=ad.members,
                    help=f"generation-0 members replayed and attributed (default: {ad.members})")
    at.add_argument("--checkpoints", default=",".join(map(str, ad.checkpoints)),
                    help=f"training steps whose gradients TracIn sums (default: {','.join(map(str, ad.checkpoints))})")
    at.add_argument("--names", type=count_int, default=ad.names,
                    help="candidate training names scored, a random subset (default: 0, all)")
    at.add_argument("--chunk", type=positive_int, default=ad.chunk,
                    help=f"names per per-example-gradient chunk (default: {ad.chunk})")
    at.add_argument("--proj-dim", type=count_int, default=ad.proj_dim,
                    help="random projection of the gradients to this many dimensions (default: 0, exact)")
    at.add_argument("--damping", type=finite_float, default=ad.damping,
                    help=f"Gauss-Newton damping, a fraction of its mean eigenvalue (default: {ad.damping})")
    at.add_argument("--gn-names", type=positive_int, default=ad.gn_names,
                    help=f"training names of the Gauss-Newton estimate (default: {ad.gn_names})")
    at.add_argument("--lds-members", type=count_int, default=ad.lds_members,
                    help=f"members trained on random subsets for the LDS, 0: none (default: {ad.lds_members})")
    at.add_argument("--lds-frac", type=finite_float, default=ad.lds_frac,
                    help=f"fraction of the names in each LDS subset (default: {ad.lds_frac})")
    at.add_argument("--query-names", type=positive_int, default=ad.query_names,
                    help=f"held-out names of the clean control query (default: {ad.query_names})")
    at.add_argument("--pool", choices=POOLS, default=ad.pool,
                    help="pool member scores standardised per member (zscore, default) or raw")
    at.add_argument("--top", type=positive_int, default=ad.top, help=f"names listed per method (default: {ad.top})")
    at.add_argument("--seed", type=int, default=ad.seed, help=f"the tool's seed (default: {ad.seed})")
    add_runtime(at)
    at.set_defaults(func=cmd_attribute)
