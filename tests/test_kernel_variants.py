"""Triton compiles the paged-attention kernels once per model, not once per length.

Triton compiles a kernel once per *specialisation* of its launch arguments (each int
equal to 1 or divisible by 16, each pointer aligned to 16 bytes, every constexpr's
value). An argument that changes with the batch (the page-table width, the split
count, a metadata slice's offset) would recompile the kernel in the middle of a decode
loop: seconds on a GPU, inside a timed run.

On the CPU the kernels run under the interpreter, which compiles nothing: the tests
record every launch and compute the specialisation key Triton's launcher would compute
for it (its own binder, with the kernel's ``do_not_specialize`` lists), and require one
key across runs of different lengths and batch sizes. On CUDA the twin counts real
compilations with Triton's post-compile hook.
"""

from __future__ import annotations

import inspect
import os
import random

import pytest
from conftest import fresh_seed
import torch
import triton
import triton.language as tl
from powerfast.kernels import paged_attention as paged_attention_module

from powerfast.runtime.runner import ModelRunner

KERNEL_NAMES = ("_paged_attention_kernel", "_merge_splits_kernel")

cpu_twin = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="the CPU twin of a cuda test: needs TRITON_INTERPRET=1"
)


@triton.jit
def copy_row(src, dst, stride):
    """A kernel every argument of which Triton specialises (for the key function's own test)."""
    tl.store(dst + tl.arange(0, 16), tl.load(src + stride + tl.arange(0, 16)))


def specialisation_key(kernel, args: tuple, kwargs: dict) -> tuple:
    """What Triton's launcher specialises a launch of ``kernel`` on (a hashable key).

    kernel: a ``triton.jit`` function (compiled or interpreted); args, kwargs: its launch
    arguments. Uses Triton's own binder and specialisation rules (``BaseBackend``).
    """
    from triton.backends import BaseBackend
    from triton.runtime.jit import KernelParam, create_function_from_signature

    options = getattr(kernel, "kwargs", None)  # an interpreted kernel keeps its jit options here
    if options is None:
        not_specialised = kernel.do_not_specialize
        not_aligned = kernel.do_not_specialize_on_alignment
    else:
        not_specialised = options.get("do_not_specialize") or []
        not_aligned = options.get("do_not_specialize_on_alignment") or []
    signature = inspect.signature(kernel.fn)
    params = [
        KernelParam(i, p, i in not_specialised or p.name in not_specialised, i in not_aligned or p.name in not_aligned)
        for i, p in enumerate(signature.parameters.values())
    ]
    binder = create_function_from_signature(signature, params, BaseBackend)
    _, specialisation, _ = binder(*args, **kwargs)
    return tuple((name, repr(item)) for name, item in zip(signature.parameters, specialisation))


def differing(keys) -> dict[str, set[str]]:
    """The arguments whose specialisation differs between keys, with the values seen."""
    seen: dict[str, set[str]] = {}
    for key in keys:
        for name, item in key:
            seen.setdefault(name, set()).add(item)
    return {name: items for name, items in seen.items() if len(items) > 1}


class RecordedKernel:
    """Stands in for a Triton kernel: records each launch's key, then launches the real one."""

    def __init__(self, kernel) -> None:
        self.kernel = kernel
        self.keys: list[tuple] = []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.keys.append(specialisation_key(self.kernel, args, kwargs))
            return self.kernel[grid](*args, **kwargs)

        return launch


@pytest.fixture
def recorded(monkeypatch) -> dict[str, RecordedKernel]:
    kernels = {}
    for name in KERNEL_NAMES:
        kernels[name] = RecordedKernel(getattr(paged_attention_module, name))
        monkeypatch.setattr(paged_attention_module, name, kernels[name])
    return kernels


