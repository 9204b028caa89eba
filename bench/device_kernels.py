"""Kernel timings on a CUDA device (a stage of bench/device_check.sh).

    python -m bench.device_kernels [--json PATH] [--budget-s S] [--no-sweep]
    TRITON_INTERPRET=1 python -m bench.device_kernels --smoke   # CPU, tiny shapes, interpreter

Medians from ``triton.testing.do_bench``. The ceiling is a measured device-to-device copy:
copy bandwidth = (bytes read + bytes written) / time. A kernel's bandwidth is the bytes
of its main input read once (logits, or the (B, K) + (B, K, M) estimator inputs) / time;
"of copy" is the ratio of the two. Speedup is torch reference time / kernel time (for
"sample_rows 4 groups": the four launches of the groups on their own / the one launch).
Prints the table (stdout) and writes every number to ``--json``. With ``--budget-s``,
rows not started within the budget are left out and the table says so. ``--smoke`` runs
the same code on the CPU with tiny shapes (the kernels under TRITON_INTERPRET=1, timed
with a wall clock): a check that the script works, not a measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import triton
import triton.testing
from powerfast.kernels import sampling as sampling_kernels

from powerfast.ops import jackknife, kv_cache, sampling, topk

VOCAB_SHAPES = [(64, 32000), (64, 151936), (512, 151936)]
ESTIMATE_SHAPES = [(1, 8, 8), (64, 8, 8)]
KV_SHAPE = dict(num_pages=4096, kv_heads=4, head_dim=128, tokens=512, copies=256)  # a Qwen2.5-7B layer
SWEEP_SHAPE = (512, 151936)
SWEEP = [(block_v, warps) for block_v in (1024, 2048, 4096, 8192) for warps in (4, 8, 16)]

SMOKE_VOCAB_SHAPES = [(4, 1024)]
SMOKE_ESTIMATE_SHAPES = [(2, 4, 4)]
SMOKE_KV_SHAPE = dict(num_pages=64, kv_heads=2, head_dim=16, tokens=8, copies=4)
SMOKE_SWEEP_SHAPE = (4, 1024)
SMOKE_SWEEP = [(1024, 4)]


class OutOfTime(Exception):
    """The stage's budget ran out: report what was measured."""


class Clock:
    """Times callables on DEVICE until DEADLINE (time.perf_counter() value, or None)."""

    def __init__(self, device: str, deadline: float | None) -> None:
        self.device = device
        self.deadline = deadline

    def check(self) -> None:
        if self.deadline is not None and time.perf_counter() > self.deadline:
            raise OutOfTime()

    def bench(self, fn) -> float:
        """Median seconds (do_bench on CUDA; 3 wall-clock calls after one warm-up on the CPU)."""
        if self.device == "cuda":
            return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e3
        fn()
        times = []
        for _ in range(3):
            started = time.perf_counter()
            fn()
            times.append(time.perf_counter() - started)
        return sorted(times)[1]


def copy_bandwidth(clock: Clock) -> float:
    src = torch.empty(1 << (30 if clock.device == "cuda" else 24), dtype=torch.uint8, device=clock.device)
    dst = torch.empty_like(src)
    seconds = clock.bench(lambda: dst.copy_(src))
    return 2 * src.numel() / seconds


def torch_sample(logits, temperature, logliks):
    """The plain torch step: log_softmax + multinomial + gather (+ the tempered log-prob)."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    tempered = torch.log_softmax(logits.float() / temperature, dim=-1)
    tokens = torch.multinomial(tempered.exp(), 1).squeeze(1)
    base = logprobs.gather(1, tokens[:, None]).squeeze(1)
    logliks += base
    return tokens, base, tempered.gather(1, tokens[:, None]).squeeze(1)


def torch_sample_t1(logits, logliks):
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    tokens = torch.multinomial(logprobs.exp(), 1).squeeze(1)
    base = logprobs.gather(1, tokens[:, None]).squeeze(1)
    logliks += base
    return tokens, base


def row_groups(num_rows: int, vocab: int, device) -> dict:
    """Per-row parameters of four requests sharing a launch: greedy, T = 1, T = 0.7 with an
    EOS id, T = 0.25 (rows dealt round-robin), and each group's row index for its own launch."""
    params = [(0.0, -1), (1.0, -1), (0.7, 2), (0.25, -1)]
    which = torch.arange(num_rows) % len(params)
    groups = [((which == g).nonzero().squeeze(1).to(device), t, e) for g, (t, e) in enumerate(params)]
    return dict(offsets=torch.randint(0, 2**62, (num_rows,), device=device),
                temperatures=torch.tensor([params[g][0] for g in which.tolist()], dtype=torch.float64, device=device),
                eos=torch.tensor([params[g][1] for g in which.tolist()], device=device), groups=groups)


