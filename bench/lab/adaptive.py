"""Adaptive rollout budgets on the embedded model: what each rule saves, in counts.

For one lookahead setting (default: the README's main job) and each variant (the fixed
lookahead, every adaptive rule alone, all of them together), power-sample the same prompts
with the same seed and report per generated token the tokens the model decoded and its
sequential forwards (both counts, the same on every machine), how many decisions each rule
settled, and the wall time (this machine only).

    python -m bench.lab.adaptive [--setting main|paper32] [--max-new-tokens 256] [--json out.json]

``main``: B = 32, L = 8, K = 4, M = 4, H = 32 (README command 1); ``paper32``: L = 32,
K = M = 8, B = H = 32. Variants: skip_share 0.99; rounds of 2 rollouts at tolerance 0.05;
entropy_cut ``--entropy`` nats (default 2.5) with blocks of at least ``--entropy-after``
tokens (default 1); all three.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter

import torch

SETTINGS = {
    "main": dict(block_size=32, num_candidates=8, top_k=4, num_rollouts=4, horizon=32),
    "paper32": dict(block_size=32, num_candidates=32, top_k=8, num_rollouts=8, horizon=32),
}

PROMPTS = (
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. How many "
    "clips did Natalia sell altogether in April and May? Explain step by step.",
    "What is 17 * 23? Think step by step.",
)


def variants(entropy: float, after: int = 1) -> list[tuple[str, dict]]:
    skip = dict(skip_share=0.99)
    rounds = dict(rollouts_per_round=2, round_tolerance=0.05)
    cut = dict(entropy_cut=entropy, entropy_cut_after=after)
    cut_name = f"entropy cut {entropy:g}" + (f" after {after}" if after > 1 else "")
    return [("fixed", {}), ("skip 0.99", skip), ("rounds of 2, tol 0.05", rounds), (cut_name, cut),
            ("all three", {**skip, **rounds, **cut})]


def skip_check(blocks, share: float, alpha: float = 4.0) -> list[dict]:
    """For the fixed lookahead's decisions whose top candidate holds >= ``share`` of the
    candidates' p^alpha mass: the TV between that p^alpha choice and the choice the rollouts
    estimated, the largest log zeta_hat ratio of another candidate over the top one (the rule
    is safe while it stays small) and ``kept``: True where skip_share keeps the rollouts all
    the same, because the top candidate has a future and another one ended (no rollouts: its
    ``rollout_ess`` is None)."""
    out = []
    for block in blocks:
        if len(block.candidates) < 2 or block.rule != "fixed":
            continue
        logp = torch.tensor(block.candidate_logprobs, dtype=torch.float64)
        shares = torch.softmax(alpha * logp, -1)
        top = int(shares.argmax())
        if float(shares[top]) < share:
            continue
        probs = torch.tensor(block.probs, dtype=torch.float64)
        log_zeta = torch.tensor(block.log_zeta, dtype=torch.float64)
        others = torch.cat([log_zeta[:top], log_zeta[top + 1:]])
        ended = [ess is None for ess in (block.rollout_ess or [0.0] * len(block.candidates))]
        out.append(dict(share=float(shares[top]), tv=0.5 * float((shares - probs).abs().sum()),
                        log_zeta_ratio=float(others.max() - log_zeta[top]), kept=not ended[top] and any(ended)))
    return out


def measure(model, tokenizer, setting: dict, extra: dict, max_new_tokens: int, seed: int) -> dict:
    from powerfast.samplers.factory import make_sampler

    sampler = make_sampler("power", model, tokenizer, seed=seed, alpha=4.0, rollout_proposal="base",
                           **setting, **extra)
    generated = decoded = forwards = 0
    rules: Counter = Counter()
    checks: list[dict] = []
    started = time.perf_counter()
    for prompt in PROMPTS:  # one at a time: a prompt's forwards are its own sequential forwards
        [result] = sampler.generate([prompt], max_new_tokens)
        generated += len(result.token_ids)
        decoded += result.stats.tokens_total
        forwards += result.stats.num_forwards
        rules.update(block.rule for block in result.stats.blocks)
        checks.extend(skip_check(result.stats.blocks, 0.99))
    seconds = time.perf_counter() - started
    return dict(generated=generated, decoded=decoded, forwards=forwards, decoded_per_token=decoded / generated,
                forwards_per_token=forwards / generated, rules=dict(rules), seconds=seconds, skip_check=checks)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.lab.adaptive", description=__doc__.split("\n\n")[0])
    parser.add_argument("--setting", choices=sorted(SETTINGS), default="main")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--entropy", type=float, default=2.5, help="entropy_cut of the cut variants (nats)")
    parser.add_argument("--entropy-after", type=int, default=1,
                        help="entropy_cut_after of the cut variants: the shortest block a cut leaves (tokens)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the rows here")
    parser.add_argument("--variants", default=None,
                        help="comma-separated variant names to run (default all; 'fixed' prints the skip check)")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from powerfast.runtime.models import load_model

    model, tokenizer = load_model(None)
    setting = SETTINGS[args.setting]
    rows = []
    chosen = variants(args.entropy, args.entropy_after)
    if args.variants:
        wanted = [v.strip() for v in args.variants.split(",")]
        chosen = [v for v in chosen if v[0] in wanted or v[0].split()[0] in wanted]
        if not chosen or chosen[0][0] != "fixed":
            parser.error("--variants must include fixed (the other rows are relative to it)")
    for name, extra in chosen:
        row = dict(variant=name, **measure(model, tokenizer, setting, extra, args.max_new_tokens, args.seed))
        rows.append(row)
        print(f"{name}: {row}", file=sys.stderr, flush=True)
    fixed = rows[0]
    print(f"setting {args.setting}: {setting}, alpha 4, base rollouts, {len(PROMPTS)} prompts, "
          f"max {args.max_new_tokens} new tokens, seed {args.seed}")
    print("| variant | generated | decoded / token | vs fixed | forwards / token | decisions by rule | s |")
    print("|---|---:|---:|---:|---:|---|---:|")
    for row in rows:
        rules = ", ".join(f"{k} {v}" for k, v in sorted(row["rules"].items()))
        print(f"| {row['variant']} | {row['generated']} | {row['decoded_per_token']:.1f} | "
              f"{row['decoded_per_token'] / fixed['decoded_per_token']:.2f} | {row['forwards_per_token']:.2f} | "
              f"{rules} | {row['seconds']:.0f} |")
    kept = [c for c in fixed["skip_check"] if c["kept"]]
    if kept:
        tvs = ", ".join(f"{c['tv']:.2e}" for c in kept)
        ratios = ", ".join(f"{c['log_zeta_ratio']:.2f}" for c in kept)
        print(f"\nskip check: {len(kept)} decisions with a top p^alpha share >= 0.99 keep their rollouts (another "
              f"candidate ended): TV to the rollouts' choice {tvs}; log zeta_hat ratio {ratios}")
    checks = [c for c in fixed["skip_check"] if not c["kept"]]
    if checks:
        worst = max(checks, key=lambda c: c["tv"])
        print(f"\nskip check (fixed lookahead, decisions skip_share 0.99 would skip): {len(checks)} decisions; "
              f"TV between the p^alpha choice and the rollouts' estimate: mean {sum(c['tv'] for c in checks) / len(checks):.2e}, "
              f"max {worst['tv']:.2e} (share {worst['share']:.6f}, largest log zeta_hat ratio of another candidate "
              f"{worst['log_zeta_ratio']:.2f}); largest log zeta_hat ratio over all: "
              f"{max(c['log_zeta_ratio'] for c in checks):.2f}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(dict(setting=args.setting, settings=setting, rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
