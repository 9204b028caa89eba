"""On CUDA: ModelRunner vs ``model.generate``, Qwen2.5-1.5B shapes, random weights, bf16.

The same comparison as bench/bench_runner.py (decode throughput and KV memory at batch 1
and at batch 64 over one shared prefix; HF copies the prefix with
``num_return_sequences=64``), on a random-weight model of the Qwen2.5-1.5B
configuration built by hand (speed does not depend on the weights' values; EOS is
ignored). Before timing, a correctness check compares the runner's logits with the
model's own dense sdpa forward after a ragged prefill, a fork and a few decode steps.

Prints a small table (stdout, progress on stderr) and writes every number to ``--json``.
Warm-up first: the same workloads with 2 new tokens, so every kernel variant and
allocator size a timed run meets is compiled and reserved before the clock starts. With
``--budget-s``, runs not started within the budget are left out (the table says so).
``--smoke`` runs the same code on the CPU with a tiny random Llama (torch backend): a
check that the script works, not a measurement.

    python3 -m bench.device_runner [--prefix-len 1000] [--new-tokens 64] [--backend auto] [--json PATH]
    python3 -m bench.device_runner --smoke --json PATH

Targets (reported, not enforced): batch 64 runner throughput >= HF and KV memory <= 1/8
of HF's; batch 1 throughput within 10% of HF.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from bench.bench_runner import HEADER, run_hf, run_runner, summary, tiny_llama
from bench.e2e import qwen25_1p5b_config
from powerfast.runtime.runner import ModelRunner


def build_model(dtype: torch.dtype, device: str):
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Qwen2ForCausalLM(qwen25_1p5b_config())
    finally:
        torch.set_default_dtype(previous)
    model.set_attn_implementation("sdpa")
    return model.to(device=device, dtype=dtype).eval()


@torch.inference_mode()
def correctness(model, backend: str) -> dict:
    """Max |runner - dense| logits over a ragged prefill, a fork and 4 decode steps."""
    generator = torch.Generator().manual_seed(1)
    vocab = model.config.vocab_size
    prompts = [torch.randint(0, vocab, (n,), generator=generator).tolist() for n in (5, 37, 300)]
    runner = ModelRunner(model, num_pages=256, backend=backend)
    seqs, prefill_logits = runner.prefill(prompts)
    children = runner.fork(seqs[2], 2)
    batch = [seqs[0], seqs[1], *children]
    tokens = [list(prompts[0]), list(prompts[1]), list(prompts[2]), list(prompts[2])]
    steps = []
    for _ in range(4):
        next_tokens = torch.randint(0, vocab, (len(batch),), generator=generator).tolist()
        for seq_tokens, token in zip(tokens, next_tokens):
            seq_tokens.append(token)
        steps.append(runner.decode(batch, next_tokens).float())
    runner.free([*seqs, *children])
    leaked = runner.cache.pages_in_use
    runner.restore_attention()
    worst, agree, total, scale = 0.0, 0, 0, 0.0
    for i, seq_tokens in enumerate(tokens):
        dense = model(input_ids=torch.tensor([seq_tokens], device=model.device)).logits[0].float()
        got = torch.stack([step[i] for step in steps])
        want = dense[-4:]
        worst = max(worst, float((got - want).abs().max()))
        scale = max(scale, float(want.abs().max()))
        agree += int((got.argmax(-1) == want.argmax(-1)).sum())
        total += got.shape[0]
    for prompt, row in zip(prompts, prefill_logits):
        dense = model(input_ids=torch.tensor([prompt], device=model.device)).logits[0, -1].float()
        worst = max(worst, float((row.float() - dense).abs().max()))
    return {
        "backend": runner.backend,
        "max_abs_logit_diff": worst,
        "max_abs_logit": scale,
        "argmax_agreement": agree / total,
        "pages_leaked": leaked,
        "ok": leaked == 0 and worst <= 0.05 * max(scale, 1.0) and agree / total >= 0.75,
    }


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def timed_runs(model, prompt: list[int], new_tokens: int, batches, repeats: int, deadline: float | None,
               **runner_kwargs):
    """HF then the runner at each batch, the best of ``repeats`` each; stops starting runs at
    ``deadline`` (a time.perf_counter() value). Returns (results, skipped "engine@batch" names)."""
    results, skipped = [], []
    for batch in batches:
        for engine in ("hf", "runner"):
            runs = []
            for _ in range(repeats):
                if deadline is not None and time.perf_counter() > deadline:
                    break
                if engine == "hf":
                    runs.append(run_hf(model, prompt, batch, new_tokens))
                else:
                    runs.append(run_runner(model, prompt, batch, new_tokens, **runner_kwargs))
            if runs:
                best = max(runs, key=lambda r: r.tokens_per_second)
                results.append(best)
                log(f"{engine} batch {batch}: {best.tokens_per_second:.1f} tok/s")
            else:
                skipped.append(f"{engine}@{batch}")
    return results, skipped


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prefix-len", type=int, default=1000)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--backend", default="auto", choices=["auto", "torch", "triton", "flash"])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--budget-s", type=float, default=0.0, help="start no timed run after this (0: none)")
    parser.add_argument("--json", default=None, help="write every number here")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny random Llama, short prefix")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.smoke:
        args.prefix_len, args.new_tokens, args.batches, args.repeats = 32, 4, [1, 4], 1
        device, dtype = "cpu", torch.float32
    elif torch.cuda.is_available():
        device, dtype = "cuda", getattr(torch, args.dtype)
    else:
        print("device_runner.py needs a CUDA device (--smoke runs it on the CPU)", file=sys.stderr)
        return 2

    import transformers
    import triton

    started = time.perf_counter()
    deadline = started + args.budget_s if args.budget_s > 0 else None
    if args.smoke:
        model = tiny_llama(device, dtype)
        model.set_attn_implementation("sdpa")
        model_name = "tiny random Llama (2 layers, hidden 64)"
    else:
        model = build_model(dtype, device)
        model_name = "Qwen2.5-1.5B shapes, random weights"
    log(f"model built: {time.perf_counter() - started:.1f} s")
    check = correctness(model, args.backend)
    print(f"correctness ({check['backend']}): max |logit diff| {check['max_abs_logit_diff']:.4f} "
          f"(max |logit| {check['max_abs_logit']:.2f}), argmax agreement {check['argmax_agreement']:.2f}, "
          f"leaked pages {check['pages_leaked']} -> {'ok' if check['ok'] else 'FAILED'}", flush=True)

    runner_kwargs = dict(max_memory=(8 * 2**30 if device == "cuda" else 64 * 2**20), backend=args.backend)
    vocab = model.config.get_text_config().vocab_size
    prompt = torch.randint(0, vocab, (args.prefix_len,), generator=torch.Generator().manual_seed(0)).tolist()
    # warm-up on the timed shapes: prefill of the whole prefix, forks, decode at its length
    # (the split count of a long decode selects another attention kernel variant)
    for batch in args.batches:
        run_runner(model, prompt, batch, 2, **runner_kwargs)
        run_hf(model, prompt, batch, 2)
    log(f"warm-up done: {time.perf_counter() - started:.1f} s")
    results, skipped = timed_runs(model, prompt, args.new_tokens, args.batches, args.repeats, deadline,
                                  **runner_kwargs)
    table = summary(results)
    device_name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    title = f"{model_name}, {str(dtype).removeprefix('torch.')}, {device_name}"
    if args.smoke:
        title = "smoke run (CPU, tiny model): not a measurement\n" + title
    print(title)
    print(table)
    if skipped:
        print(f"not measured (budget of {args.budget_s:.0f} s spent): {', '.join(skipped)}")

    by_key = {(r.engine, r.batch): r for r in results}
    ratios = {}
    for batch in args.batches:
        hf, runner = by_key.get(("hf", batch)), by_key.get(("runner", batch))
        if hf and runner:
            ratios[f"batch{batch}"] = {
                "throughput_runner_over_hf": runner.tokens_per_second / hf.tokens_per_second,
                "kv_memory_runner_over_hf": runner.kv_bytes / hf.kv_bytes,
            }
    targets = {}
    if "batch64" in ratios:
        targets["batch64_throughput_at_least_hf"] = ratios["batch64"]["throughput_runner_over_hf"] >= 1.0
        targets["batch64_kv_memory_at_most_an_eighth"] = ratios["batch64"]["kv_memory_runner_over_hf"] <= 1 / 8
    if "batch1" in ratios:
        targets["batch1_throughput_within_10_percent"] = ratios["batch1"]["throughput_runner_over_hf"] >= 0.9
    report = {
        "device": device_name,
        "smoke": args.smoke,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "triton": triton.__version__},
        "model": model_name,
        "dtype": str(dtype).removeprefix("torch."),
        "prefix_len": args.prefix_len,
        "new_tokens": args.new_tokens,
        "correctness": check,
        "columns": HEADER.split(),
        "results": [asdict(r) for r in results],
        "not_measured": skipped,
        "ratios": ratios,
        "targets": targets,
        "wall_seconds": time.perf_counter() - started,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    print(f"targets: {targets}")
    return 0 if check["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
