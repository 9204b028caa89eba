"""Kernel timings on a CUDA device (called by bench/device_check.sh).

    python bench/device_kernels.py --out OUT_DIR

Medians from ``triton.testing.do_bench``. The ceiling is a measured device-to-device copy:
copy bandwidth = (bytes read + bytes written) / time. A kernel's bandwidth is the bytes
of its main input read once (logits, or the (B, K) + (B, K, M) estimator inputs) / time;
"of copy" is the ratio of the two. Speedup is torch reference time / kernel time.
Writes OUT_DIR/kernels.json and OUT_DIR/kernels.txt and prints the table.
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

from powerfast import estimators, ops
from powerfast.kernels import sampling as sampling_kernels

VOCAB_SHAPES = [(64, 32000), (64, 151936), (512, 151936)]
ESTIMATE_SHAPES = [(1, 8, 8), (64, 8, 8)]


def bench(fn) -> float:
    """Median seconds."""
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e3


def copy_bandwidth() -> float:
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    seconds = bench(lambda: dst.copy_(src))
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


def rows(copy_bw: float):
    results = []

    def record(kernel, shape, dtype, num_bytes, kernel_fn, torch_fn, **extra):
        kernel_s = bench(kernel_fn)
        torch_s = bench(torch_fn) if torch_fn is not None else None
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

    for dtype in (torch.bfloat16, torch.float32):
        for shape in VOCAB_SHAPES:
            logits = (torch.randn(shape, device="cuda") * 3).to(dtype)
            num_bytes = logits.numel() * logits.element_size()
            logliks = torch.zeros(shape[0], device="cuda")
            tokens = torch.randint(0, shape[1], (shape[0],), device="cuda")
            record(
                "sample T=0.7", shape, dtype, num_bytes,
                lambda: ops.sample_tokens(logits, 0.7, seed=1, logliks=logliks),
                lambda: torch_sample(logits, 0.7, logliks),
            )
            record(
                "sample T=1", shape, dtype, num_bytes,
                lambda: ops.sample_tokens(logits, 1.0, seed=1, logliks=logliks),
                lambda: torch_sample_t1(logits, logliks),
            )
            record(
                "token_logprobs", shape, dtype, num_bytes,
                lambda: ops.token_logprobs(logits, tokens),
                lambda: torch.log_softmax(logits.float(), -1).gather(1, tokens[:, None]).squeeze(1),
            )
            record(
                "topk_logprobs k=8", shape, dtype, num_bytes,
                lambda: ops.topk_logprobs(logits, 8),
                lambda: ops._torch_topk_logprobs(logits, 8),
            )
            del logits

    for shape in ESTIMATE_SHAPES:
        batch, num_candidates, num_rollouts = shape
        cand = torch.log_softmax(torch.randn(batch, num_candidates, device="cuda"), -1)
        rollouts = -torch.rand(batch, num_candidates, num_rollouts, device="cuda") * 300
        record(
            "power_estimates jk", shape, torch.float32, (cand.numel() + rollouts.numel()) * 4,
            lambda: ops.power_estimates(cand, rollouts, 4.0),
            lambda: estimators.power_estimates(cand, rollouts, 4.0),
        )

    # KV write: 512 decode tokens of a Qwen2.5-7B layer (4 kv heads x 128), bf16
    key_cache = torch.zeros(4096, 16, 4, 128, dtype=torch.bfloat16, device="cuda")
    value_cache = torch.zeros_like(key_cache)
    key = torch.randn(512, 4, 128, device="cuda").to(torch.bfloat16)
    value = torch.randn_like(key)
    slots = torch.randperm(4096 * 16, device="cuda")[:512]
    record(
        "write_kv", (512, 4, 128), torch.bfloat16, 2 * key.numel() * 2,
        lambda: ops.write_kv(key_cache, value_cache, key, value, slots),
        lambda: ops._torch_write_kv(key_cache, value_cache, key, value, slots),
    )
    src = torch.arange(0, 256, device="cuda")
    dst = torch.arange(256, 512, device="cuda")
    record(
        "copy_blocks", (256, 16, 4, 128), torch.bfloat16, 2 * 256 * 16 * 4 * 128 * 2,
        lambda: ops.copy_blocks(key_cache, value_cache, src, dst),
        lambda: ops._torch_copy_blocks(key_cache, value_cache, src, dst),
    )
    return results


def sweep_sample(copy_bw: float):
    """Chunk width / warps of the sampling kernel at (512, 151936) bf16 (the draw depends on
    the chunk width, so this informs the default rather than autotuning it)."""
    logits = (torch.randn(512, 151936, device="cuda") * 3).to(torch.bfloat16)
    logliks = torch.zeros(512, device="cuda")
    out = []
    for block_v in (1024, 2048, 4096, 8192):
        for num_warps in (4, 8, 16):
            try:
                seconds = bench(
                    lambda: sampling_kernels.sample_logprob(
                        logits, 0.7, seed=1, logliks=logliks, block_v=block_v, num_warps=num_warps
                    )
                )
            except Exception as error:  # a configuration that does not compile is reported
                out.append(dict(block_v=block_v, num_warps=num_warps, error=repr(error)[:200]))
                continue
            gbps = logits.numel() * 2 / seconds / 1e9
            out.append(dict(block_v=block_v, num_warps=num_warps, time_us=seconds * 1e6, gbps=gbps,
                            of_copy=gbps * 1e9 / copy_bw))
    return out


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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(os.environ.get("OUT", "./out"), "kernels"))
    parser.add_argument("--no-sweep", action="store_true")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: kernel timings skipped", file=sys.stderr)
        return 0
    os.makedirs(args.out, exist_ok=True)
    started = time.time()
    copy_bw = copy_bandwidth()
    results = rows(copy_bw)
    sweep = [] if args.no_sweep else sweep_sample(copy_bw)
    text = table(results, copy_bw)
    if sweep:
        text += "\n\nsample T=0.7 (512, 151936) bf16, chunk / warps sweep:\n" + "\n".join(
            f"  BLOCK_V={s['block_v']:<5} warps={s['num_warps']:<2} "
            + (f"{s['time_us']:8.1f} us {s['gbps']:6.0f} GB/s {s['of_copy']:5.0%}" if "time_us" in s else s["error"])
            for s in sweep
        )
    payload = dict(
        device=torch.cuda.get_device_name(),
        torch=torch.__version__,
        triton=triton.__version__,
        copy_gbps=copy_bw / 1e9,
        results=results,
        sample_sweep=sweep,
        seconds=time.time() - started,
    )
    with open(os.path.join(args.out, "kernels.json"), "w") as handle:
        json.dump(payload, handle, indent=2)
    with open(os.path.join(args.out, "kernels.txt"), "w") as handle:
        handle.write(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
