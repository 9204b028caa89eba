"""The top-k op (powerfast.ops.topk.topk_logprobs) against a float64 reference: log_softmax in float64, then the k best
by (log-prob descending, token id ascending). Log-prob tolerance 2e-5 + 2e-6 * |lp|; ids
must match exactly (the tie rule is part of the contract, and bf16 / fp16 logits tie often).
"""

from __future__ import annotations

import math

import pytest
import torch

from powerfast.ops import topk

DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=pytest.mark.cuda)]
SHAPES = [(1, 1, 1), (3, 7, 3), (64, 1000, 8), (3, 5003, 32), (3, 32000, 8), (1, 151936, 8), (3, 151936, 4)]

pytestmark = pytest.mark.filterwarnings("ignore:divide by zero encountered in log:RuntimeWarning")


@pytest.fixture
def poisoned_empty(monkeypatch):
    real_empty = torch.empty

    def poisoned(*args, **kwargs):
        tensor = real_empty(*args, **kwargs)
        return tensor.fill_(math.nan) if tensor.is_floating_point() else tensor.fill_(-777)

    monkeypatch.setattr(torch, "empty", poisoned)


def _reference(logits, k):
    logprobs = torch.log_softmax(logits.double().cpu(), dim=-1)
    order = torch.argsort(logprobs, dim=-1, descending=True, stable=True)  # ties: smaller id first
    ids = order[:, :k]
    return ids, logprobs.gather(1, ids)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"N{s[0]}-V{s[1]}-k{s[2]}")
@pytest.mark.slow
def test_topk_matches_reference(device, dtype, shape, poisoned_empty):
    num_rows, vocab, k = shape
    logits = (torch.randn(num_rows, vocab, dtype=torch.float64) * 3).to(dtype).to(device)
    if vocab > 4096:
        logits[0, vocab - 1] = 30.0  # the best token is the last one of the vocabulary
    ids, logprobs = topk.topk_logprobs(logits, k)
    ref_ids, ref_logprobs = _reference(logits, k)
    assert ids.dtype == torch.int64 and logprobs.dtype == torch.float32
    assert ids.shape == (num_rows, k) and logprobs.shape == (num_rows, k)
    assert torch.equal(ids.cpu(), ref_ids)
    err = (logprobs.double().cpu() - ref_logprobs).abs()
    assert (err <= 2e-5 + 2e-6 * ref_logprobs.abs()).all(), err.max().item()


@pytest.mark.parametrize("device", DEVICES)
def test_topk_ties_and_ascending_input(device):
    """Ascending logits force an eviction at every entry; equal logits keep the smaller ids."""
    vocab = 300
    logits = torch.arange(vocab, dtype=torch.float32, device=device)[None].repeat(2, 1)
    logits[1] = torch.tensor([1.0, 2.0]).repeat(vocab // 2)
    ids, logprobs = topk.topk_logprobs(logits, 5)
    assert ids[0].tolist() == [299, 298, 297, 296, 295]
    assert ids[1].tolist() == [1, 3, 5, 7, 9]
    ref_ids, ref_logprobs = _reference(logits, 5)
    assert torch.equal(ids.cpu(), ref_ids)
    assert torch.allclose(logprobs.double().cpu(), ref_logprobs, atol=2e-5)


@pytest.mark.parametrize("k", [0, 11, 2.0, True])
def test_topk_rejects_bad_k(k):
    with pytest.raises(ValueError, match="k must be"):
        topk.topk_logprobs(torch.randn(2, 10), k)