def tiny_llama(device: str):
    """One layer, one KV head: the cheapest model that drives the kernel under the interpreter."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(random.randrange(2**31))
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=4096)
    return LlamaForCausalLM(config).to(device).eval()


def run_once(runner: ModelRunner, prompt_lengths: list[int], decode_steps: int) -> None:
    """Prefill prompts of these lengths, decode a few steps, free (no KV left behind)."""
    rng = random.Random(fresh_seed())
    vocab = runner.vocab_size
    seqs, _ = runner.prefill([[rng.randrange(vocab) for _ in range(n)] for n in prompt_lengths])
    for _ in range(decode_steps):
        runner.decode(seqs, [rng.randrange(vocab) for _ in seqs])
    runner.free(seqs)
    assert runner.cache.pages_in_use == 0


# Two runs that differ in everything that used to select a variant: the page-table width
# (1 page, so a stride of 1, vs 3 pages), and the batch size, which moves the offsets of
# the metadata slices cut from one buffer (batch 2: 16-byte aligned, batch 3: not).
SHORT_RUN = ([3, 9], 2)
LONG_RUN = ([20, 40, 5], 2)
# On a GPU the long sequences also change the split count (2 splits at 300 positions,
# 3 at 700 for this one-KV-head model): compiled once in the first run, reused in the second.
SHORT_RUN_CUDA = ([3, 300], 2)
LONG_RUN_CUDA = ([20, 700, 5], 2)


@cpu_twin
@pytest.mark.slow
def test_runner_runs_of_two_lengths_launch_one_attention_variant(recorded):
    runner = ModelRunner(tiny_llama("cpu"), num_pages=64, backend="triton")
    run_once(runner, *SHORT_RUN)
    run_once(runner, *LONG_RUN)
    keys = recorded["_paged_attention_kernel"].keys
    assert len(keys) == 2 * (1 + SHORT_RUN[1])  # prefill + decode steps, in each of two runs
    assert len(set(keys)) == 1, differing(keys)


@cpu_twin
def test_split_counts_and_offset_metadata_launch_one_variant_each(recorded):
    """Direct launches with 2, 3 and 5 splits and metadata slices at odd offsets."""
    from test_ops_paged_attention import float64_reference, make_case

    for splits, lengths, offset in ((2, [40, 9], 0), (3, [70], 1), (5, [150, 33, 2], 3)):
        query, key_cache, value_cache, ctx = make_case(lengths, [1] * len(lengths), 2, 1, 16, 16)
        # the metadata as slices at `offset` elements into larger buffers, as the runner cuts them
        tables = torch.cat([torch.zeros(offset, dtype=torch.int32), ctx.page_tables.flatten()])[offset:]
        positions = torch.cat([torch.zeros(offset, dtype=torch.long), ctx.query_positions])[offset:]
        seq_index = torch.cat([torch.zeros(offset, dtype=torch.long), ctx.query_seq_index])[offset:]
        out = paged_attention_module.paged_attention(
            query, key_cache, value_cache, tables.view(ctx.page_tables.shape), seq_index, positions, 0.25,
            max_seq_len=ctx.max_seq_len, num_splits=splits, block_n=16,
        )
        torch.testing.assert_close(out.double(), float64_reference(query, key_cache, value_cache, ctx, 0.25),
                                   atol=2e-5, rtol=0)
    attention_keys = recorded["_paged_attention_kernel"].keys
    merge_keys = recorded["_merge_splits_kernel"].keys
    assert len(attention_keys) == len(merge_keys) == 3
    assert len(set(attention_keys)) == 1, differing(attention_keys)
    assert len(set(merge_keys)) == 1, differing(merge_keys)


def test_a_specialised_stride_gives_a_new_key():
    """The key function sees what Triton sees: a stride of 1 or of 16 is a different variant."""
    src, dst = torch.zeros(64), torch.zeros(16)
    keys = {specialisation_key(copy_row, (src, dst, stride), {}) for stride in (1, 16, 17, 33)}
    assert len(keys) == 3  # 1 (a constant), 16 (divisible by 16), 17 and 33 (neither): one key
    misaligned = specialisation_key(copy_row, (src[1:], dst, 17), {})
    assert misaligned not in keys


@pytest.mark.cuda
def test_runner_runs_of_two_lengths_compile_nothing_new_on_cuda():
    from triton import knobs

    runner = ModelRunner(tiny_llama("cuda"), num_pages=256, backend="triton")
    run_once(runner, *SHORT_RUN_CUDA)
    torch.cuda.synchronize()
    compiled = []

    def count(*, fn, **_):
        compiled.append(fn.name)

    previous = knobs.runtime.jit_post_compile_hook
    knobs.runtime.jit_post_compile_hook = count
    try:
        run_once(runner, *LONG_RUN_CUDA)
        torch.cuda.synchronize()
    finally:
        knobs.runtime.jit_post_compile_hook = previous
    assert [name for name in compiled if name in KERNEL_NAMES] == []
