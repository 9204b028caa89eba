"""What the ops share: the dispatch rule (Triton kernel or torch reference), the checks of
their common arguments, and the upload of host ints without a sync.

No check here synchronises with the device: arguments are checked only as far as their
shapes, dtypes and Python values allow (values inside tensors are not inspected).
"""

from __future__ import annotations

import os
from typing import Optional

import torch

__all__ = ["INT_DTYPES", "check_logits", "check_row_vector", "upload_ints", "use_triton"]

INT_DTYPES = (torch.int64, torch.int32)


def use_triton(tensor: torch.Tensor) -> bool:
    """Triton for CUDA tensors, and for CPU tensors when TRITON_INTERPRET=1 (read per call).

    POWERFAST_INTERPRET_OPS=0 keeps CPU tensors on the torch references even under the
    interpreter: tests that push hundreds of thousands of rows through the samplers use
    it, since the interpreter runs one program per row.
    """
    if tensor.is_cuda:
        return True
    return os.environ.get("TRITON_INTERPRET") == "1" and os.environ.get("POWERFAST_INTERPRET_OPS", "1") != "0"


def check_logits(logits: torch.Tensor) -> None:
    """logits: a (N, V) floating tensor with V >= 1."""
    if not isinstance(logits, torch.Tensor):
        raise ValueError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dim() != 2:
        raise ValueError(f"logits must have shape (N, V), got shape {tuple(logits.shape)}")
    if logits.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise ValueError(f"logits must be float32, float16, bfloat16 or float64, got dtype {logits.dtype}")
    if logits.shape[1] < 1:
        raise ValueError(f"logits must have a non-empty vocabulary, got shape {tuple(logits.shape)}")


def check_row_vector(name: str, tensor: Optional[torch.Tensor], num_rows: int, dtypes, device) -> None:
    """``tensor`` is None or a (num_rows,) tensor of one of ``dtypes`` on ``device``."""
    if tensor is None:
        return
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tuple(tensor.shape) != (num_rows,):
        raise ValueError(f"{name} must have shape ({num_rows},), got shape {tuple(tensor.shape)}")
    if tensor.dtype not in dtypes:
        raise ValueError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {tensor.dtype}")
    if tensor.device != device:
        raise ValueError(f"{name} is on {tensor.device}, logits on {device}")


def upload_ints(values: list[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(len(values),) tensor of ``dtype`` on ``device`` from host ints, without a sync.

    On CUDA the values go through pinned host memory with a non-blocking copy, ordered on
    the current stream before any later kernel: the host never waits for the device. On
    the CPU the host tensor itself is returned.
    """
    host = torch.tensor(values, dtype=dtype)
    if torch.device(device).type == "cpu":
        return host
    return host.pin_memory().to(device, non_blocking=True)
