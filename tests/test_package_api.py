"""The documented spellings work from a fresh interpreter, and the oracle takes a Hugging
Face model as it is."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from powerfast import HFLanguageModel
from powerfast.evaluation import exact


def run_python(program: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=300)


def test_submodules_are_attributes_of_the_package():
    done = run_python(
        "import sys, powerfast\n"
        "assert 'torch' not in sys.modules, 'import powerfast imported torch'\n"
        "lm = powerfast.TableLM(lambda prefix: {0: 0.25, 1: 0.75}, vocab_size=2, eos_token_id=0)\n"
        "probs = powerfast.evaluation.exact.power_conditional(lm, [1], 2.0, 1)\n"
        "assert abs(float(probs[1]) - 0.9) < 1e-12, probs\n"  # 0.75^2 / (0.25^2 + 0.75^2)
        "assert powerfast.evaluation.toy.PLAN == 0 and callable(powerfast.cli.main)\n"
        "from powerfast import PowerSampler, power_distribution\n"
        "try:\n    powerfast.nothing\nexcept AttributeError as e:\n    print(e)\n"
    )
    assert done.returncode == 0, done.stderr
    assert "has no attribute 'nothing'" in done.stdout


def test_the_exported_estimate_is_the_checked_one():
    import math

    import powerfast
    from powerfast.ops import jackknife

    assert powerfast.power_estimates is jackknife.power_estimates
    assert powerfast.power_distribution is jackknife.power_distribution
    dead = torch.tensor([[-math.inf, -math.inf]])  # nothing possible: the unchecked estimate gives zeros
    assert jackknife._power_estimates_nosync(dead, torch.zeros(1, 2, 3), 4.0).probs.tolist() == [[0.0, 0.0]]
    for estimate in (powerfast.power_estimates, powerfast.power_distribution):
        with pytest.raises(ValueError, match=r"every candidate log-prob is -inf in row \[0\]"):
            estimate(dead, torch.zeros(1, 2, 3), 4.0)
        with pytest.raises(ValueError, match=r"rollout_scores contains NaN"):
            estimate(torch.zeros(1, 2), torch.full((1, 2, 3), math.nan), 4.0)


def tiny_llama(seed: int):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=5, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                         eos_token_id=[3, 4], bos_token_id=0, pad_token_id=0)
    return LlamaForCausalLM(config).eval()


def test_exact_accepts_a_hugging_face_model_as_it_is():
    model = tiny_llama(int(torch.randint(0, 1000, ())))
    raw = exact.power_conditional(model, [0, 1, 2], 3.0, 3)
    wrapped = exact.power_conditional(HFLanguageModel(model), [0, 1, 2], 3.0, 3)
    torch.testing.assert_close(raw, wrapped, atol=0, rtol=0)
    assert float(raw.sum()) == pytest.approx(1.0, abs=1e-12)
    assert exact.scaling_factor(model, [0, 1], 4, 3.0, 3) == 1.0  # 4 is the model's second EOS id
    assert model.config._attn_implementation == "sdpa"  # the model keeps its own attention afterwards


def test_exact_refuses_other_objects_saying_what_to_pass():
    with pytest.raises(TypeError, match=r"powerfast.HFLanguageModel\(hf_model\).*got dict"):
        exact.power_conditional({"vocab": 3}, [0], 2.0, 1)
