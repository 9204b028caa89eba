"""ModelRunner: drives any Hugging Face causal LM over the paged KV cache.

The model runs with ``use_cache=False`` and no cache argument: its attention layers call
the registered paged attention function (:mod:`powerfast.runtime.attention`), which reads and
writes the runner's pools through two custom operators (:mod:`powerfast.ops`). Each
forward gets explicit ``position_ids`` and the paged context through the forward's
keyword arguments.

- decode: ``input_ids (num_seqs, 1)``, ``logits_to_keep=1``;
- prefill: the prompts of all sequences packed into ``input_ids (1, T)`` (ragged, no
  padding), ``logits_to_keep`` = each prompt's last position.

Sequences are handles (:class:`powerfast.runtime.cache.KVSequence`); ``fork`` shares the KV
pages of a prefix, ``free`` releases them. The runner implements the runner interface
(:class:`powerfast.runtime.protocol.Runner`) that the samplers and the engine use.

**Device-resident metadata.** Each live sequence owns a row of two persistent device
tensors, ``page_tables (rows, width) int32`` and ``seq_lens (rows,) int32``, kept in
step with the host allocator incrementally: a fork copies the parent's row on the
device, a decode step uploads only the table entries that changed (a page boundary or a
copy-on-write: one entry per sequence), a free returns the row for reuse. A decode step
computes positions, slots and the new lengths on the device from these rows, so a step
that crosses no page boundary uploads nothing (``upload_bytes`` counts what is
uploaded). Prefill builds its packed metadata on the host.

**Compile and CUDA graphs.** The decode forward is one function of tensors
(:meth:`ModelRunner.decode_forward`). ``compile=True`` runs it under ``torch.compile``;
``cuda_graphs=True`` (the default on CUDA) pads a batch to its bucket
(:data:`BATCH_BUCKETS`; larger batches run unpadded and eagerly), and on CUDA captures
the bucket's step as a CUDA graph on first use (one memory pool for all graphs) and
replays it. Padding rows write their KV nowhere (slot -1) and are dropped from the
output. On the CPU ``cuda_graphs=True`` runs the same padded batches eagerly.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from powerfast.ops.device import upload_ints
from powerfast.runtime import attention, parallel
from powerfast.runtime.attention import CONTEXT_KWARG, PagedAttentionContext
from powerfast.runtime.cache import CacheConfig, KVSequence, PagedKVCache
from powerfast.runtime.protocol import eos_token_ids

__all__ = ["BATCH_BUCKETS", "DecodeBatch", "ModelRunner", "RunnerConfig", "check_supported"]

_MIN_SHARED_PREFIX = 64  # positions; shorter shared prefixes are not worth a cascade

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 192, 256, 384, 512)
"""Decode batch sizes captured as CUDA graphs; a batch is padded to the smallest bucket
that holds it, larger batches run unpadded and eagerly."""

PAD_ROW = 0  # the metadata row of padding entries: never given to a sequence, length 0
_MIN_ATTN_LEN = 256  # smallest max_seq_len bucket of compiled / captured steps
_BATCH_CACHE_SIZE = 32  # device row-index tensors kept for recently decoded batches
_INITIAL_ROWS = 256  # metadata rows allocated up front (they grow by doubling)


def batch_bucket(num_seqs: int) -> int | None:
    """The smallest bucket of :data:`BATCH_BUCKETS` holding ``num_seqs``, or None past the largest."""
    for bucket in BATCH_BUCKETS:
        if bucket >= num_seqs:
            return bucket
    return None


@dataclass(slots=True)
class DecodeBatch:
    """A decode step's batch, prepared on the host by :meth:`ModelRunner.prepare_decode`.

    rows:         (padded,) int64 device tensor, the metadata row of each entry; padding
                  entries are PAD_ROW (they write no KV and are dropped from the output)
    num_seqs:     the real entries (the first ``num_seqs`` of ``rows``)
    max_seq_len:  host int >= every sequence's length after the step (bucketed when
                  compiled or captured, so that it changes rarely)
    shared_prefix_pages: host int, see :class:`powerfast.runtime.attention.PagedAttentionContext`
    """

    rows: torch.Tensor
    num_seqs: int
    max_seq_len: int
    shared_prefix_pages: int = 0


@dataclass(slots=True)
class RunnerConfig:
    """Settings of a :class:`ModelRunner`.

    page_size:           positions per KV page (a multiple of 256 for the flash backend)
    num_pages:           KV pool size in pages; or
    max_memory:          a KV budget in bytes (all layers, keys and values); or
    gpu_memory_fraction: a fraction of the free CUDA memory. Default: see CacheConfig.
    backend:             "auto", "torch", "triton" or "flash"
    compile:             False, True (``torch.compile`` of the decode forward, inductor) or
                         the name of a ``torch.compile`` backend (e.g. "aot_eager")
    cuda_graphs:         pad decode batches to :data:`BATCH_BUCKETS` and, on CUDA, capture
                         them as CUDA graphs; None: on for CUDA, off elsewhere
    """

    page_size: int = 16
    num_pages: int | None = None
    max_memory: int | None = None
    gpu_memory_fraction: float | None = None
    backend: str = "auto"
    compile: bool | str = False
    cuda_graphs: bool | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.page_size, int) or self.page_size < 1:
            raise ValueError(f"page_size must be a positive int, got {self.page_size!r}")
        if self.backend not in attention.BACKENDS:
            raise ValueError(f"backend must be one of {attention.BACKENDS}, got {self.backend!r}")
        if not isinstance(self.compile, (bool, str)) or self.compile == "":
            raise ValueError(f"compile must be a bool or a torch.compile backend name, got {self.compile!r}")
        if self.cuda_graphs is not None and not isinstance(self.cuda_graphs, bool):
            raise ValueError(f"cuda_graphs must be True, False or None, got {self.cuda_graphs!r}")


def _model_geometry(model) -> tuple[int, int, int, int]:
    """(num_layers, num_heads, kv_heads, head_dim) of an HF causal LM."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    num_layers = config.num_hidden_layers
    num_heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
    if num_heads % kv_heads:
        raise ValueError(f"num_attention_heads {num_heads} is not a multiple of num_key_value_heads {kv_heads}")
    # a tensor-parallel model (transformers' TP plan) runs each rank's share of the heads
    tp = parallel.tensor_parallel_size(model)
    if tp > 1:
        parallel.check_heads(config, tp)
        num_heads, kv_heads = num_heads // tp, kv_heads // tp
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
    """Prefill, decode, fork and free sequences of an HF causal LM on a paged KV cache: a
    :class:`~powerfast.runtime.protocol.Runner`.

    model:       a ``transformers`` causal LM whose attention layers go through
                 ``AttentionInterface`` and pass keyword arguments through (Llama, Qwen2,
                 Qwen3, Mistral, Gemma 2/3, ...; others raise ValueError here). The runner
                 switches it to the paged attention implementation; calling the model
                 directly (or ``model.generate``) without the runner switches it back to its
                 own attention first, and so does ``restore_attention()``.
    page_size, num_pages, max_memory, gpu_memory_fraction, backend, compile, cuda_graphs:
                 see :class:`RunnerConfig`.

    Logits come back on the model's device in the model's dtype. ``eos_token_ids`` are the
    ids the model declares (:func:`powerfast.runtime.protocol.eos_token_ids`), ``context_length`` its
    ``max_position_embeddings`` (None if it declares none).

    Counters (host ints, cumulative; reset them freely):
    ``upload_bytes``: sequence metadata copied host -> device (page tables, lengths,
    slots, positions, token lists, row indices); ``num_forwards``: model forwards;
    ``forward_rows``: sequences over those forwards (padding excluded).
    """

    def __init__(
        self,
        model,
        page_size: int = 16,
        num_pages: int | None = None,
        max_memory: int | None = None,
        gpu_memory_fraction: float | None = None,
        backend: str = "auto",
        compile: bool | str = False,
        cuda_graphs: bool | None = None,
    ) -> None:
        self.config = RunnerConfig(
            page_size, num_pages, max_memory, gpu_memory_fraction, backend, compile, cuda_graphs
        )
        if not hasattr(model, "set_attn_implementation"):
            raise TypeError(f"model must be a transformers PreTrainedModel, got {type(model).__name__}")
        check_supported(model)
        self.model = model
        first_param = next(model.parameters())
        self.device = first_param.device
        self.dtype = first_param.dtype
        num_layers, self.num_heads, kv_heads, head_dim = _model_geometry(model)
        text_config = model.config.get_text_config()
        self.vocab_size = int(text_config.vocab_size)
        self.context_length: int | None = getattr(text_config, "max_position_embeddings", None)
        self.eos_token_ids = eos_token_ids(hf_model=model)
        self.backend = attention.resolve_backend(backend, self.device, self.dtype, page_size)
        cache_config = CacheConfig(
            num_layers=num_layers,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            dtype=self.dtype,
            device=self.device,
            page_size=page_size,
            num_pages=num_pages,
            max_memory=max_memory,
            gpu_memory_fraction=gpu_memory_fraction,
        )
        self.tensor_parallel = parallel.tensor_parallel_size(model)
        if self.tensor_parallel > 1:  # every rank the same pool size, so that admission agrees
            agreed = parallel.agree_on_pages(cache_config.resolve_num_pages(), self.device)
            cache_config = dataclasses.replace(cache_config, num_pages=agreed, max_memory=None,
                                               gpu_memory_fraction=None)
        self.cache = PagedKVCache(cache_config)
        attention.register()
        attention.install_dense_fallback(model)
        self._attach()

        self.upload_bytes = 0
        self.num_forwards = 0
        self.forward_rows = 0
        # device-resident metadata: one row per live sequence (row PAD_ROW is padding)
        max_positions = self.context_length or 0
        width = -(-max_positions // page_size) if max_positions else self.cache.num_pages
        self._table_width = max(1, min(width, self.cache.num_pages))
        self._page_tables = torch.zeros(_INITIAL_ROWS, self._table_width, dtype=torch.int32, device=self.device)
        self._seq_lens = torch.zeros(_INITIAL_ROWS, dtype=torch.int32, device=self.device)
        self._rows: dict[int, int] = {}  # seq_id -> row
        self._mirrors: dict[int, list[int]] = {}  # row -> the page ids its device row holds
        self._free_rows = list(range(_INITIAL_ROWS - 1, 0, -1))
        self._batches: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        # compile / graphs
        self.bucketing = self.device.type == "cuda" if cuda_graphs is None else cuda_graphs
        self._capture = self.bucketing and self.device.type == "cuda"
        self._graphs: dict[tuple[int, int], _CapturedStep] = {}
        self._graph_pool = None
        self._graph_buffers: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._decode_fn = self._decode_core
        if compile:
            options = {"backend": compile} if isinstance(compile, str) else {}
            self._decode_fn = torch.compile(self._decode_core, fullgraph=True, **options)

    # ------------------------------------------------------------------ attention switch

    def _attach(self) -> None:
        if self.model.config._attn_implementation != attention.ATTENTION_NAME:
            self.model.set_attn_implementation(attention.ATTENTION_NAME)

    def restore_attention(self) -> None:
        """Give the model its original attention implementation back now. Optional: a call
        of the model without the runner's context switches back by itself (see
        :func:`powerfast.runtime.attention.install_dense_fallback`); the next runner call switches
        to the paged attention again."""
        attention.restore_original(self.model)

    # ------------------------------------------------------------------ sequences

    @torch.inference_mode()
    def fork(self, seq: KVSequence, n: int, length: int | None = None) -> list[KVSequence]:
        """n children sharing ``seq``'s first ``length`` positions (default all); no KV copied.

        The children's metadata rows are copies of the parent's, made on the device.
        """
        children = self.cache.fork(seq, n, length)
        if children:
            self._sync_rows([seq])
            parent_row = self._rows[seq.seq_id]
            rows = self._take_rows(children)
            for child, row in zip(children, rows):
                self._mirrors[row] = self._mirrors[parent_row][: len(child.page_table)]
            child_rows = self._upload(rows, torch.int64)
            self._page_tables.index_copy_(0, child_rows, self._page_tables[parent_row].expand(len(rows), -1).clone())
            self._seq_lens.index_fill_(0, child_rows, children[0].length)
        return children

    def free(self, seqs: KVSequence | Iterable[KVSequence]) -> None:
        """Release sequences' pages and metadata rows; parents and children can be freed in any order."""
        seqs = [seqs] if isinstance(seqs, KVSequence) else list(seqs)
        self.cache.free(seqs)
        for seq in seqs:
            row = self._rows.pop(seq.seq_id, None)
            if row is not None:  # a freed row is rewritten in full before it is used again
                self._mirrors.pop(row, None)
                self._free_rows.append(row)

    # ------------------------------------------------------------------ forwards

    @torch.inference_mode()
    def prefill(self, prompts: Sequence[Sequence[int]]) -> tuple[list[KVSequence], torch.Tensor]:
        """New sequences for ragged prompts, run in one packed forward.

        prompts: N non-empty lists of token ids
        Returns (N sequence handles, logits (N, V) at each prompt's last position).
        """
        if len(prompts) == 0:
            raise ValueError("prefill needs at least one prompt")
        seqs = [self.cache.new_sequence() for _ in prompts]
        try:
            logits = self._forward(seqs, prompts)
        except BaseException:
            self.free(seqs)  # the caller never saw these handles
            raise
        return seqs, logits

    @torch.inference_mode()
    def decode(self, seqs: Sequence[KVSequence], next_tokens: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """Append one token to each sequence in one batched forward.

        next_tokens: (N,) token ids, a list or a tensor (kept on the device: no sync)
        Returns logits (N, V) after the new tokens.
        """
        if isinstance(next_tokens, torch.Tensor):
            if next_tokens.numel() != len(seqs):
                raise ValueError(f"{next_tokens.numel()} next tokens for {len(seqs)} sequences")
            input_ids = next_tokens.reshape(len(seqs)).to(device=self.device, dtype=torch.long)
        else:
            if len(next_tokens) != len(seqs):
                raise ValueError(f"{len(next_tokens)} next tokens for {len(seqs)} sequences")
            tokens = [int(t) for t in next_tokens]
            for token in tokens:
                if not 0 <= token < self.vocab_size:
                    raise ValueError(f"token id {token} is outside the vocabulary [0, {self.vocab_size})")
            input_ids = self._upload(tokens, torch.int64)
        batch = self.prepare_decode(seqs)
        return self.decode_forward(batch, input_ids)

    # ------------------------------------------------------------------ the decode step

    def prepare_decode(self, seqs: Sequence[KVSequence]) -> DecodeBatch:
        """Host part of a decode step: room for one more token in each sequence (pages
        allocated, copy-on-write done), the changed page-table entries uploaded, and the
        batch's row indices (uploaded once per distinct batch, then reused).

        Raises OutOfPagesError (changing nothing) if the pool is short.
        """
        num_seqs = len(seqs)
        if num_seqs == 0:
            raise ValueError("no sequences given")
        if len({id(seq) for seq in seqs}) != num_seqs:
            raise ValueError("a sequence appears twice in one batch")
        for seq in seqs:
            self.cache._check_live(seq)  # before any row is given to it
        self._sync_rows(seqs)  # sequences the runner has not seen yet
        start_lengths = [seq.length for seq in seqs]
        self.cache.append_slots(seqs, [1] * num_seqs)
        self._patch_rows(seqs)
        padded = batch_bucket(num_seqs) if self.bucketing else None
        rows = self._batch_rows(seqs, padded or num_seqs)
        max_seq_len = max(start_lengths) + 1
        fixed_shapes = self._capture or self._decode_fn != self._decode_core
        if fixed_shapes:  # compiled / captured: a bucket, so that it rarely changes
            capacity = self._table_width * self.cache.page_size
            max_seq_len = min(capacity, max(_MIN_ATTN_LEN, 1 << (max_seq_len - 1).bit_length()))
            shared = 0
        else:
            shared = self._shared_prefix_pages(seqs, start_lengths)
        return DecodeBatch(rows, num_seqs, max_seq_len, shared)

    @torch.inference_mode()
    def decode_forward(self, batch: DecodeBatch, input_ids: torch.Tensor) -> torch.Tensor:
        """Device part of a decode step: input_ids (num_seqs,) int64 on the device -> logits (num_seqs, V).

        Replays the batch's CUDA graph when graphs are on (capturing it on first use),
        else runs the (compiled) step; padding rows are dropped from the output.
        """
        self._attach()
        self.num_forwards += 1
        self.forward_rows += batch.num_seqs
        padded = batch.rows.shape[0]
        if padded != batch.num_seqs:
            input_ids = torch.cat([input_ids, input_ids.new_zeros(padded - batch.num_seqs)])
        if self._capture and padded in BATCH_BUCKETS:
            step = self._graphs.get((padded, batch.max_seq_len))
            if step is None and self._capture:
                step = self._capture_step(padded, batch.max_seq_len)
            if step is not None:
                return step.replay(input_ids, batch.rows, batch.num_seqs)
        try:
            logits = self._decode_fn(input_ids, batch.rows, batch.max_seq_len, batch.shared_prefix_pages)
        except torch._dynamo.exc.TorchDynamoException as error:
            if self._decode_fn == self._decode_core:
                raise
            # compilation fails before the step runs: nothing was written, run it eagerly
            warnings.warn(
                f"torch.compile of the decode step failed ({type(error).__name__}: {str(error).splitlines()[0]}); "
                f"decoding without compile from now on",
                RuntimeWarning,
                stacklevel=3,
            )
            self._decode_fn = self._decode_core
            self._graphs.clear()
            logits = self._decode_fn(input_ids, batch.rows, batch.max_seq_len, batch.shared_prefix_pages)
        return logits[: batch.num_seqs]

    def _decode_core(self, input_ids: torch.Tensor, rows: torch.Tensor, max_seq_len: int,
                     shared_prefix_pages: int = 0) -> torch.Tensor:
        """The decode step as a function of tensors (no host value read, no host sync).

        input_ids, rows: (B,) int64 on the device; rows index the persistent metadata
        (PAD_ROW for padding). Reads each row's length and page table, computes positions
        and slots, advances the lengths in place, runs the model. Returns logits (B, V).
        """
        page_size = self.cache.page_size
        batch = rows.shape[0]
        is_pad = rows == PAD_ROW
        positions = self._seq_lens.index_select(0, rows).long()  # the new token's position
        used_pages = min(self._table_width, -(-max_seq_len // page_size))
        tables = self._page_tables.index_select(0, rows)[:, :used_pages]
        pages = tables.gather(1, torch.div(positions, page_size, rounding_mode="floor")[:, None]).squeeze(1)
        slots = torch.where(is_pad, -1, pages.long() * page_size + positions % page_size)
        seq_lens = (positions + 1).to(torch.int32)
        self._seq_lens.index_copy_(0, rows, torch.where(is_pad, 0, seq_lens))
        arange = torch.arange(batch + 1, device=rows.device, dtype=torch.int32)
        ctx = PagedAttentionContext(
            key_caches=self.cache.key_caches,
            value_caches=self.cache.value_caches,
            slot_mapping=slots,
            page_tables=tables,
            seq_lens=seq_lens,
            cu_seqlens_k=torch.cat([arange[:1], torch.cumsum(seq_lens, 0, dtype=torch.int32)]),
            query_start_loc=arange,
            query_seq_index=arange[:batch].long(),
            query_positions=positions,
            max_query_len=1,
            max_seq_len=max_seq_len,
            backend=self.backend,
            shared_prefix_pages=shared_prefix_pages,
        )
        output = self.model(
            input_ids=input_ids.view(batch, 1),
            position_ids=positions.view(batch, 1),
            use_cache=False,
            logits_to_keep=1,
            **{CONTEXT_KWARG: ctx},
        )
        return output.logits[:, -1, :]

    def _capture_step(self, padded: int, max_seq_len: int) -> "_CapturedStep | None":
        """Capture the decode step of a bucket as a CUDA graph (None, with one warning, if it fails)."""
        try:
            step = _CapturedStep(self, padded, max_seq_len)
        except Exception as error:  # never a wrong result: eager from now on
            warnings.warn(
                f"CUDA graph capture of the decode step failed ({type(error).__name__}: {error}); "
                f"decoding eagerly from now on",
                RuntimeWarning,
                stacklevel=3,
            )
            self._capture = False
            self._graphs.clear()
            return None
        self._graphs[(padded, max_seq_len)] = step
        return step

    # ------------------------------------------------------------------ device metadata

    def _upload(self, values: list[int], dtype: torch.dtype) -> torch.Tensor:
        """A host list as a device tensor; counted in ``upload_bytes``."""
        self.upload_bytes += len(values) * torch.empty((), dtype=dtype).element_size()
        return upload_ints(values, dtype, self.device)

    def _take_rows(self, seqs: Sequence[KVSequence]) -> list[int]:
        """Fresh metadata rows for sequences (growing the tensors if needed)."""
        if len(self._free_rows) < len(seqs):
            self._grow_rows(len(seqs) - len(self._free_rows))
        rows = [self._free_rows.pop() for _ in seqs]
        for seq, row in zip(seqs, rows):
            self._rows[seq.seq_id] = row
        return rows

    def _grow_rows(self, extra: int) -> None:
        old = self._page_tables.shape[0]
        new = max(2 * old, old + extra)
        with torch.inference_mode(False):  # normal tensors, updatable in and out of inference mode
            tables = torch.zeros(new, self._table_width, dtype=torch.int32, device=self.device)
            lens = torch.zeros(new, dtype=torch.int32, device=self.device)
            tables[:old] = self._page_tables
            lens[:old] = self._seq_lens
        self._page_tables, self._seq_lens = tables, lens
        self._free_rows.extend(range(new - 1, old - 1, -1))
        self._graphs.clear()  # they point at the old tensors

    def _grow_width(self, width: int) -> None:
        rows = self._page_tables.shape[0]
        with torch.inference_mode(False):
            tables = torch.zeros(rows, width, dtype=torch.int32, device=self.device)
            tables[:, : self._table_width] = self._page_tables
        self._page_tables, self._table_width = tables, width
        self._graphs.clear()

    def _sync_rows(self, seqs: Sequence[KVSequence], force: bool = False) -> None:
        """Upload the whole row (table and length) of sequences without one (or all, with force)."""
        todo = [seq for seq in seqs if force or seq.seq_id not in self._rows]
        if not todo:
            return
        new = [seq for seq in todo if seq.seq_id not in self._rows]
        if new:
            self._take_rows(new)
        width = max(len(seq.page_table) for seq in todo)
        if width > self._table_width:
            self._grow_width(max(width, 2 * self._table_width))
        rows = [self._rows[seq.seq_id] for seq in todo]
        flat = [b for seq in todo for b in seq.page_table + [0] * (width - len(seq.page_table))]
        values = self._upload(rows + [seq.length for seq in todo] + flat, torch.int64)
        n = len(todo)
        row_index = values[:n]
        self._seq_lens.index_copy_(0, row_index, values[n : 2 * n].to(torch.int32))
        if width:
            self._page_tables[row_index, :width] = values[2 * n :].view(n, width).to(torch.int32)
        for seq, row in zip(todo, rows):
            self._mirrors[row] = list(seq.page_table)

    def _patch_rows(self, seqs: Sequence[KVSequence]) -> None:
        """Upload the page-table entries that changed since the rows were last synced
        (a decode step: a new page at a boundary, or a copy-on-write of the last one)."""
        patches: list[int] = []
        for seq in seqs:
            row = self._rows[seq.seq_id]
            mirror = self._mirrors[row]
            table = seq.page_table
            if len(table) == len(mirror) and (not table or table[-1] == mirror[-1]):
                continue  # the common case: nothing changed
            start = max(0, min(len(mirror), len(table)) - 1)
            for col in range(start, len(table)):
                if col >= len(mirror) or mirror[col] != table[col]:
                    patches.extend((row, col, table[col]))
            self._mirrors[row] = list(table)
        if not patches:
            return
        if max(patches[1::3]) >= self._table_width:
            self._grow_width(max(max(patches[1::3]) + 1, 2 * self._table_width))
        values = self._upload(patches, torch.int64).view(-1, 3)
        self._page_tables[values[:, 0], values[:, 1]] = values[:, 2].to(torch.int32)

    def _batch_rows(self, seqs: Sequence[KVSequence], padded: int) -> torch.Tensor:
        """(padded,) int64 device row indices of a batch, PAD_ROW past the real ones; one
        upload per distinct batch, then reused from a small cache."""
        key = (padded, *(seq.seq_id for seq in seqs))
        rows = self._batches.get(key)
        if rows is not None:
            self._batches.move_to_end(key)
            return rows
        values = [self._rows[seq.seq_id] for seq in seqs] + [PAD_ROW] * (padded - len(seqs))
        rows = self._upload(values, torch.int64)
        self._batches[key] = rows
        if len(self._batches) > _BATCH_CACHE_SIZE:
            self._batches.popitem(last=False)
        return rows

    # ------------------------------------------------------------------ internals

    def _forward(self, seqs, token_lists) -> torch.Tensor:
        """One model forward appending ``token_lists[i]`` to ``seqs[i]`` (prefill).

        Decode layout (one token per sequence): input (N, 1). Otherwise packed (1, T).
        Returns logits (N, V) after each sequence's last new token.
        """
        num_seqs = len(seqs)
        if num_seqs == 0:
            raise ValueError("no sequences given")
        if len(token_lists) != num_seqs:
            raise ValueError(f"{len(token_lists)} token lists for {num_seqs} sequences")
        if len({id(seq) for seq in seqs}) != num_seqs:
            raise ValueError("a sequence appears twice in one batch")
        counts = [len(tokens) for tokens in token_lists]
        for index, count in enumerate(counts):
            if count == 0:
                raise ValueError(f"token list {index} is empty")
        flat_tokens = [int(t) for tokens in token_lists for t in tokens]
        low, high = min(flat_tokens), max(flat_tokens)
        if low < 0 or high >= self.vocab_size:
            raise ValueError(f"token id {low if low < 0 else high} is outside the vocabulary [0, {self.vocab_size})")
        decode_layout = all(count == 1 for count in counts)

        start_lengths = [seq.length for seq in seqs]
        slots = self.cache.append_slots(seqs, counts)  # may raise OutOfPagesError, changing nothing
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
        max_pages = max(len(seq.page_table) for seq in seqs)
        flat_tables = [b for seq in seqs for b in seq.page_table + [0] * (max_pages - len(seq.page_table))]

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
            page_tables=meta32[3 * n + 2 :].view(n, max_pages),
            seq_lens=meta32[:n],
            cu_seqlens_k=meta32[n : 2 * n + 1],
            query_start_loc=meta32[2 * n + 1 : 3 * n + 2],
            query_seq_index=query_seq_index,
            query_positions=query_positions,
            max_query_len=max(counts),
            max_seq_len=max(seq_lens),
            backend=self.backend,
            shared_prefix_pages=self._shared_prefix_pages(seqs, start_lengths) if decode_layout else 0,
        )
        if decode_layout:
            input_ids = meta64[3 * num_tokens :].view(num_seqs, 1)
            position_ids = query_positions.view(num_seqs, 1)
            logits_to_keep = 1
        else:
            input_ids = meta64[3 * num_tokens :].view(1, num_tokens)
            position_ids = query_positions.view(1, num_tokens)
            logits_to_keep = ctx.query_start_loc[1:].to(torch.long) - 1

        self._attach()
        output = self.model(
            input_ids=input_ids,
            position_ids=position_ids,
            use_cache=False,
            logits_to_keep=logits_to_keep,
            **{CONTEXT_KWARG: ctx},
        )
        self.num_forwards += 1
        self.forward_rows += num_seqs
        self._sync_rows(seqs, force=True)  # the device rows follow the host tables
        logits = output.logits
        if decode_layout:
            return logits[:, -1, :]
        return logits[0]

    def _shared_prefix_pages(self, seqs, start_lengths: list[int]) -> int:
        """Leading pages common to every page table and visible to every new token.

        Only the torch backend uses it (a cascade over the shared prefix); on GPUs the
        shared pages stay in L2 and the kernels need no hint.
        """
        if self.backend != "torch" or len(seqs) < 2:
            return 0
        first = seqs[0].page_table
        # a query at position p sees keys 0..p: the shared pages must be complete below it
        shared = min(len(first), (min(start_lengths) + 1) // self.cache.page_size)
        for seq in seqs[1:]:
            table = seq.page_table
            if table[:shared] != first[:shared]:
                shared = next(k for k in range(shared) if table[k] != first[k])
            if shared == 0:
                return 0
        return shared if shared * self.cache.page_size >= _MIN_SHARED_PREFIX else 0

    def _to_device(self, values: list[int], dtype: torch.dtype) -> torch.Tensor:
        return self._upload(values, dtype)

    def __repr__(self) -> str:
        return f"ModelRunner({type(self.model).__name__}, backend={self.backend!r}, {self.cache!r})"


class _CapturedStep:
    """The decode step of one (batch bucket, max_seq_len bucket) as a CUDA graph.

    Static inputs ``input_ids`` / ``rows`` (padded,) are refilled before each replay;
    ``logits`` (padded, V) is the output buffer, shared by the graphs of one batch bucket
    (allocated outside the graph pool, so that the graphs of several length buckets hold
    one copy). Warm-up and capture run on padding rows only, so they write no KV and
    change no real sequence's length.
    """

    def __init__(self, runner: ModelRunner, padded: int, max_seq_len: int) -> None:
        device = runner.device
        static = runner._graph_buffers.get(padded)
        if static is None:
            static = (
                torch.zeros(padded, dtype=torch.long, device=device),
                torch.full((padded,), PAD_ROW, dtype=torch.long, device=device),
                torch.empty(padded, runner.vocab_size, dtype=runner.dtype, device=device),
            )
            runner._graph_buffers[padded] = static
        self.input_ids, self.rows, self.logits = static
        self.rows.fill_(PAD_ROW)
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for _ in range(2):  # compiles kernels (and torch.compile graphs) outside the capture
                runner._decode_fn(self.input_ids, self.rows, max_seq_len, 0)
        torch.cuda.current_stream(device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=runner._graph_pool):
            self.logits.copy_(runner._decode_fn(self.input_ids, self.rows, max_seq_len, 0))
        if runner._graph_pool is None:
            runner._graph_pool = self.graph.pool()

    def replay(self, input_ids: torch.Tensor, rows: torch.Tensor, num_seqs: int) -> torch.Tensor:
        """Run the step for ``rows`` (padded,) with ``input_ids`` (padded,); returns a copy of
        the real rows' logits (num_seqs, V) (the output buffer is rewritten by the next replay)."""
        self.input_ids.copy_(input_ids)
        self.rows.copy_(rows)
        self.graph.replay()
        return self.logits[:num_seqs].clone()
