"""The KV-cache ops (powerfast.ops.kv_cache): write_kv / copy_pages against the torch reference: exact equality (a copy),
except an fp32 -> bf16 cast on write under the interpreter (within one bf16 ulp)."""

from __future__ import annotations

import pytest
import torch

from powerfast.ops import kv_cache

DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=pytest.mark.cuda)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _caches(num_pages, page_size, kv_heads, head_dim, dtype, device):
    shape = (num_pages, page_size, kv_heads, head_dim)
    return torch.randn(shape).to(dtype).to(device), torch.randn(shape).to(dtype).to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("slot_dtype", [torch.int64, torch.int32], ids=str)
@pytest.mark.parametrize("geometry", [(6, 16, 2, 64), (5, 4, 3, 24), (3, 1, 1, 1)], ids=str)
def test_write_kv_matches_reference(device, dtype, slot_dtype, geometry):
    num_pages, page_size, kv_heads, head_dim = geometry
    key_cache, value_cache = _caches(*geometry, dtype, device)
    num_slots = num_pages * page_size
    num_tokens = min(7, num_slots)
    slots = torch.randperm(num_slots)[:num_tokens]
    slots[::3] = -1  # skipped tokens
    slots = slots.to(slot_dtype).to(device)
    key = torch.randn(num_tokens, kv_heads, head_dim).to(dtype).to(device)
    value = torch.randn(num_tokens, kv_heads, head_dim, dtype=torch.float32).to(device)  # cast on write
    expected_key, expected_value = key_cache.clone().cpu(), value_cache.clone().cpu()
    kv_cache._torch_write_kv(expected_key, expected_value, key.cpu(), value.cpu(), slots.cpu())
    kv_cache.write_kv(key_cache, value_cache, key, value, slots)
    assert torch.equal(key_cache.cpu(), expected_key)
    if dtype == torch.bfloat16 and not value_cache.is_cuda:
        # fp32 -> bf16 casts under the interpreter may round differently: within one bf16 ulp
        assert torch.allclose(value_cache.cpu().float(), expected_value.float(), rtol=2**-7, atol=0)
    else:
        assert torch.equal(value_cache.cpu(), expected_value)
    written = slots[slots >= 0].long().cpu()
    flat = key_cache.cpu().flatten(0, 1)
    assert torch.equal(flat[written], key.cpu()[(slots >= 0).cpu()])


@pytest.mark.parametrize("device", DEVICES)
def test_write_kv_strided_inputs(device):
    key_cache, value_cache = _caches(4, 8, 2, 16, torch.float32, device)
    packed = torch.randn(5, 2, 2, 16, device=device)  # (tokens, k/v, heads, dim): strided views
    key, value = packed[:, 0], packed[:, 1]
    slots = torch.tensor([3, 9, -1, 31, 0], device=device)
    expected_key, expected_value = key_cache.clone().cpu(), value_cache.clone().cpu()
    kv_cache._torch_write_kv(expected_key, expected_value, key.cpu(), value.cpu(), slots.cpu())
    kv_cache.write_kv(key_cache, value_cache, key, value, slots)
    assert torch.equal(key_cache.cpu(), expected_key) and torch.equal(value_cache.cpu(), expected_value)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_copy_pages_matches_reference(device, dtype):
    key_cache, value_cache = _caches(8, 16, 2, 32, dtype, device)
    src = torch.tensor([0, 5, 2], device=device)
    dst = torch.tensor([7, 1, 3], device=device)
    expected_key, expected_value = key_cache.clone().cpu(), value_cache.clone().cpu()
    kv_cache._torch_copy_pages(expected_key, expected_value, src.cpu(), dst.cpu())
    kv_cache.copy_pages(key_cache, value_cache, src, dst)
    assert torch.equal(key_cache.cpu(), expected_key) and torch.equal(value_cache.cpu(), expected_value)
    assert torch.equal(key_cache[7].cpu(), key_cache[0].cpu())
    kv_cache.copy_pages(key_cache, value_cache, src[:0], dst[:0])  # nothing to copy


def test_kv_rejects_bad_arguments():
    key_cache, value_cache = _caches(2, 4, 1, 8, torch.float32, "cpu")
    with pytest.raises(ValueError, match="key must have shape"):
        kv_cache.write_kv(key_cache, value_cache, torch.zeros(3, 2, 8), torch.zeros(3, 2, 8), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="slot_mapping"):
        kv_cache.write_kv(key_cache, value_cache, torch.zeros(3, 1, 8), torch.zeros(3, 1, 8), torch.zeros(3))
    with pytest.raises(ValueError, match="differ"):
        kv_cache.copy_pages(key_cache, value_cache, torch.zeros(2, dtype=torch.long), torch.zeros(3, dtype=torch.long))