def rows(clock: Clock, copy_bw: float, smoke: bool, results: list) -> None:
    """Appends one dict per measured kernel to ``results`` (raises OutOfTime when over budget)."""
    device = clock.device
    vocab_shapes = SMOKE_VOCAB_SHAPES if smoke else VOCAB_SHAPES
    dtypes = (torch.float32,) if smoke else (torch.bfloat16, torch.float32)

    def record(kernel, shape, dtype, num_bytes, kernel_fn, torch_fn, **extra):
        clock.check()
        kernel_s = clock.bench(kernel_fn)
        torch_s = clock.bench(torch_fn) if torch_fn is not None else None
        gbps = num_bytes / kernel_s / 1e9
        results.append(
            dict(
                kernel=kernel,
                shape=str(shape),
                dtype=str(dtype).replace("torch.", ""),
                time_us=kernel_s * 1e6,
                torch_us=torch_s * 1e6 if torch_s else None,
                gbps=gbps,
                of_copy=num_bytes / kernel_s / copy_bw,
                speedup=torch_s / kernel_s if torch_s else None,
                **extra,
            )
        )
        print(f"  {kernel:<22} {str(shape):<16} {results[-1]['time_us']:9.1f} us", file=sys.stderr, flush=True)

    for dtype in dtypes:
        for shape in vocab_shapes:
            logits = (torch.randn(shape, device=device) * 3).to(dtype)
            num_bytes = logits.numel() * logits.element_size()
            logliks = torch.zeros(shape[0], device=device)
            tokens = torch.randint(0, shape[1], (shape[0],), device=device)
            record(
                "sample T=0.7", shape, dtype, num_bytes,
                lambda: sampling.sample_tokens(logits, 0.7, seed=1, logliks=logliks),
                lambda: torch_sample(logits, 0.7, logliks),
            )
            record(
                "sample T=1", shape, dtype, num_bytes,
                lambda: sampling.sample_tokens(logits, 1.0, seed=1, logliks=logliks),
                lambda: torch_sample_t1(logits, logliks),
            )
            # the engine's one launch for many requests: four (temperature, EOS) groups in one
            # sample_rows call against the four launches of their own ("torch" column)
            mixed = row_groups(shape[0], shape[1], device)
            active, row_logliks = torch.ones(shape[0], dtype=torch.bool, device=device), logliks.clone()
            record(
                "sample_rows 4 groups", shape, dtype, num_bytes,
                lambda: sampling.sample_rows(logits, offsets=mixed["offsets"], temperatures=mixed["temperatures"],
                                             eos_token_ids=mixed["eos"], active=active.clone(), logliks=row_logliks),
                lambda: [sampling.sample_tokens_op(logits[index], mixed["offsets"][index], active[index].clone(),
                                                   row_logliks[index].clone(), temperature, eos)
                         for index, temperature, eos in mixed["groups"]],
            )
            record(
                "token_logprobs", shape, dtype, num_bytes,
                lambda: sampling.token_logprobs(logits, tokens),
                lambda: torch.log_softmax(logits.float(), -1).gather(1, tokens[:, None]).squeeze(1),
            )
            record(
                "topk_logprobs k=8", shape, dtype, num_bytes,
                lambda: topk.topk_logprobs(logits, 8),
                lambda: topk._torch_topk_logprobs(logits, 8),
            )
            del logits

    for shape in SMOKE_ESTIMATE_SHAPES if smoke else ESTIMATE_SHAPES:
        batch, num_candidates, num_rollouts = shape
        cand = torch.log_softmax(torch.randn(batch, num_candidates, device=device), -1)
        rollouts = -torch.rand(batch, num_candidates, num_rollouts, device=device) * 300
        record(
            "power_estimates jk", shape, torch.float32, (cand.numel() + rollouts.numel()) * 4,
            lambda: jackknife._power_estimates_nosync(cand, rollouts, 4.0),
            lambda: jackknife.torch_power_estimates(cand, rollouts, 4.0),
        )

    # KV write: decode tokens of one layer (Qwen2.5-7B: 4 kv heads x 128), bf16 (fp32 when smoke)
    kv = SMOKE_KV_SHAPE if smoke else KV_SHAPE
    kv_dtype = torch.float32 if smoke else torch.bfloat16
    page_shape = (16, kv["kv_heads"], kv["head_dim"])
    key_cache = torch.zeros(kv["num_pages"], *page_shape, dtype=kv_dtype, device=device)
    value_cache = torch.zeros_like(key_cache)
    key = torch.randn(kv["tokens"], kv["kv_heads"], kv["head_dim"], device=device).to(kv_dtype)
    value = torch.randn_like(key)
    slots = torch.randperm(kv["num_pages"] * 16, device=device)[: kv["tokens"]]
    itemsize = key.element_size()
    record(
        "write_kv", tuple(key.shape), kv_dtype, 2 * key.numel() * itemsize,
        lambda: kv_cache.write_kv(key_cache, value_cache, key, value, slots),
        lambda: kv_cache._torch_write_kv(key_cache, value_cache, key, value, slots),
    )
    copies = kv["copies"]
    src = torch.arange(0, copies, device=device)
    dst = torch.arange(copies, 2 * copies, device=device)
    record(
        "copy_pages", (copies, *page_shape), kv_dtype, 2 * copies * key_cache[0].numel() * itemsize,
        lambda: kv_cache.copy_pages(key_cache, value_cache, src, dst),
        lambda: kv_cache._torch_copy_pages(key_cache, value_cache, src, dst),
    )


