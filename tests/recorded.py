"""Outputs of every sampler on a tiny random Llama, recorded to catch changes of behaviour.

``python tests/recorded.py`` rewrites ``tests/data/recorded_outputs.json`` (powerfast imported
from this checkout: installed with ``pip install -e .``, or ``PYTHONPATH=$PWD`` in the
repository root): do that only when a change of the random stream is intended (and say so in
the commit). The tests in
``test_engine.py`` compare today's ``generate`` and engine runs against the file. The file
is recorded on the CPU with the kernels under ``TRITON_INTERPRET=1``, as the tests run
there: other kernels (a GPU's) give logits that differ in the last bits, which can flip
a draw, so the comparison runs on the CPU only.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

if not torch.cuda.is_available():  # as the tests run (conftest.py): the kernels under the interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")
from transformers import LlamaConfig, LlamaForCausalLM

PATH = Path(__file__).parent / "data" / "recorded_outputs.json"
PROMPTS = [[0, 3, 7], [0, 9, 2, 11, 4]]
MAX_NEW_TOKENS = 12
SEED = 1234

CASES = {
    "plain": dict(method="plain"),
    "low-temp": dict(method="low-temp", alpha=4.0),
    "greedy": dict(method="greedy"),
    "best-of-n": dict(method="best-of-n", num_samples=3),
    "sir": dict(method="sir", alpha=1.5, num_samples=3),
    "sir-tempered": dict(method="sir", alpha=4.0, num_samples=3, temperature=0.7),
    "power-block": dict(method="power", power=dict(alpha=4.0, block_size=3, num_candidates=4, top_k=2,
                                                     num_rollouts=2, horizon=3, rollout_proposal="base")),
    "power-token": dict(method="power", power=dict(alpha=4.0, block_size=1, top_k=3, num_rollouts=2, horizon=2,
                                                     rollout_proposal="base")),
    "power-tempered-reuse": dict(method="power", power=dict(alpha=4.0, block_size=2, num_candidates=3, top_k=2,
                                                              num_rollouts=3, horizon=3, rollout_proposal="tempered",
                                                              reuse_rollouts=True)),
    "power-tempered-candidates": dict(method="power", power=dict(alpha=4.0, block_size=3, num_candidates=4, top_k=2,
                                                                   num_rollouts=2, horizon=3, rollout_proposal="tempered",
                                                                   candidate_proposal="tempered")),
    "mcmc": dict(method="mcmc", mcmc=dict(alpha=4.0, block_size=4, mcmc_steps=2)),
    "smc": dict(method="smc", smc=dict(alpha=4.0, num_particles=4, resample_every=2, ess_threshold=0.9)),
}


def tiny_model():
    """A 2-layer Llama with 16 tokens, EOS 5, sharpened so that EOS and ties matter little."""
    torch.manual_seed(7)
    config = LlamaConfig(vocab_size=16, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         eos_token_id=5, bos_token_id=0, pad_token_id=0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(3.0)
    return model


def case_kwargs(case: dict) -> dict:
    """make_sampler settings of a case, by name."""
    kwargs = {k: v for k, v in case.items() if k in ("alpha", "num_samples", "temperature")}
    for method in ("power", "mcmc", "smc"):
        kwargs.update(case.get(method, {}))
    return kwargs


def run_generate(model, name: str, prompts, seed: int = SEED) -> list[list[int]]:
    """Token ids of ``make_sampler(...).generate(prompts)`` for a case (a fresh runner)."""
    from powerfast.samplers.factory import make_sampler

    case = CASES[name]
    sampler = make_sampler(case["method"], model, seed=seed, runner_options=dict(page_size=4, num_pages=512),
                           **case_kwargs(case))
    return [r.token_ids for r in sampler.generate(prompts, MAX_NEW_TOKENS)]


def record() -> dict:
    model = tiny_model()
    out = {}
    for name in CASES:
        out[name] = {
            "alone": [run_generate(model, name, [p])[0] for p in PROMPTS],
            "together": run_generate(model, name, PROMPTS),
        }
    return out


if __name__ == "__main__":
    PATH.parent.mkdir(exist_ok=True)
    PATH.write_text(json.dumps(record()) + "\n")
    print(f"wrote {PATH}")
