"""The KV-cache ops: write new tokens' keys and values into their slots, and copy whole
pages (copy-on-write), in place.

The Triton kernels of ``powerfast.kernels.kv_cache`` for CUDA tensors and under
``TRITON_INTERPRET=1``; the torch references (``_torch_*``) otherwise
(:func:`powerfast.ops.device.use_triton`). No host sync on CUDA.

The attention layers write through the ``torch.library`` operator
``powerfast::write_kv(key_cache!, value_cache!, key, value, slot_mapping, use_triton)``
(:func:`write_kv_op`): ``torch.compile`` and CUDA-graph capture see one opaque operator with
a fake implementation, never a Triton launcher or a host-side branch.
"""

from __future__ import annotations

import torch

from powerfast.ops import device
from powerfast.ops.device import INT_DTYPES

__all__ = ["copy_pages", "write_kv", "write_kv_op"]


# ------------------------------------------------------------------------------ checks


def _check_kv_args(key_cache, value_cache, key, value, slot_mapping) -> None:
    for name, tensor in (("key_cache", key_cache), ("value_cache", value_cache)):
        if not isinstance(tensor, torch.Tensor) or tensor.dim() != 4:
            shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise ValueError(f"{name} must have shape (num_pages, page_size, kv_heads, head_dim), got {shape}")
    if key_cache.shape != value_cache.shape:
        raise ValueError(f"key_cache {tuple(key_cache.shape)} and value_cache {tuple(value_cache.shape)} differ")
    if key is None:
        return
    expected = (slot_mapping.shape[0], *key_cache.shape[2:]) if slot_mapping.dim() == 1 else None
    for name, tensor in (("key", key), ("value", value)):
        if tuple(tensor.shape) != expected:
            raise ValueError(
                f"{name} must have shape (num_tokens, kv_heads, head_dim) = {expected}, got {tuple(tensor.shape)}"
            )
    if slot_mapping.dim() != 1 or slot_mapping.dtype not in INT_DTYPES:
        raise ValueError(
            f"slot_mapping must be a (num_tokens,) int64 / int32 tensor, got {slot_mapping.dtype} {tuple(slot_mapping.shape)}"
        )


# ------------------------------------------------------------------- torch references


def _torch_write_kv(key_cache, value_cache, key, value, slot_mapping) -> None:
    num_pages, page_size = key_cache.shape[:2]
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    key_cache.view(num_pages * page_size, *key_cache.shape[2:])[slots] = key[keep].to(key_cache.dtype)
    value_cache.view(num_pages * page_size, *value_cache.shape[2:])[slots] = value[keep].to(value_cache.dtype)


def _torch_copy_pages(key_cache, value_cache, src_pages, dst_pages) -> None:
    src = src_pages.long()
    dst = dst_pages.long()
    key_cache[dst] = key_cache[src]
    value_cache[dst] = value_cache[src]


# ----------------------------------------------------------------------------- public API


def write_kv(
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Write new tokens' keys and values into their cache slots, in place.

    key_cache, value_cache: (num_pages, page_size, kv_heads, head_dim)
    key, value:             (num_tokens, kv_heads, head_dim) (cast to the cache dtype)
    slot_mapping:           (num_tokens,) int64 / int32, slot = page_id * page_size +
                            offset_in_page; -1 skips the token
    """
    _check_kv_args(key_cache, value_cache, key, value, slot_mapping)
    if device.use_triton(key_cache):
        from powerfast.kernels.kv_cache import write_kv as _triton_write_kv

        _triton_write_kv(key_cache, value_cache, key, value, slot_mapping)
        return
    _torch_write_kv(key_cache, value_cache, key, value, slot_mapping)


def copy_pages(
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    src_pages: torch.Tensor,
    dst_pages: torch.Tensor,
) -> None:
    """Copy whole pages ``src_pages[i] -> dst_pages[i]`` in both caches, in place.

    key_cache, value_cache: (num_pages, page_size, kv_heads, head_dim)
    src_pages, dst_pages: (n,) int64 / int32 page ids; a dst must not also be a src
    """
    _check_kv_args(key_cache, value_cache, None, None, None)
    for name, tensor in (("src_pages", src_pages), ("dst_pages", dst_pages)):
        if not isinstance(tensor, torch.Tensor) or tensor.dim() != 1 or tensor.dtype not in INT_DTYPES:
            raise ValueError(f"{name} must be a (n,) int64 / int32 tensor, got {tensor!r}")
    if src_pages.shape != dst_pages.shape:
        raise ValueError(f"src_pages {tuple(src_pages.shape)} and dst_pages {tuple(dst_pages.shape)} differ")
    if src_pages.numel() == 0:
        return
    if device.use_triton(key_cache):
        from powerfast.kernels.kv_cache import copy_pages as _triton_copy_pages

        _triton_copy_pages(key_cache, value_cache, src_pages, dst_pages)
        return
    _torch_copy_pages(key_cache, value_cache, src_pages, dst_pages)


# ------------------------------------------------------------------- the custom operator


def _write_kv(
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    slot_mapping: torch.Tensor,
    use_triton: bool,
) -> None:
    """key_cache, value_cache: (num_pages, page_size, kv_heads, head_dim), written in place;
    key, value: (num_tokens, kv_heads, head_dim); slot_mapping: (num_tokens,) int64, -1 = skip.
    ``use_triton`` False on a CPU tensor: plain torch (no interpreted kernel in every layer)."""
    if use_triton or key_cache.is_cuda:
        write_kv(key_cache, value_cache, key, value, slot_mapping)
        return
    kv_heads, head_dim = key_cache.shape[2], key_cache.shape[3]
    flat_keys = key_cache.view(-1, kv_heads, head_dim)
    flat_values = value_cache.view(-1, kv_heads, head_dim)
    if bool((slot_mapping < 0).any()):  # padding rows (a CPU tensor: no device sync)
        keep = slot_mapping >= 0
        slot_mapping, key, value = slot_mapping[keep], key[keep], value[keep]
    flat_keys.index_copy_(0, slot_mapping, key.to(key_cache.dtype))
    flat_values.index_copy_(0, slot_mapping, value.to(value_cache.dtype))


_write_kv_op = torch.library.custom_op("powerfast::write_kv", mutates_args=("key_cache", "value_cache"))(_write_kv)


@_write_kv_op.register_fake
def _(key_cache, value_cache, key, value, slot_mapping, use_triton) -> None:
    return None


def write_kv_op(*args) -> None:
    """``torch.ops.powerfast.write_kv`` (see :func:`_write_kv` for the arguments): the operator
    while ``torch.compile`` traces, its implementation directly otherwise."""
    if torch.compiler.is_compiling():
        return torch.ops.powerfast.write_kv(*args)
    return _write_kv(*args)
