"""Throughput of ``powerfast eval`` on Ray: units per second with 1, 2, ... workers.

One local Ray instance (started once, outside the timings, as an existing cluster would
be), a tiny random Llama with a word-level tokenizer saved to a temporary folder, and a
generated math task of ``--problems`` problems. For each worker count, a fresh run of
every unit (problem x seed) of ``--method`` with EOS ignored, so every unit decodes
``--max-new-tokens`` tokens; the single-process run (this process, one torch thread) is
the first row. Per row: wall seconds and units/s of the whole run (worker start-up and
model loads included), the steady units/s (from the first recorded unit to the last, so
start-up excluded) and the speed-up of the steady rate over one worker.

    python -m bench.ray_eval --workers 1,2 --problems 40 --max-new-tokens 64

Each Ray worker reserves ``--cpus-per-worker`` CPUs; Ray gives it that many torch threads.

``--sleep S`` replaces the model by a method that sleeps S seconds per unit and uses no
CPU: it measures the orchestration alone (dispatch, result transfer, grading and writing
on the driver), which should scale with the workers even on a busy machine.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import tempfile
import time
from pathlib import Path

WORDS = ["<unk>", "<eos>", "the", "answer", "is", "a", "b", "c", "1", "2", "3", "plus", "equals", "\\boxed{", "}"]


def tiny_model_folder(folder: Path) -> Path:
    """A random Llama (2 layers, hidden 64) with a word-level tokenizer, as a Hugging Face folder."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>").save_pretrained(folder)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(WORDS), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         eos_token_id=1, bos_token_id=1, pad_token_id=0)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def math_task_file(path: Path, problems: int) -> Path:
    lines = [json.dumps({"id": f"p{i}", "prompt": f"the answer is {i % 3 + 1} plus {i % 2 + 1}", "answer": "3"})
             for i in range(problems)]
    path.write_text("\n".join(lines) + "\n")
    return path


def sleeping_methods(name: str, seconds: float):
    """``{name: generate}`` whose every unit sleeps ``seconds`` and returns a fixed text."""
    from powerfast.evaluation import Generation

    def generate(prompts, sample_seeds):
        out = []
        for _ in prompts:
            time.sleep(seconds)
            out.append(Generation("the answer is \\boxed{3}", 5, seconds))
        return out

    return {name: generate}


def timed_records(evaluation):
    """Wrap EvaluationRun.record to note when each unit is recorded; returns the list of times."""
    times: list[float] = []
    record = evaluation.EvaluationRun.record

    def noting(self, unit, generation):
        out = record(self, unit, generation)
        times.append(time.perf_counter())
        return out

    evaluation.EvaluationRun.record = noting
    return times


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", default="1,2", help="comma-separated worker counts (default 1,2)")
    parser.add_argument("--problems", type=int, default=40)
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--method", default="plain")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--cpus-per-worker", type=float, default=1.0)
    parser.add_argument("--no-single-process", action="store_true", help="skip the single-process row")
    parser.add_argument("--sleep", type=float, default=None, metavar="S",
                        help="no model: every unit sleeps S seconds (measures the orchestration alone)")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    counts = [int(x) for x in args.workers.split(",")]
    os.environ.setdefault("POWERFAST_INTERPRET_OPS", "0")

    import ray
    import torch

    from powerfast import cli, evaluation
    from powerfast.evaluation.distributed import run_evaluation_on_ray

    tmp = Path(tempfile.mkdtemp(prefix="powerfast-ray-bench-"))
    model = tiny_model_folder(tmp / "model")
    task = math_task_file(tmp / "bench.jsonl", args.problems)
    seeds = [int(s) for s in args.seeds.split(",")]
    eval_args = cli.build_parser().parse_args([
        "eval", "--task", str(task), "--methods", args.method, "--model", str(model), "--ignore-eos",
        "--max-new-tokens", str(args.max_new_tokens), "--no-chat-template",
    ])
    make = functools.partial(cli.eval_methods, eval_args, [args.method], False)
    if args.sleep is not None:
        make = functools.partial(sleeping_methods, args.method, args.sleep)
    times = timed_records(evaluation)
    units = args.problems * len(seeds)
    rows = []

    def row(label, wall):
        steady = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 and times[-1] > times[0] else float("nan")
        rows.append((label, units, wall, units / wall, steady))

    if not args.no_single_process:
        torch.set_num_threads(1)
        started = time.perf_counter()
        evaluation.run_evaluation(task, make(), tmp / "single", seeds=seeds, progress=False)
        row("single process, 1 thread", time.perf_counter() - started)
    ray.init(num_cpus=int(max(counts) * args.cpus_per_worker), include_dashboard=False, logging_level="WARNING",
             object_store_memory=100 << 20, log_to_driver=False)
    try:
        for n in counts:
            times.clear()
            started = time.perf_counter()
            run_evaluation_on_ray(task, make, [args.method], tmp / f"ray{n}", seeds=seeds, workers=n,
                                  cpus_per_worker=args.cpus_per_worker, progress=False)
            row(f"ray, {n} worker(s) x {args.cpus_per_worker:g} CPU", time.perf_counter() - started)
    finally:
        ray.shutdown()

    base = next((r[4] for r in rows if r[0].startswith("ray, 1 ")), None)
    work = (f"{args.sleep:g} s of sleep per unit" if args.sleep is not None
            else f"{args.method}, {args.max_new_tokens} tokens per unit (EOS ignored)")
    print(f"{platform.node()} ({os.cpu_count()} CPUs), torch {torch.__version__}, ray {ray.__version__}; "
          f"{work}, {units} units")
    print(f"{'run':<28} {'units':>5} {'wall s':>7} {'units/s':>8} {'steady units/s':>15} {'speed-up':>9}")
    for label, n, wall, rate, steady in rows:
        speedup = f"{steady / base:.2f}" if base and label.startswith("ray") else ""
        print(f"{label:<28} {n:>5} {wall:>7.1f} {rate:>8.2f} {steady:>15.2f} {speedup:>9}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
