"""ModelRunner: drives any Hugging Face causal LM over the paged KV cache.

The model runs with ``use_cache=False`` and no cache argument: its attention layers call
the registered paged attention function (:mod:`powerfast.attention`), which reads and
writes the runner's pools. Each forward gets explicit ``position_ids`` and the paged
context through the forward's keyword arguments.

- decode: ``input_ids (num_seqs, 1)``, ``logits_to_keep=1``;
- prefill / extend: the new tokens of all sequences packed into ``input_ids (1, T)``
  (ragged, no padding), ``logits_to_keep`` = the positions wanted.

Sequences are handles (:class:`powerfast.cache.Sequence`); ``fork`` shares the KV
blocks of a prefix, ``free`` releases them. Block tables, slots and positions are built
on the host from the handles and copied to the device (pinned, non-blocking) once per
forward; decode accepts the next tokens as a device tensor, so a decode loop never
synchronises with the device.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence as SequenceABC
from dataclasses import dataclass

import torch

from powerfast import attention, ops
from powerfast.attention import CONTEXT_KWARG, PagedAttentionContext
from powerfast.cache import CacheConfig, PagedKVCache, Sequence

__all__ = ["ModelRunner", "RunnerConfig", "Sequence", "check_supported"]

_MIN_SHARED_PREFIX = 64  # positions; shorter shared prefixes are not worth a cascade


@dataclass(slots=True)
class RunnerConfig:
    """Settings of a :class:`ModelRunner`.

    block_size:          positions per KV block (a multiple of 256 for the flash backend)
    num_blocks:          KV pool size in blocks; or
    max_memory:          a KV budget in bytes (all layers, keys and values); or
    gpu_memory_fraction: a fraction of the free CUDA memory. Default: see CacheConfig.
    backend:             "auto", "torch", "triton" or "flash"
    """

    block_size: int = 16
    num_blocks: int | None = None
    max_memory: int | None = None
    gpu_memory_fraction: float | None = None
    backend: str = "auto"

    def __post_init__(self) -> None:
        if not isinstance(self.block_size, int) or self.block_size < 1:
            raise ValueError(f"block_size must be a positive int, got {self.block_size!r}")
        if self.backend not in attention.BACKENDS:
            raise ValueError(f"backend must be one of {attention.BACKENDS}, got {self.backend!r}")


def _model_geometry(model) -> tuple[int, int, int, int]:
    """(num_layers, num_heads, kv_heads, head_dim) of an HF causal LM."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    num_layers = config.num_hidden_layers
    num_heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
    if num_heads % kv_heads:
        raise ValueError(f"num_attention_heads {num_heads} is not a multiple of num_key_value_heads {kv_heads}")
    return num_layers, num_heads, kv_heads, head_dim


def check_supported(model) -> None:
    """ValueError, in one line, for a model the runner cannot drive.

    The paged context travels to the attention function through the forward's keyword
    arguments; models whose layers drop them (transformers marks those
    ``_supports_attention_backend = False``, e.g. StableLM) never see it.
    """
    if not getattr(model, "_supports_attention_backend", False):
        model_type = getattr(model.config, "model_type", "?")
        raise ValueError(
            f"{type(model).__name__} (model_type {model_type!r}) cannot run on the paged runtime: its layers do not "
            f"pass attention keyword arguments through to the attention function (transformers marks it "
            f"_supports_attention_backend = False)"
        )


