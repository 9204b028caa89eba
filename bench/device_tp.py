"""Tensor parallelism on the device machine: every method on a 2-way sharded model against
one process, token for token (tests/tp_cases.py).

With 2 or more GPUs: ``torchrun --nproc-per-node 2`` (NCCL, one GPU per rank) runs every
case of tests/tp_cases.py on a small random Llama (4 heads, 2 KV heads) and the same cases
run in this process on one GPU; the table says, per case, whether both ranks drew the same
tokens and whether they equal the single-GPU ones. With fewer GPUs it prints "skipped: N GPU"
(and succeeds). ``--smoke`` runs the same check on the CPU with gloo (what CI's smoke run
does). Correctness only: no timing (GPU speed of TP is unmeasured until a multi-GPU run).

    python -m bench.device_tp [--smoke] [--json out.json] [--budget-s 120]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _tp_cases():
    """tests/tp_cases.py, the cases the tests run (tests/ is no package), loaded from its file."""
    spec = importlib.util.spec_from_file_location("tp_cases", ROOT / "tests" / "tp_cases.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model_folder(folder: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="the CPU check with gloo (no GPU needed)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--budget-s", type=float, default=120.0)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    gpus = torch.cuda.device_count()
    results: dict = {"gpus": gpus}
    if not args.smoke and gpus < 2:
        print(f"skipped: {gpus} GPU")
        results["skipped"] = f"{gpus} GPU"
    else:
        from powerfast.runtime.models import load_model

        tp_cases = _tp_cases()

        started = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            folder = _model_folder(Path(tmp) / "model")
            env = dict(os.environ, OMP_NUM_THREADS="1", POWERFAST_INTERPRET_OPS="0")
            env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests"), env.get("PYTHONPATH", "")])
            if args.smoke:
                env["CUDA_VISIBLE_DEVICES"] = ""
            command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr",
                       "127.0.0.1", "--master-port", str(_free_port()), str(ROOT / "tests" / "tp_cases.py"),
                       str(folder), tmp]
            proc = subprocess.run(command, capture_output=True, text=True, timeout=args.budget_s, env=env)
            if proc.returncode != 0:
                print(proc.stderr[-3000:], file=sys.stderr)
                print(f"torchrun failed (exit {proc.returncode})")
                return 1
            ranks = [json.loads((Path(tmp) / f"rank{r}.json").read_text()) for r in range(2)]
            os.environ["POWERFAST_INTERPRET_OPS"] = "0"
            model, _ = load_model(folder, device="cpu" if args.smoke else None)
            reference = tp_cases.run_cases(model)
        rows, bad = [], 0
        for name in [*tp_cases.CASES, "engine"]:
            agree = ranks[0][name] == ranks[1][name]
            same = agree and ranks[0][name] == reference[name]
            bad += not same
            rows.append(dict(case=name, ranks_agree=agree, equals_one_process=same))
        leaks = [r["engine_pages_in_use"] for r in ranks]
        bad += any(leaks)
        backend = "gloo, CPU" if args.smoke else f"NCCL, {gpus} GPUs (2 used)"
        print(f"2-way tensor parallel ({backend}), tiny random Llama (4 heads, 2 KV heads), tests/tp_cases.py")
        print(f"{'case':<18} {'ranks agree':>12} {'= 1 process':>12}")
        for row in rows:
            print(f"{row['case']:<18} {str(row['ranks_agree']):>12} {str(row['equals_one_process']):>12}")
        print(f"engine pages left in use per rank: {leaks}; {time.perf_counter() - started:.1f} s")
        results.update(rows=rows, leaks=leaks, mismatches=bad)
        if bad:
            print(f"{bad} mismatch(es)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 1 if results.get("mismatches") else 0


if __name__ == "__main__":
    raise SystemExit(main())
