"""Tensor parallelism: one model sharded over the processes of a ``torchrun`` launch.

transformers shards a model by its TP plan (``from_pretrained(...,
distributed_config=DistributedConfig(tp_size=N))``): each rank holds its share of the
attention and KV heads and of the MLP, and every rank gets the whole logits. The paged
runtime needs nothing else: the attention function receives the rank's heads, so each rank's
KV pool holds its own KV heads. Every rank runs the same step programs on the same logits
with the same seeds, so every rank draws the same tokens and makes the same forks, frees and
admissions; the pools agree in size (:func:`agree_on_pages`) so that admission agrees too.

Launch: ``torchrun --nproc-per-node N -m powerfast.cli sample|eval ... --tensor-parallel N``.
Rank 0 prints and writes; the others compute the same and keep quiet.
"""

from __future__ import annotations

import os

__all__ = ["MIN_TRANSFORMERS", "agree_on_pages", "check_heads", "check_launch", "distributed_config",
           "is_leader", "rank", "tensor_parallel_size", "world_size"]

MIN_TRANSFORMERS = "5.17"
"""The first transformers release whose ``from_pretrained`` takes ``distributed_config``
(``transformers.distributed.DistributedConfig``); CI tests with the locked 5.25."""


def rank() -> int:
    """This process's rank in the launch (0 without one)."""
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    """Processes in the launch (1 without one)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_leader() -> bool:
    """Rank 0: the process that prints, writes records and serves."""
    return rank() == 0


def tensor_parallel_size(model) -> int:
    """The model's tensor-parallel degree (1 unless transformers sharded it)."""
    return int(getattr(model, "tp_size", None) or 1)


def check_launch(tp: int) -> None:
    """ValueError (one line) unless ``tp`` is a valid degree for this launch: 1 anywhere,
    N > 1 only as N processes of ``torchrun --nproc-per-node N``."""
    if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
        raise ValueError(f"--tensor-parallel must be an int >= 1, got {tp!r}")
    if tp > 1 and world_size() != tp:
        raise ValueError(f"--tensor-parallel {tp} needs {tp} processes: launch with torchrun --nproc-per-node {tp} "
                         f"-m powerfast.cli ... (this launch has WORLD_SIZE={world_size()})")


def check_heads(config, tp: int) -> None:
    """ValueError (one line) unless a ``tp``-way shard gets whole heads: the attention and KV
    heads must divide by ``tp`` (checked on the config, before any weight is loaded)."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    num_heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
    if kv_heads % tp or num_heads % tp:
        raise ValueError(f"tensor parallel size {tp} must divide the model's {kv_heads} KV heads and {num_heads} "
                         f"attention heads")


def distributed_config(tp: int):
    """transformers' ``DistributedConfig(tp_size=tp)``; ImportError (one line) naming the
    installed version when it has none."""
    try:
        from transformers.distributed import DistributedConfig
    except ImportError:
        import transformers

        raise ImportError(f"--tensor-parallel needs transformers >= {MIN_TRANSFORMERS} (DistributedConfig); "
                          f"this is {transformers.__version__}: pip install 'transformers>={MIN_TRANSFORMERS}'") from None
    return DistributedConfig(tp_size=tp)


def agree_on_pages(num_pages: int, device) -> int:
    """The smallest pool size of all ranks (each rank may see different free memory): every
    rank then admits the same requests. ``num_pages`` itself without a process group."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return num_pages
    value = torch.tensor([num_pages], dtype=torch.int64,
                         device=device if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return int(value.item())
