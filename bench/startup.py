"""Start-up of the ``powerfast`` command: wall time of fresh processes, and where it goes.

    python -m bench.startup [--repeats 5] [--cache DIR]

Runs, each ``--repeats`` times in a fresh interpreter (the operating system's file cache
warm, as for a user's second run):

- ``settings error``: ``powerfast sample hi --alpha 0`` (fails on the settings);
- ``first token``:   ``powerfast sample hi --method greedy --max-new-tokens 1`` (import,
  load the embedded default model, one prefill and one token);
- ``phases``:        one process timing, in order, ``import torch``, ``import transformers``
  and the model class, ``load_model()`` (weights and tokenizer).

Prints the median and the range of each. ``--cache`` sets ``POWERFAST_CACHE`` (a folder
holding the converted default model).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

PHASES = r"""
import time
t0 = time.perf_counter()
import torch
t1 = time.perf_counter()
import transformers
from transformers.models.llama import modeling_llama
t2 = time.perf_counter()
from powerfast.runtime.models import load_model
model, tokenizer = load_model(verbose=False)
t3 = time.perf_counter()
print(f"{t1 - t0:.3f} {t2 - t1:.3f} {t3 - t2:.3f}")
"""


def wall(argv: list[str], env: dict) -> float:
    started = time.perf_counter()
    subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
    return time.perf_counter() - started


def summary(values: list[float]) -> str:
    return f"median {statistics.median(values):.2f} s (range {min(values):.2f}-{max(values):.2f})"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cache", default=None, help="POWERFAST_CACHE for the runs")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    env = dict(os.environ)
    if args.cache:
        env["POWERFAST_CACHE"] = args.cache
    command = [sys.executable, "-m", "powerfast.cli", "sample", "hi"]
    settings, first, phases = [], [], []
    for _ in range(args.repeats):  # interleaved, so that load changes hit every measurement alike
        settings.append(wall(command + ["--alpha", "0"], env))
        first.append(wall(command + ["--method", "greedy", "--max-new-tokens", "1", "--seed", "0"], env))
        out = subprocess.run([sys.executable, "-c", PHASES], env=env, capture_output=True, text=True, check=True)
        phases.append([float(x) for x in out.stdout.split()])
    print(f"settings error:  {summary(settings)}")
    print(f"first token:     {summary(first)}")
    for index, name in enumerate(["import torch", "import transformers + Llama", "load_model()"]):
        print(f"  {name + ':':28s} {summary([p[index] for p in phases])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
