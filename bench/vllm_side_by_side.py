"""Our runtime and vLLM side by side, in one process, on the same model, prompts and settings.

Run in the vLLM environment (``bash .ci/vllm-env``), on an idle machine:

    .venv-vllm/bin/python -m bench.vllm_side_by_side --out out/side_by_side.json

Rows (EOS ignored, so every completion has the budget's length; one chat-templated prompt,
repeated where a row has several requests): plain with 1 and with 64 requests; the lookahead
scaled down (B 16, L 8, K 4, M 4, H 16 over 64 tokens) and at the paper's shape over one
block (B = max_new_tokens = 192, L 32, K 8, M 8: the last block has no horizon left, so it is
the candidates and the choice by p^alpha); Power-SMC with N = 8 and 32; MCMC (B 16, 4 steps).
Each row runs once on each engine after one warm-up of the same row at a quarter of the
budget. Reported per row and engine: seconds, decoded tokens per generated token (vLLM's
scored tokens, a prefill, are reported apart), and vLLM's time over ours. vLLM starts once
(its start-up is reported, not counted in the rows).
"""

from __future__ import annotations

import argparse
import json
import sys
import time


ROWS = [
    # name, method, settings, requests, max_new_tokens
    ("plain x1", "plain", {}, 1, 128),
    ("plain x64", "plain", {}, 64, 128),
    ("power scaled", "power", dict(block_size=16, num_candidates=8, top_k=4, num_rollouts=4, horizon=16), 1, 64),
    ("power paper shape, one block", "power", dict(block_size=192, num_candidates=32, top_k=8, num_rollouts=8,
                                                   horizon=192), 1, 192),
    ("smc N=8", "smc", dict(num_particles=8, resample_every=16), 1, 64),
    ("smc N=32", "smc", dict(num_particles=32, resample_every=16), 1, 64),
    ("mcmc", "mcmc", dict(block_size=16, mcmc_steps=4), 1, 64),
]

PROMPT = "Explain step by step: what is 17 times 23?"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.vllm_side_by_side", description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default=None, help="comma-separated row names (default: all)")
    parser.add_argument("--scale", type=float, default=1.0,
                        help="multiply every budget by this (a smoke run: 0.125) (default 1)")
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    return parser


def _ours(model, tokenizer, method, settings, requests, budget):
    from powerfast.core.config import method_config
    from powerfast.runtime.runner import ModelRunner
    from powerfast.samplers.factory import make_sampler

    sampler = make_sampler(method, ModelRunner(model, max_memory=2 << 30), tokenizer, seed=0,
                           config=method_config(method, alpha=4.0, **settings))
    started = time.perf_counter()
    results = sampler.generate([PROMPT] * requests, budget, ignore_eos=True)
    seconds = time.perf_counter() - started
    generated = sum(r.num_tokens for r in results)
    decoded = sum(r.stats.tokens_total for r in results)  # every phase but the prompt's prefill
    return seconds, generated, decoded, 0


def _vllm(engine, method, settings, requests, budget):
    started = time.perf_counter()
    results = engine.generate([PROMPT] * requests, method, max_new_tokens=budget, ignore_eos=True, alpha=4.0,
                              **settings)
    seconds = time.perf_counter() - started
    generated = sum(r.num_tokens for r in results)
    phases = [r.stats["tokens_by_phase"] for r in results]
    decoded = sum(v for p in phases for k, v in p.items() if k != "scored")
    scored = sum(p.get("scored", 0) for p in phases)
    return seconds, generated, decoded, scored


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from powerfast.engines.vllm import VLLMEngine
    from powerfast.runtime.models import default_model_dir, load_model

    rows = [r for r in ROWS if args.rows is None or r[0] in args.rows.split(",")]
    folder = default_model_dir()
    model, tokenizer = load_model(folder)
    started = time.perf_counter()
    engine = VLLMEngine(folder, kv_memory=1024, max_model_len=1024)
    startup = time.perf_counter() - started
    print(f"vLLM started in {startup:.1f} s", file=sys.stderr)
    table = []
    for name, method, settings, requests, budget in rows:
        budget = max(4, int(budget * args.scale))
        settings = dict(settings)
        for key in ("block_size", "horizon"):
            if key in settings:
                settings[key] = max(1, min(budget, int(settings[key] * args.scale)))
        if "resample_every" in settings:
            settings["resample_every"] = max(1, int(settings["resample_every"] * args.scale))
        warm = max(4, budget // 4)
        warm_settings = {k: (min(v, warm) if k in ("block_size", "horizon") else v) for k, v in settings.items()}
        _ours(model, tokenizer, method, warm_settings, requests, warm)
        _vllm(engine, method, warm_settings, requests, warm)
        ours = _ours(model, tokenizer, method, settings, requests, budget)
        theirs = _vllm(engine, method, settings, requests, budget)
        row = {"row": name, "method": method, "settings": settings, "requests": requests, "max_new_tokens": budget,
               "ours_s": ours[0], "vllm_s": theirs[0], "vllm_over_ours": theirs[0] / ours[0],
               "ours_decoded_per_generated": ours[2] / ours[1], "vllm_decoded_per_generated": theirs[2] / theirs[1],
               "vllm_scored_per_generated": theirs[3] / theirs[1]}
        table.append(row)
        print(f"{name:32s} ours {ours[0]:7.2f} s  vLLM {theirs[0]:7.2f} s  ({row['vllm_over_ours']:.2f}x)  decoded/"
              f"generated {row['ours_decoded_per_generated']:.1f} / {row['vllm_decoded_per_generated']:.1f}"
              f" (+{row['vllm_scored_per_generated']:.1f} scored)", flush=True)
    if args.out:
        with open(args.out, "w") as handle:
            json.dump({"vllm_startup_s": startup, "rows": table}, handle, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
