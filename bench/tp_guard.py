"""The tensor-parallel step guard's cost per decode step, on CPU ranks (gloo).

    torchrun --nproc-per-node 3 bench/tp_guard.py [--model PATH] [--requests 4] [--tokens 64] [--rounds 3]

Rank 0 runs a :class:`~powerfast.serving.lockstep.LeaderEngine`, the other ranks
:func:`~powerfast.serving.lockstep.follow`, as ``powerfast serve --tensor-parallel N`` does
(no HTTP): ``--requests`` plain requests of ``--tokens`` tokens each (EOS ignored) are added
at once and stepped to their end. Each round runs the workload twice, in turn:

- ``guard``: the product: every step hashed, its digest posted to every rank in a background
  all-gather, and checked before the next command is sent;
- ``none``: the steps without the guard, on every rank alike: no hash, nothing posted, nothing
  checked (the command's broadcast as before).

Rank 0 times each ``step()`` and, with the guard, the hash and post
(``_Channel.record``) and the wait and check before the next command (``_Channel._digests``).
It prints per variant the median decode step (the first, prefill, step left out; the median
of the rounds' medians), the difference of the two, and the guard's own parts.
The model: ``--model`` (a Hugging Face folder whose heads divide by the ranks; default the
embedded SmolLM2-135M, 9 / 3 heads: 3 ranks).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--requests", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", default=None, help="also write the numbers here (rank 0)")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)

    import torch.distributed as dist

    from powerfast.runtime.models import load_model
    from powerfast.serving import lockstep
    from powerfast.serving.engine import Engine
    from powerfast.serving.params import SamplingParams

    world = int(os.environ["WORLD_SIZE"])
    rank = int(os.environ["RANK"])
    model, tokenizer = load_model(args.model, tensor_parallel=world, verbose=False)
    channel = lockstep._Channel
    product = {"record": channel.record, "digests": channel._digests}
    record_times: list[float] = []
    check_times: list[float] = []

    def timed_record(self, engine, step, outputs):
        start = time.perf_counter()
        product["record"](self, engine, step, outputs)
        record_times.append(time.perf_counter() - start)

    def timed_digests(self):
        start = time.perf_counter()
        value = product["digests"](self)
        check_times.append(time.perf_counter() - start)
        return value

    def no_record(self, engine, step, outputs):
        return None

    def no_digests(self):
        return None, [], []

    variants = {"guard": (timed_digests, timed_record), "none": (no_digests, no_record)}
    results: dict[str, list[float]] = {"guard": [], "none": [], "record": [], "check": []}
    for _ in range(args.rounds):
        for variant, (digests, record) in variants.items():
            channel._digests, channel.record = digests, record
            record_times.clear()
            check_times.clear()
            dist.barrier()
            if rank == 0:
                engine = lockstep.LeaderEngine(model, tokenizer, num_pages=512)
                params = SamplingParams(method="plain", max_tokens=args.tokens, ignore_eos=True)
                for i in range(args.requests):
                    engine.add_request([1 + i, 2, 3, 4, 5, 6, 7, 8], params)
                steps = []
                while engine.has_unfinished():
                    start = time.perf_counter()
                    engine.step()
                    steps.append(time.perf_counter() - start)
                engine.stop()
                results[variant].append(statistics.median(steps[1:]))  # the first is the prefill
                if variant == "guard":
                    results["record"].append(statistics.median(record_times[1:]))
                    results["check"].append(statistics.median(check_times[2:]))
            else:
                lockstep.follow(Engine(model, tokenizer, num_pages=512))
    channel._digests, channel.record = product["digests"], product["record"]
    if rank == 0:
        ms = {k: statistics.median(v) * 1e3 for k, v in results.items()}
        summary = {"ranks": world, "model": args.model or "embedded SmolLM2-135M", "requests": args.requests,
                   "tokens": args.tokens, "rounds": args.rounds,
                   "step_ms_guard": round(ms["guard"], 3), "step_ms_none": round(ms["none"], 3),
                   "guard_ms_per_step_ab": round(ms["guard"] - ms["none"], 3),
                   "guard_share_ab": round((ms["guard"] - ms["none"]) / ms["guard"], 4),
                   "record_ms_per_step": round(ms["record"], 4), "check_ms_per_step": round(ms["check"], 4),
                   "parts_share": round((ms["record"] + ms["check"]) / ms["guard"], 5),
                   "per_round_ms": {k: [round(v * 1e3, 3) for v in vs] for k, vs in results.items()}}
        print(json.dumps(summary, indent=1))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(summary, f, indent=1)
    dist.barrier()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