class ModelRunner:
    """Prefill, decode, extend, fork and free sequences of an HF causal LM on a paged KV cache.

    model:       a ``transformers`` causal LM whose attention layers go through
                 ``AttentionInterface`` and pass keyword arguments through (Llama, Qwen2,
                 Qwen3, Mistral, Gemma 2/3, ...; others raise ValueError here). The runner
                 switches it to the paged attention implementation; calling the model
                 directly (or ``model.generate``) without the runner switches it back to its
                 own attention first, and so does ``restore_attention()``.
    block_size, num_blocks, max_memory, gpu_memory_fraction, backend: see :class:`RunnerConfig`.

    Logits come back on the model's device in the model's dtype.
    """

    def __init__(
        self,
        model,
        block_size: int = 16,
        num_blocks: int | None = None,
        max_memory: int | None = None,
        gpu_memory_fraction: float | None = None,
        backend: str = "auto",
    ) -> None:
        self.config = RunnerConfig(block_size, num_blocks, max_memory, gpu_memory_fraction, backend)
        if not hasattr(model, "set_attn_implementation"):
            raise TypeError(f"model must be a transformers PreTrainedModel, got {type(model).__name__}")
        check_supported(model)
        self.model = model
        first_param = next(model.parameters())
        self.device = first_param.device
        self.dtype = first_param.dtype
        num_layers, self.num_heads, kv_heads, head_dim = _model_geometry(model)
        self.vocab_size = int(model.config.get_text_config().vocab_size)
        self.backend = attention.resolve_backend(backend, self.device, self.dtype, block_size)
        self.cache = PagedKVCache(
            CacheConfig(
                num_layers=num_layers,
                num_kv_heads=kv_heads,
                head_dim=head_dim,
                dtype=self.dtype,
                device=self.device,
                block_size=block_size,
                num_blocks=num_blocks,
                max_memory=max_memory,
                gpu_memory_fraction=gpu_memory_fraction,
            )
        )
        attention.register()
        attention.install_dense_fallback(model)
        self._attach()

    # ------------------------------------------------------------------ attention switch

    def _attach(self) -> None:
        if self.model.config._attn_implementation != attention.ATTENTION_NAME:
            self.model.set_attn_implementation(attention.ATTENTION_NAME)

    def restore_attention(self) -> None:
        """Give the model its original attention implementation back now. Optional: a call
        of the model without the runner's context switches back by itself (see
        :func:`powerfast.attention.install_dense_fallback`); the next runner call switches
        to the paged attention again."""
        attention.restore_original(self.model)

    # ------------------------------------------------------------------ sequences

    def fork(self, seq: Sequence, n: int, length: int | None = None) -> list[Sequence]:
        """n children sharing ``seq``'s first ``length`` positions (default all); no KV copied."""
        return self.cache.fork(seq, n, length)

    def free(self, seqs: Sequence | Iterable[Sequence]) -> None:
        """Release sequences' blocks; parents and children can be freed in any order."""
        self.cache.free([seqs] if isinstance(seqs, Sequence) else seqs)

    # ------------------------------------------------------------------ forwards

    @torch.inference_mode()
    def prefill(self, prompts: SequenceABC[SequenceABC[int]]) -> tuple[list[Sequence], torch.Tensor]:
        """New sequences for ragged prompts, run in one packed forward.

        prompts: N non-empty lists of token ids
        Returns (N sequence handles, logits (N, V) at each prompt's last position).
        """
        if len(prompts) == 0:
            raise ValueError("prefill needs at least one prompt")
        seqs = [self.cache.new_sequence() for _ in prompts]
        try:
            logits = self._forward(seqs, prompts, last_only=True)
        except BaseException:
            self.cache.free(seqs)  # the caller never saw these handles
            raise
        return seqs, logits

    @torch.inference_mode()
    def decode(self, seqs: SequenceABC[Sequence], next_tokens: SequenceABC[int] | torch.Tensor) -> torch.Tensor:
        """Append one token to each sequence in one batched forward.

        next_tokens: (N,) token ids, a list or a tensor (kept on the device: no sync)
        Returns logits (N, V) after the new tokens.
        """
        if isinstance(next_tokens, torch.Tensor):
            if next_tokens.numel() != len(seqs):
                raise ValueError(f"{next_tokens.numel()} next tokens for {len(seqs)} sequences")
            input_ids = next_tokens.reshape(len(seqs), 1).to(device=self.device, dtype=torch.long)
            return self._forward(seqs, [None] * len(seqs), last_only=True, input_ids=input_ids)
        if len(next_tokens) != len(seqs):
            raise ValueError(f"{len(next_tokens)} next tokens for {len(seqs)} sequences")
        return self._forward(seqs, [[int(t)] for t in next_tokens], last_only=True)

    @torch.inference_mode()
    def extend(self, seqs: SequenceABC[Sequence], token_lists: SequenceABC[SequenceABC[int]]) -> list[torch.Tensor]:
        """Append several tokens to each sequence in one packed forward, scoring every position.

        token_lists: N non-empty lists of token ids
        Returns N tensors (len(token_lists[i]), V): row j is the logits after token j.
        """
        counts = [len(tokens) for tokens in token_lists]
        logits = self._forward(seqs, token_lists, last_only=False)
        return list(logits.split(counts, dim=0))

    # ------------------------------------------------------------------ internals

    def _forward(self, seqs, token_lists, last_only: bool, input_ids: torch.Tensor | None = None) -> torch.Tensor:
        """One model forward appending ``token_lists[i]`` to ``seqs[i]``.

        Decode layout (one token per sequence): input (N, 1). Otherwise packed (1, T).
        Returns logits (N, V) if last_only else (T, V).
        """
        num_seqs = len(seqs)
        if num_seqs == 0:
            raise ValueError("no sequences given")
        if len(token_lists) != num_seqs:
            raise ValueError(f"{len(token_lists)} token lists for {num_seqs} sequences")
        if len({id(seq) for seq in seqs}) != num_seqs:
            raise ValueError("a sequence appears twice in one batch")
        if input_ids is None:
            counts = [len(tokens) for tokens in token_lists]
            for index, count in enumerate(counts):
                if count == 0:
                    raise ValueError(f"token list {index} is empty")
            flat_tokens = [int(t) for tokens in token_lists for t in tokens]
            low, high = min(flat_tokens), max(flat_tokens)
            if low < 0 or high >= self.vocab_size:
                raise ValueError(f"token id {low if low < 0 else high} is outside the vocabulary [0, {self.vocab_size})")
        else:
            counts = [1] * num_seqs
            flat_tokens = []
        decode_layout = all(count == 1 for count in counts)

        start_lengths = [seq.length for seq in seqs]
        slots = self.cache.append_slots(seqs, counts)  # may raise OutOfBlocksError, changing nothing
        num_tokens = len(slots)
        seq_lens = [seq.length for seq in seqs]
        if decode_layout:
            positions = start_lengths
            seq_index = list(range(num_seqs))
        else:
            positions = [p for start, count in zip(start_lengths, counts) for p in range(start, start + count)]
            seq_index = [i for i, count in enumerate(counts) for _ in range(count)]
        query_start_loc = [0] * (num_seqs + 1)
        cu_seqlens_k = [0] * (num_seqs + 1)
        for i in range(num_seqs):
            query_start_loc[i + 1] = query_start_loc[i] + counts[i]
            cu_seqlens_k[i + 1] = cu_seqlens_k[i] + seq_lens[i]
        max_blocks = max(len(seq.block_table) for seq in seqs)
        flat_tables = [b for seq in seqs for b in seq.block_table + [0] * (max_blocks - len(seq.block_table))]

        # two host -> device copies: int64 and int32 metadata
        meta64 = self._to_device(slots + positions + seq_index + flat_tokens, torch.int64)
        meta32 = self._to_device(seq_lens + cu_seqlens_k + query_start_loc + flat_tables, torch.int32)
        slot_mapping = meta64[:num_tokens]
        query_positions = meta64[num_tokens : 2 * num_tokens]
        query_seq_index = meta64[2 * num_tokens : 3 * num_tokens]
        n = num_seqs
        ctx = PagedAttentionContext(
            key_caches=self.cache.key_caches,
            value_caches=self.cache.value_caches,
            slot_mapping=slot_mapping,
            block_tables=meta32[3 * n + 2 :].view(n, max_blocks),
            seq_lens=meta32[:n],
            cu_seqlens_k=meta32[n : 2 * n + 1],
            query_start_loc=meta32[2 * n + 1 : 3 * n + 2],
            query_seq_index=query_seq_index,
            query_positions=query_positions,
            max_query_len=max(counts),
            max_seq_len=max(seq_lens),
            backend=self.backend,
            shared_prefix_blocks=self._shared_prefix_blocks(seqs, start_lengths) if decode_layout else 0,
        )
        if decode_layout:
            if input_ids is None:
                input_ids = meta64[3 * num_tokens :].view(num_seqs, 1)
            position_ids = query_positions.view(num_seqs, 1)
            logits_to_keep = 1
        else:
            input_ids = meta64[3 * num_tokens :].view(1, num_tokens)
            position_ids = query_positions.view(1, num_tokens)
            if last_only:
                logits_to_keep = ctx.query_start_loc[1:].to(torch.long) - 1
            else:
                logits_to_keep = 0

        self._attach()
        output = self.model(
            input_ids=input_ids,
            position_ids=position_ids,
            use_cache=False,
            logits_to_keep=logits_to_keep,
            **{CONTEXT_KWARG: ctx},
        )
        logits = output.logits
        if decode_layout:
            return logits[:, -1, :]
        return logits[0]

    def _shared_prefix_blocks(self, seqs, start_lengths: list[int]) -> int:
        """Leading blocks common to every block table and visible to every new token.

        Only the torch backend uses it (a cascade over the shared prefix); on GPUs the
        shared blocks stay in L2 and the kernels need no hint.
        """
        if self.backend != "torch" or len(seqs) < 2:
            return 0
        first = seqs[0].block_table
        # a query at position p sees keys 0..p: the shared blocks must be complete below it
        shared = min(len(first), (min(start_lengths) + 1) // self.cache.block_size)
        for seq in seqs[1:]:
            table = seq.block_table
            if table[:shared] != first[:shared]:
                shared = next(k for k in range(shared) if table[k] != first[k])
            if shared == 0:
                return 0
        return shared if shared * self.cache.block_size >= _MIN_SHARED_PREFIX else 0

    def _to_device(self, values: list[int], dtype: torch.dtype) -> torch.Tensor:
        return ops.upload_ints(values, dtype, self.device)

    def __repr__(self) -> str:
        return f"ModelRunner({type(self.model).__name__}, backend={self.backend!r}, {self.cache!r})"
