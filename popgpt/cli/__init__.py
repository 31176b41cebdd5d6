"""The command line: ``popgpt evolve | sweep | sample | report | vaccinate | revive | heads | attention |
induction | attribute | grok | cure``, one module per family, each declaring its flags beside its command.

``evolve`` runs (or resumes) the evolution experiment and ``sweep`` a grid of its readings; ``sample``,
``report``, ``vaccinate`` and ``revive`` work on a finished run (``cli.runs``); ``heads``, ``attention``
and ``induction`` are the microscope (``cli.lens``); ``attribute``, ``grok`` and ``cure`` have their own.
"""

import argparse
import sys

from ..data import DataError
from ..device import retain_freed_memory
from ..evolution import distributed
from ..runio import RunError
from . import attribute, cure, evolve, grok, lens, runs
from .evolve import EPILOG, FLAGS, config_from_args, parse_grid  # noqa: F401  (the run flags, for tests and tools)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="popgpt", description="Populations of tiny GPTs, trained together.",
                                     epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for family in (evolve, runs, lens, attribute, grok, cure):
        family.register(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    retain_freed_memory()
    try:
        return args.func(args)
    except distributed.FromRankZero:
        return 2  # rank 0 prints it
    except (DataError, RunError, ValueError, MemoryError) as e:
        rank, world = distributed.launched_rank(), distributed.launched_world()
        where = f"rank {rank} of {world}: " if world > 1 and not str(e).startswith("rank ") else ""
        print(f"popgpt: error: {where}{e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
