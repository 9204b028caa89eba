"""Write ``powerfast/data/arithmetic.json``, the problems of the ``arithmetic`` task, or a split set.

    python -m bench.make_arithmetic [--count 300] [--seed 20250801] [--out FILE] [--check]
    python -m bench.make_arithmetic --set arithmetic2|multistep [--out FILE] [--check]

With ``--set`` the file is ``dumps(generate_set(SPLIT_SETS[name]))`` (its declaration fixes
count, seed and splits), ``powerfast/data/<name>.json`` by default.

The file is ``powerfast.evaluation.arithmetic.dumps(generate(count, seed))``: the same
arguments write the same bytes. ``--check`` writes nothing and exits 1 when the file differs
from what the generator gives (the shipped file must be regenerated after a change to the
generator).
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

from powerfast.evaluation import arithmetic

DATA_FILE = Path(__file__).resolve().parent.parent / "powerfast" / "data" / "arithmetic.json"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=arithmetic.DEFAULT_COUNT, help="problems (default %(default)s)")
    parser.add_argument("--seed", type=int, default=arithmetic.DEFAULT_SEED, help="seed (default %(default)s)")
    parser.add_argument("--out", type=Path, default=DATA_FILE, help="file to write (default: the shipped one)")
    parser.add_argument("--check", action="store_true", help="compare with the file instead of writing it")
    parser.add_argument("--set", default=None, choices=tuple(arithmetic.SPLIT_SETS),
                        help="write a split set instead (its declaration fixes count and seed)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)

    if args.set is not None:
        if args.count != arithmetic.DEFAULT_COUNT or args.seed != arithmetic.DEFAULT_SEED:
            parser.error("--set takes its count and seed from the set's declaration: drop --count and --seed")
        problem_set = arithmetic.SPLIT_SETS[args.set]
        problems = arithmetic.generate_set(problem_set)
        if args.out == DATA_FILE:
            args.out = DATA_FILE.with_name(problem_set.file_name)
    else:
        problems = arithmetic.generate(args.count, args.seed)
    text = arithmetic.dumps(problems)
    if args.check:
        current = args.out.read_text(encoding="utf-8") if args.out.is_file() else None
        if current != text:
            what = f"set {args.set}" if args.set else f"count {args.count}, seed {args.seed}"
            print(f"{args.out} differs from the generator's output ({what})")
            return 1
        print(f"{args.out} is up to date")
        return 0
    args.out.write_text(text, encoding="utf-8")
    kinds = ", ".join(f"{kind} {n}" for kind, n in Counter(p.kind for p in problems).items())
    print(f"wrote {len(problems)} problems ({kinds}) to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
