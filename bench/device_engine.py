"""Continuous batching on a device: requests/s and tokens/s through the engine at several
concurrencies against the same requests run one ``generate`` call at a time.

The ``engine`` stage of ``bench/device_check.sh``: a Qwen2.5-1.5B-shaped model with random
weights (bf16 on CUDA), random-token prompts, EOS ignored, plain and power sampling
(B = H = 16, L = 8, K = M = 4 unless flags say otherwise). The measuring code is
``bench/bench_serve.py``'s; this script adds the device model, a time budget (a pass
projected past it is skipped and listed) and the JSON the device report reads.

    python -m bench.device_engine [--model qwen2.5-1.5b] [--requests 16] [--max-tokens 48]
    python -m bench.device_engine --smoke        # tiny model on the CPU (what CI runs; not a measurement)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from bench.bench_serve import TINY_SETTINGS, run_engine, run_sequential, table
from bench.e2e import build_model, make_prompts
from powerfast.runtime.runner import ModelRunner

DEVICE_SETTINGS = {"block_size": 16, "horizon": 16, "num_candidates": 8, "top_k": 4, "num_rollouts": 4}


def _int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="qwen2.5-1.5b", help="a bench/e2e.py model name (default qwen2.5-1.5b)")
    parser.add_argument("--methods", default="plain,power")
    parser.add_argument("--concurrency", type=_int_list, default=[1, 8, 16])
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--kv-memory-mib", type=int, default=16384)
    parser.add_argument("--budget-s", type=float, default=0.0, help="skip passes projected past this (0: none)")
    parser.add_argument("--json", default=None, help="write every number here")
    parser.add_argument("--smoke", action="store_true", help="tiny model on the CPU, a few tokens")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    settings = dict(DEVICE_SETTINGS)
    if args.smoke:
        args.model, args.requests, args.max_tokens, args.prompt_len, args.kv_memory_mib = "tiny", 4, 8, 8, 64
        args.concurrency = [1, 4]
        settings = {k: v for k, v in TINY_SETTINGS.items() if k in DEVICE_SETTINGS}
        if not torch.cuda.is_available():
            os.environ["POWERFAST_INTERPRET_OPS"] = "0"  # the torch path of the ops, not the interpreter
    started = time.perf_counter()
    model, tokenizer, description = build_model(args.model, device=None if not args.smoke else "cpu")
    runner = ModelRunner(model, max_memory=args.kv_memory_mib << 20)
    prompts = make_prompts(model, None, args.requests, args.prompt_len)
    print(f"{description}; {args.requests} requests of {args.max_tokens} tokens, prompts of {args.prompt_len}; "
          f"power {settings}", file=sys.stderr, flush=True)
    results, skipped = [], []
    for method in [m for m in args.methods.split(",") if m]:
        run_sequential(runner, None, prompts[:2], method, min(args.max_tokens, 8), settings)  # warm-up, graphs
        run_engine(runner, None, prompts[: max(args.concurrency)], method, 8, settings, max(args.concurrency))
        sequential = None
        for concurrency in [0, *args.concurrency]:
            left = args.budget_s - (time.perf_counter() - started) if args.budget_s else float("inf")
            # the one-by-one pass bounds every engine pass: skip what cannot fit
            if sequential is not None and sequential.seconds > left or left <= 0:
                skipped.append(f"{method}@{concurrency or '1-by-1'}")
                continue
            if concurrency == 0:
                result = sequential = run_sequential(runner, None, prompts, method, args.max_tokens, settings)
            else:
                result = run_engine(runner, None, prompts, method, args.max_tokens, settings, concurrency)
            print(f"{method} {concurrency or '1-by-1'}: {result.seconds:.2f} s", file=sys.stderr, flush=True)
            results.append(result)
    print(table(results, f"engine vs one generate call at a time ({description}, {runner.device})"))
    if skipped:
        print(f"skipped (budget): {', '.join(skipped)}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "model": description, "device": str(runner.device), "requests": args.requests,
            "max_tokens": args.max_tokens, "settings": settings, "skipped": skipped,
            "rows": [{"method": r.method, "concurrency": r.concurrency, "seconds": r.seconds,
                      "requests_per_second": r.requests_per_second, "tokens_per_second": r.tokens_per_second,
                      "decoded_tokens": r.decoded_tokens} for r in results],
        }, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
