"""On CUDA: ModelRunner vs ``model.generate``, Qwen2.5-1.5B shapes, random weights, bf16.

The same comparison as bench/bench_runner.py (decode throughput and KV memory at batch 1
and at batch 64 over one shared prefix; HF copies the prefix with
``num_return_sequences=64``), on a random-weight model of the Qwen2.5-1.5B
configuration built by hand (speed does not depend on the weights' values; EOS is
ignored). Before timing, a correctness check compares the runner's logits with the
model's own dense sdpa forward after a ragged prefill, a fork and a few decode steps.

Prints a small table and writes ``$OUT/device_runner.json`` (or ``--out``).

    python bench/device_runner.py [--prefix-len 1000] [--new-tokens 64] [--backend auto]

Targets (reported, not enforced): batch 64 runner throughput >= HF and KV memory <= 1/8
of HF's; batch 1 throughput within 10% of HF.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from bench_runner import HEADER, compare, run_hf, run_runner, summary  # noqa: E402
from e2e import qwen25_1p5b_config  # noqa: E402

from powerfast.runner import ModelRunner  # noqa: E402


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
    runner = ModelRunner(model, num_blocks=256, backend=backend)
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
    leaked = runner.cache.blocks_in_use
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
        "blocks_leaked": leaked,
        "ok": leaked == 0 and worst <= 0.05 * max(scale, 1.0) and agree / total >= 0.75,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prefix-len", type=int, default=1000)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--backend", default="auto", choices=["auto", "torch", "triton", "flash"])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("device_runner.py needs a CUDA device", file=sys.stderr)
        return 2

    import transformers
    import triton

    started = time.perf_counter()
    dtype = getattr(torch, args.dtype)
    model = build_model(dtype, "cuda")
    check = correctness(model, args.backend)
    print(f"correctness ({check['backend']}): max |logit diff| {check['max_abs_logit_diff']:.4f} "
          f"(max |logit| {check['max_abs_logit']:.2f}), argmax agreement {check['argmax_agreement']:.2f}, "
          f"leaked blocks {check['blocks_leaked']} -> {'ok' if check['ok'] else 'FAILED'}")

    runner_kwargs = dict(max_memory=8 * 2**30, backend=args.backend)
    warm_prompt = list(range(1, 65))  # compile the kernels and warm the allocator
    run_runner(model, warm_prompt, 2, 2, **runner_kwargs)
    run_hf(model, warm_prompt, 2, 2)
    results = compare(
        model, args.prefix_len, args.new_tokens, batches=tuple(args.batches), repeats=args.repeats, **runner_kwargs
    )
    table = summary(results)
    print(f"Qwen2.5-1.5B shapes, random weights, {args.dtype}, {torch.cuda.get_device_name()}")
    print(table)

    by_key = {(r.engine, r.batch): r for r in results}
    ratios = {}
    for batch in args.batches:
        hf, runner = by_key[("hf", batch)], by_key[("runner", batch)]
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
        "device": torch.cuda.get_device_name(),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "triton": triton.__version__},
        "model": "Qwen2.5-1.5B configuration, random weights",
        "dtype": args.dtype,
        "prefix_len": args.prefix_len,
        "new_tokens": args.new_tokens,
        "correctness": check,
        "columns": HEADER.split(),
        "results": [asdict(r) for r in results],
        "ratios": ratios,
        "targets": targets,
        "wall_seconds": time.perf_counter() - started,
    }
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "device_runner.json").write_text(json.dumps(report, indent=2))
    print(f"targets: {targets}")
    print(f"wrote {out_dir / 'device_runner.json'}")
    return 0 if check["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
