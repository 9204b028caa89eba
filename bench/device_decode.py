"""Decode-step time: eager vs torch.compile vs CUDA graphs, and plain decoding vs ``model.generate``.

For each mode and batch size: one shared prefix (``--prefix-len`` tokens, default 2,000)
is prefilled, forked into ``batch`` sequences, and ``--steps`` decode steps are timed
after ``--warmup`` steps (which compile and capture). A step is the runner's whole
``decode`` call: host bookkeeping, metadata upload (if any), the forward. Also reported:
metadata bytes uploaded per timed step (0 when no step crosses a page boundary) next to
what the previous runner uploaded per step (page tables, lengths, slots and positions of
every sequence, every step: computed from its layout), and tokens/s of plain decoding at
batch 1 (:func:`powerfast.samplers.decoding.sample_continuations`) against ``model.generate``.

Modes: ``eager`` (compile off, graphs off), ``compiled`` (``torch.compile`` of the decode
forward), ``graphs`` (CUDA graphs per batch bucket), ``compiled+graphs``. On a CPU,
``graphs`` pads batches to their bucket and runs eagerly, and ``compiled`` uses the
``--cpu-compile-backend`` (default inductor).

    python -m bench.device_decode [--model qwen2.5-1.5b] [--batches 1,8,64,256] [--out DIR]
    python -m bench.device_decode --model tiny --device cpu --batches 1,8,64   # CPU rows

Prints a table (stdout; progress on stderr) and writes every number to ``--json`` (or
``decode.json`` under ``--out``). ``--budget-s`` bounds the run: modes and batches left
when it is spent are listed as skipped. ``--smoke``: the same code on the CPU, tiny
random Llama, short prefix, compiled with ``aot_eager`` (what CI runs; not a measurement).
A stage of ``bench/device_check.sh`` (``decode``).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from bench.e2e import build_model, hf_generate
from powerfast.runtime.runner import ModelRunner
from powerfast.samplers.decoding import SeedStream, sample_continuations

MODES = ("eager", "graphs", "compiled", "compiled+graphs")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def previous_upload_bytes(batch: int, max_pages: int) -> int:
    """Bytes the runner before device-resident metadata uploaded per decode step (tokens on
    the device): int64 slots, positions, sequence index (3 per row); int32 lengths,
    cumulative lengths, query starts (3 per row + 2) and the padded page tables."""
    return 8 * 3 * batch + 4 * (3 * batch + 2 + batch * max_pages)


def time_mode(model, mode: str, batch: int, args, device: torch.device) -> dict:
    compile_setting: bool | str = False
    if mode.startswith("compiled"):
        compile_setting = True if device.type == "cuda" else args.cpu_compile_backend
    runner = ModelRunner(model, page_size=args.page_size, max_memory=args.kv_memory_mib * 2**20,
                         compile=compile_setting, cuda_graphs=mode.endswith("graphs"))
    vocab = runner.vocab_size
    generator = torch.Generator().manual_seed(0)
    prefix = torch.randint(3, vocab, (args.prefix_len,), generator=generator).tolist()
    seqs, _ = runner.prefill([prefix])
    children = runner.fork(seqs[0], batch)
    tokens = torch.randint(3, vocab, (batch,), generator=generator).to(device)
    try:
        started = time.perf_counter()
        for _ in range(args.warmup):
            runner.decode(children, tokens)
        _sync(device)
        warmup_s = time.perf_counter() - started
        uploaded = runner.upload_bytes
        started = time.perf_counter()
        for _ in range(args.steps):
            runner.decode(children, tokens)
        _sync(device)
        seconds = time.perf_counter() - started
        uploaded = runner.upload_bytes - uploaded
        max_pages = -(-(args.prefix_len + args.warmup + args.steps) // args.page_size)
    finally:
        runner.free(children + seqs)
        runner.restore_attention()
    return {
        "mode": mode,
        "batch": batch,
        "ms_per_step": 1e3 * seconds / args.steps,
        "warmup_s": warmup_s,
        "upload_bytes_per_step": uploaded / args.steps,
        "previous_upload_bytes_per_step": previous_upload_bytes(batch, max_pages),
    }


def plain_vs_generate(model, args, device: torch.device) -> dict:
    """Tokens/s at batch 1: plain sampling on the runner (graphs where available) vs model.generate."""
    runner = ModelRunner(model, page_size=args.page_size, max_memory=args.kv_memory_mib * 2**20)
    generator = torch.Generator().manual_seed(1)
    prompt = torch.randint(3, runner.vocab_size, (args.prompt_len,), generator=generator).tolist()
    rates = {}
    for label in ("warmup", "timed"):
        _sync(device)
        started = time.perf_counter()
        seqs, logits = runner.prefill([prompt])
        sample_continuations(runner, seqs, logits, args.new_tokens, SeedStream(0))
        runner.free(seqs)
        _sync(device)
        rates[f"runner_{label}"] = args.new_tokens / (time.perf_counter() - started)
    runner.restore_attention()
    for label in ("warmup", "timed"):
        _sync(device)
        started = time.perf_counter()
        hf_generate(model, prompt, args.new_tokens)
        _sync(device)
        rates[f"generate_{label}"] = args.new_tokens / (time.perf_counter() - started)
    return {
        "new_tokens": args.new_tokens,
        "prompt_len": args.prompt_len,
        "runner_tokens_per_s": rates["runner_timed"],
        "generate_tokens_per_s": rates["generate_timed"],
        "ratio": rates["runner_timed"] / rates["generate_timed"],
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-1.5b", help="qwen2.5-1.5b (random weights) or tiny")
    parser.add_argument("--device", default=None)
    parser.add_argument("--num-layers", type=int, default=None, help="override the layer count (smoke runs)")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--batches", default="1,8,64,256")
    parser.add_argument("--prefix-len", type=int, default=2000)
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--kv-memory-mib", type=int, default=8192)
    parser.add_argument("--cpu-compile-backend", default="inductor")
    parser.add_argument("--budget-s", type=float, default=240.0)
    parser.add_argument("--skip-generate", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 on a shared CPU)")
    parser.add_argument("--out", default=None)
    parser.add_argument("--json", default=None, help="write every number here")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny random Llama, short prefix (not a measurement)")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.smoke:
        args.model, args.device, args.batches, args.prefix_len = "tiny", "cpu", "1,3", 40
        args.warmup, args.steps, args.new_tokens, args.prompt_len = 1, 2, 4, 8
        args.kv_memory_mib, args.cpu_compile_backend, args.threads = 16, "aot_eager", args.threads or 1

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, _, description = build_model(args.model, str(device), args.num_layers)
    started = time.perf_counter()
    rows, skipped = [], []
    for mode in args.modes.split(","):
        if mode not in MODES:
            raise SystemExit(f"unknown mode {mode!r}; choose from {MODES}")
        for batch in [int(b) for b in args.batches.split(",")]:
            if time.perf_counter() - started > args.budget_s:
                skipped.append(f"{mode}@{batch}")
                continue
            torch._dynamo.reset()
            row = time_mode(model, mode, batch, args, device)
            rows.append(row)
            print(f"{mode:16s} batch {batch:4d}: {row['ms_per_step']:8.2f} ms/step  "
                  f"(warm-up {row['warmup_s']:.1f} s, {row['upload_bytes_per_step']:.0f} B uploaded/step, "
                  f"previously {row['previous_upload_bytes_per_step']} B)", file=sys.stderr, flush=True)
    generate = None
    if not args.skip_generate and time.perf_counter() - started < args.budget_s:
        generate = plain_vs_generate(model, args, device)
    report = {
        "model": description,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "prefix_len": args.prefix_len,
        "steps": args.steps,
        "rows": rows,
        "skipped": skipped,
        "plain_vs_generate": generate,
    }
    report["smoke"] = args.smoke
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "decode.json").write_text(json.dumps(report, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    if args.smoke:
        print("smoke run (CPU, tiny model): not a measurement")
    print(f"decode step over a shared {args.prefix_len}-token prefix: {description}, {report['device']}")
    print(f"{'mode':16s} " + " ".join(f"{'b=' + str(b):>9s}" for b in args.batches.split(",")) + "   (ms/step)")
    for mode in args.modes.split(","):
        cells = []
        for batch in [int(b) for b in args.batches.split(",")]:
            found = [r for r in rows if r["mode"] == mode and r["batch"] == batch]
            cells.append(f"{found[0]['ms_per_step']:9.2f}" if found else f"{'skipped':>9s}")
        print(f"{mode:16s} " + " ".join(cells))
    one = {r["mode"]: r["ms_per_step"] for r in rows if r["batch"] == 1}
    for mode in one:
        wide = [r for r in rows if r["mode"] == mode and r["batch"] == 64]
        if wide:
            print(f"{mode}: batch-64 step / batch-1 step = {wide[0]['ms_per_step'] / one[mode]:.2f} (target <= 1.5)")
    if generate:
        print(f"plain decoding {generate['runner_tokens_per_s']:.1f} tokens/s vs model.generate "
              f"{generate['generate_tokens_per_s']:.1f} tokens/s: {generate['ratio']:.2f}x (target >= 3)")
    if skipped:
        print("skipped (budget): " + ", ".join(skipped))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
