"""How likely is each arm's answer under the model? log p(completion | prompt) of every record,
against the baseline arm's completion for the same problem.

Power sampling targets p(x)^alpha: at alpha = 8 a completion 1 nat less likely than another has
e^-8 of its weight. So when a power arm's completions are mostly *less* likely than greedy's, the
sampler has not reached the sharpened law's high-probability region (it under-sharpens); when they
are more likely and still wrong, the target itself prefers the wrong answers and no sampler of it
can help. This script tells the two apart on an eval's records (validation records only: reading
the test split's answers this way is for after the test):

    python -m bench.lab.score_completions --model default --baseline greedy \\
        bench/studies/validation/smollm2-multistep-pass3/arms/greedy \\
        bench/studies/validation/smollm2-multistep-pass3/arms/block-tempered-a8-k4 [--json out.json]

Each arm folder holds ``<task>/*.jsonl`` records (``powerfast eval``'s). A completion is scored as
recorded (cut at the task's stop), retokenised after its prompt, in one forward pass; the prompt is
tokenised as ``powerfast eval`` does for plain-text prompts (the tokenizer's ids, special tokens
included), so use it for ``-fewshot`` tasks. Per arm: problems, correct, completions equal to the
baseline's, completions more / less likely than the baseline's, the median difference in nats.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

__all__ = ["build_parser", "completion_logprob", "load_records", "main", "summarise"]


def completion_logprob(model, prompt_ids: list[int], completion_ids: list[int]) -> float:
    """sum_t log p(completion_t | prompt, completion_<t) under ``model`` (one forward pass)."""
    if not prompt_ids:
        raise ValueError("prompt_ids is empty: the first completion token needs a context")
    if not completion_ids:
        return 0.0
    ids = torch.tensor([list(prompt_ids) + list(completion_ids)], device=model.device)
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt_ids) - 1:-1].double()
    target = ids[0, len(prompt_ids):, None]
    return float(torch.log_softmax(logits, -1).gather(1, target).sum())


def load_records(arm_dir: Path) -> list[dict]:
    """Every record under ``arm_dir/<task>/*.jsonl``."""
    records = [json.loads(line) for path in sorted(Path(arm_dir).glob("*/*.jsonl"))
               for line in path.read_text().splitlines() if line.strip()]
    if not records:
        raise ValueError(f"no records under {arm_dir}/<task>/*.jsonl")
    return records


def _split(tokenizer, prompt: str, completion: str) -> tuple[list[int], list[int]]:
    """The prompt's ids by eval's one rule for a plain-text prompt, the completion's after them."""
    from powerfast.core.prompts import encode_prompt

    prompt_ids = encode_prompt(prompt, tokenizer, chat_template=False)
    full = encode_prompt(prompt + completion, tokenizer, chat_template=False)
    if full[:len(prompt_ids)] != prompt_ids:  # the completion merged with the prompt's last token
        return prompt_ids, tokenizer(completion, add_special_tokens=False)["input_ids"]
    return prompt_ids, full[len(prompt_ids):]


def summarise(scores: dict[str, dict[str, dict]], baseline: str) -> list[dict]:
    """One row per arm: its records compared with the baseline's on the problems both have."""
    base = scores[baseline]
    rows = []
    for arm, by_id in scores.items():
        ids = [i for i in by_id if i in base]
        diff = [by_id[i]["logp"] - base[i]["logp"] for i in ids]
        rows.append({"arm": arm, "problems": len(ids), "correct": sum(by_id[i]["correct"] for i in ids),
                     "same": sum(by_id[i]["completion"] == base[i]["completion"] for i in ids),
                     "more_likely": sum(d > 1e-6 for d in diff), "less_likely": sum(d < -1e-6 for d in diff),
                     "median_diff": statistics.median(diff) if diff else float("nan")})
    return rows


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.lab.score_completions",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("arms", nargs="+", type=Path, help="arm folders (<arm>/<task>/*.jsonl)")
    parser.add_argument("--model", default="default", help="a model folder, .gguf, named model, or 'default'")
    parser.add_argument("--baseline", default=None, help="the arm (folder name) to compare with (default: the first)")
    parser.add_argument("--json", type=Path, default=None, help="write every record's score here")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from powerfast.runtime.models import load_model

    names = [arm.name for arm in args.arms]
    baseline = args.baseline or names[0]
    if baseline not in names:
        parser.error(f"--baseline {baseline!r} is not one of the arms: {', '.join(names)}")
    model, tokenizer = load_model(None if args.model == "default" else args.model, verbose=False)
    model.eval()
    scores: dict[str, dict[str, dict]] = {}
    for arm in args.arms:
        records = load_records(arm)
        scores[arm.name] = {}
        for number, record in enumerate(records, 1):
            prompt_ids, completion_ids = _split(tokenizer, record["prompt"], record["completion"])
            scores[arm.name][record["id"]] = {
                "logp": completion_logprob(model, prompt_ids, completion_ids), "tokens": len(completion_ids),
                "correct": bool(record["correct"]), "completion": record["completion"]}
            print(f"\r{arm.name}: {number}/{len(records)}", end="", file=sys.stderr)
        print(file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps(scores, indent=1))
    print(f"{'arm':28s} {'problems':>8s} {'correct':>7s} {'same':>5s} {'more likely':>11s} "
          f"{'less likely':>11s} {'median diff (nats)':>18s}   (against {baseline})")
    for row in summarise(scores, baseline):
        print(f"{row['arm']:28s} {row['problems']:8d} {row['correct']:7d} {row['same']:5d} {row['more_likely']:11d} "
              f"{row['less_likely']:11d} {row['median_diff']:18.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
