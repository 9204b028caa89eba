"""The top-k op: the k most likely tokens of each row and their base log-probs, without a
full log-softmax.

The Triton kernel of ``powerfast.kernels.topk`` (one pass over the vocabulary) for CUDA
tensors and under ``TRITON_INTERPRET=1``; the torch reference :func:`_torch_topk_logprobs`
otherwise (:func:`powerfast.ops.device.use_triton`). No host sync.
"""

from __future__ import annotations

import torch

from powerfast.ops.device import check_logits, use_triton

__all__ = ["topk_logprobs"]


def _torch_topk_logprobs(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    values, token_ids = torch.topk(logits.float(), k, dim=-1)
    return token_ids, values - torch.logsumexp(logits.float(), dim=-1, keepdim=True)


def topk_logprobs(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k tokens of each row and their base log-probs, without a full log-softmax.

    logits: (N, V) float32 / bfloat16 / float16; k: int in [1, V]
    returns (token_ids (N, k) int64, logprobs (N, k) float32), sorted by descending logprob.
    Ties between equal logits are broken towards the smaller token id.
    """
    check_logits(logits)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= logits.shape[1]:
        raise ValueError(f"k must be an int in [1, {logits.shape[1]}], got {k!r}")
    if use_triton(logits):
        from powerfast.kernels.topk import topk_logprobs as _triton_topk

        return _triton_topk(logits, k)
    return _torch_topk_logprobs(logits, k)