def sweep_sample(clock: Clock, copy_bw: float, smoke: bool, out: list) -> None:
    """Chunk width / warps of the sampling kernel at (512, 151936) bf16 (the draw depends on
    the chunk width, so this informs the default rather than autotuning it). Appends to ``out``."""
    shape = SMOKE_SWEEP_SHAPE if smoke else SWEEP_SHAPE
    dtype = torch.float32 if smoke else torch.bfloat16
    logits = (torch.randn(shape, device=clock.device) * 3).to(dtype)
    logliks = torch.zeros(shape[0], device=clock.device)
    for block_v, num_warps in SMOKE_SWEEP if smoke else SWEEP:
        clock.check()
        try:
            seconds = clock.bench(
                lambda: sampling_kernels.sample_logprob(
                    logits, 0.7, seed=1, logliks=logliks, block_v=block_v, num_warps=num_warps
                )
            )
        except Exception as error:  # a configuration that does not compile is reported
            out.append(dict(block_v=block_v, num_warps=num_warps, error=repr(error)[:200]))
            continue
        gbps = logits.numel() * logits.element_size() / seconds / 1e9
        out.append(dict(block_v=block_v, num_warps=num_warps, time_us=seconds * 1e6, gbps=gbps,
                        of_copy=gbps * 1e9 / copy_bw))


def table(results, copy_bw: float) -> str:
    lines = [
        f"device-to-device copy: {copy_bw / 1e9:.0f} GB/s (read + write)",
        f"{'kernel':<22} {'shape':<16} {'dtype':<9} {'time us':>9} {'GB/s':>8} {'of copy':>8} {'torch us':>10} {'speedup':>8}",
    ]
    for r in results:
        torch_us = f"{r['torch_us']:10.1f}" if r["torch_us"] else f"{'-':>10}"
        speedup = f"{r['speedup']:7.2f}x" if r["speedup"] else f"{'-':>8}"
        lines.append(
            f"{r['kernel']:<22} {r['shape']:<16} {r['dtype']:<9} {r['time_us']:9.1f} {r['gbps']:8.0f} "
            f"{r['of_copy']:8.0%} {torch_us} {speedup}"
        )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=None, help="write every number here")
    parser.add_argument("--budget-s", type=float, default=0.0, help="start no row after this many seconds (0: none)")
    parser.add_argument("--no-sweep", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, kernels under TRITON_INTERPRET=1")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.smoke:
        if os.environ.get("TRITON_INTERPRET") != "1":
            print("--smoke needs TRITON_INTERPRET=1 (set before the kernels are imported)", file=sys.stderr)
            return 2
        device = "cpu"
    elif torch.cuda.is_available():
        device = "cuda"
    else:
        print("no CUDA device: kernel timings skipped (--smoke runs them on the CPU)", file=sys.stderr)
        return 2
    started = time.perf_counter()
    clock = Clock(device, started + args.budget_s if args.budget_s > 0 else None)
    results, sweep, stopped = [], [], None
    copy_bw = copy_bandwidth(clock)
    try:
        rows(clock, copy_bw, args.smoke, results)
        if not args.no_sweep:
            sweep_sample(clock, copy_bw, args.smoke, sweep)
    except OutOfTime:
        stopped = f"budget of {args.budget_s:.0f} s spent: later rows not measured"
        print(stopped, file=sys.stderr)
    text = table(results, copy_bw)
    if sweep:
        text += f"\n\nsample T=0.7 {SMOKE_SWEEP_SHAPE if args.smoke else SWEEP_SHAPE}, chunk / warps sweep:\n" + "\n".join(
            f"  BLOCK_V={s['block_v']:<5} warps={s['num_warps']:<2} "
            + (f"{s['time_us']:8.1f} us {s['gbps']:6.0f} GB/s {s['of_copy']:5.0%}" if "time_us" in s else s["error"])
            for s in sweep
        )
    if stopped:
        text += f"\n{stopped}"
    if args.smoke:
        text = "smoke run (CPU, interpreter, tiny shapes): not a measurement\n" + text
    payload = dict(
        device=torch.cuda.get_device_name() if device == "cuda" else "cpu (smoke)",
        torch=torch.__version__,
        triton=triton.__version__,
        copy_gbps=copy_bw / 1e9,
        results=results,
        sample_sweep=sweep,
        stopped=stopped,
        seconds=time.perf_counter() - started,
    )
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(payload, handle, indent=2)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
