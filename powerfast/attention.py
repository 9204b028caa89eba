"""The paged attention function registered with transformers, and its backends.

:func:`register` adds :func:`paged_attention_forward` to transformers'
``AttentionInterface`` under :data:`ATTENTION_NAME` (once). A model set to that
implementation calls it in every attention layer with the new tokens' q/k/v after RoPE;
the per-forward paged metadata (:class:`PagedAttentionContext`) arrives through the
forward's keyword arguments under :data:`CONTEXT_KWARG`, and ``module.layer_idx`` picks
the layer's pool. The function writes the new keys and values into their slots, attends
causally over each sequence's cached positions and returns ``(out (B, S, H, D), None)``.

Backends (all give the dense model's logits):

- ``"torch"``: gather the blocks, then ``scaled_dot_product_attention``; any device;
- ``"triton"``: the paged kernel of ``powerfast.kernels.paged_attention``; CUDA (or the
  interpreter);
- ``"flash"``: ``flash_attn_with_kvcache`` / ``flash_attn_varlen_func`` with
  ``block_table``; CUDA, fp16/bf16, block size a multiple of 256, flash-attn importable.

``"auto"`` picks flash, then triton on CUDA, and torch elsewhere (:func:`resolve_backend`).
All three apply attention-logit soft-capping (``softcap``: Gemma 2) as ``cap * tanh(s / cap)``
of each scaled score.

Sharing the model: :func:`install_dense_fallback` remembers the model's own attention
implementation on the model and adds a forward pre-hook, so a call of the model without
the paged context (a plain forward, ``model.generate``) runs with that implementation.
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from powerfast import library

__all__ = [
    "ATTENTION_NAME",
    "BACKENDS",
    "CONTEXT_KWARG",
    "PagedAttentionContext",
    "install_dense_fallback",
    "paged_attention_forward",
    "register",
    "restore_original",
    "resolve_backend",
    "torch_paged_attention",
]

ATTENTION_NAME = "powerfast_paged"
CONTEXT_KWARG = "paged_attention_context"
BACKENDS = ("auto", "torch", "triton", "flash")
FLASH_BLOCK_MULTIPLE = 256


@dataclass(slots=True)
class PagedAttentionContext:
    """Paged metadata of one forward, shared by all layers. Tensors on the model's device.

    The forward's new tokens are flattened sequence after sequence (``num_tokens`` of
    them): the model is called with ``input_ids`` of shape ``(num_seqs, 1)`` for decode or
    ``(1, num_tokens)`` for a packed prefill / extend; both flatten to that order.

    key_caches, value_caches: per layer, (num_blocks, block_size, kv_heads, head_dim)
    slot_mapping:     (num_tokens,) int64, the slot each new token's k/v is written to
    block_tables:     (num_seqs, max_blocks) int32, padded with 0
    seq_lens:         (num_seqs,) int32, lengths including the new tokens
    cu_seqlens_k:     (num_seqs + 1,) int32, cumulative seq_lens
    query_start_loc:  (num_seqs + 1,) int32, cumulative new-token counts
    query_seq_index:  (num_tokens,) int64, the sequence of each new token
    query_positions:  (num_tokens,) int64, absolute position of each new token
    max_query_len, max_seq_len: host ints
    backend:          "torch", "triton" or "flash" (resolved, not "auto")
    shared_prefix_blocks: host int S: the first S entries of every block table are the same
                      blocks, visible to every query (a forked prefix). The torch backend
                      attends over them once for the whole batch (cascade); 0 disables.
    """

    key_caches: list[torch.Tensor]
    value_caches: list[torch.Tensor]
    slot_mapping: torch.Tensor
    block_tables: torch.Tensor
    seq_lens: torch.Tensor
    cu_seqlens_k: torch.Tensor
    query_start_loc: torch.Tensor
    query_seq_index: torch.Tensor
    query_positions: torch.Tensor
    max_query_len: int
    max_seq_len: int
    backend: str
    shared_prefix_blocks: int = 0

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS[1:]:
            raise ValueError(f"backend must be one of {BACKENDS[1:]} (resolved), got {self.backend!r}")
        num_tokens = self.slot_mapping.shape[0]
        for name in ("query_seq_index", "query_positions"):
            if getattr(self, name).shape != (num_tokens,):
                raise ValueError(f"{name} must have shape ({num_tokens},), got {tuple(getattr(self, name).shape)}")

    @property
    def num_tokens(self) -> int:
        return self.slot_mapping.shape[0]


def flash_attn_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype, block_size: int) -> str:
    """The concrete backend for a setting: "auto" -> flash, triton (CUDA) or torch (CPU).

    An explicit choice that cannot run on this device / dtype / block size raises.
    """
    if backend not in BACKENDS:
        raise ValueError(f"attention backend must be one of {BACKENDS}, got {backend!r}")
    device = torch.device(device)
    flash_ok = (
        device.type == "cuda"
        and dtype in (torch.float16, torch.bfloat16)
        and block_size % FLASH_BLOCK_MULTIPLE == 0
        and flash_attn_available()
    )
    if backend == "auto":
        if flash_ok:
            return "flash"
        return "triton" if device.type == "cuda" else "torch"
    if backend == "flash" and not flash_ok:
        raise ValueError(
            f"the flash backend needs CUDA, fp16/bf16, a block size multiple of {FLASH_BLOCK_MULTIPLE} and flash-attn "
            f"installed; got device {device}, dtype {dtype}, block_size {block_size}, "
            f"flash-attn {'found' if flash_attn_available() else 'not found'}"
        )
    if backend == "triton" and device.type != "cuda":
        import os

        if os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(f"the triton backend needs CUDA (or TRITON_INTERPRET=1), got device {device}")
    return backend


# ---------------------------------------------------------------------------- backends


def torch_paged_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    ctx: PagedAttentionContext,
    scale: float,
    softcap: float | None = None,
) -> torch.Tensor:
    """Reference backend: gather each sequence's blocks, then masked SDPA.

    query: (num_tokens, num_heads, head_dim); caches: (num_blocks, block_size, kv_heads, head_dim)
    softcap: scores become ``softcap * tanh(scores / softcap)`` (after scaling); None: off
    Returns (num_tokens, num_heads, head_dim).
    """
    num_tokens, num_heads, head_dim = query.shape
    block_size, kv_heads = key_cache.shape[1], key_cache.shape[2]
    num_seqs = ctx.block_tables.shape[0]
    used_blocks = -(-ctx.max_seq_len // block_size)
    if ctx.max_query_len == 1 and num_seqs > 1 and ctx.shared_prefix_blocks > 0:
        return _cascade_decode_attention(query, key_cache, value_cache, ctx, scale, used_blocks, softcap)
    block_ids = ctx.block_tables[:, :used_blocks].reshape(-1)
    kv_len = used_blocks * block_size
    # (num_seqs, kv_heads, kv_len, head_dim); index_select is a plain copy, much faster
    # than advanced indexing on CPU
    keys = key_cache.index_select(0, block_ids).view(num_seqs, kv_len, kv_heads, head_dim).transpose(1, 2)
    values = value_cache.index_select(0, block_ids).view(num_seqs, kv_len, kv_heads, head_dim).transpose(1, 2)
    key_positions = torch.arange(kv_len, device=query.device)
    if ctx.max_query_len == 1:  # decode: token i is sequence i
        queries = query.unsqueeze(2)  # (num_seqs, num_heads, 1, head_dim)
        mask = key_positions[None, :] <= ctx.query_positions[:, None]  # (num_seqs, kv_len)
        mask = mask[:, None, None, :]
    else:  # pad the new tokens to (num_seqs, max_query_len)
        index_in_seq = torch.arange(num_tokens, device=query.device) - ctx.query_start_loc[ctx.query_seq_index]
        queries = query.new_zeros(num_seqs, ctx.max_query_len, num_heads, head_dim)
        queries[ctx.query_seq_index, index_in_seq] = query
        queries = queries.transpose(1, 2)
        # padding rows see position 0 only (never all -inf, so no NaN); they are dropped below
        positions = torch.zeros(num_seqs, ctx.max_query_len, dtype=torch.long, device=query.device)
        positions[ctx.query_seq_index, index_in_seq] = ctx.query_positions
        mask = (key_positions[None, None, :] <= positions[:, :, None])[:, None]  # (num_seqs, 1, max_q, kv_len)
    if softcap is None:
        out = F.scaled_dot_product_attention(
            queries, keys, values, attn_mask=mask, scale=scale, enable_gqa=kv_heads != num_heads
        )  # (num_seqs, num_heads, q_len, head_dim)
    else:
        out = _softcapped_attention(queries, keys, values, mask, scale, softcap)
    out = out.transpose(1, 2)
    if ctx.max_query_len == 1:
        return out.reshape(num_tokens, num_heads, head_dim)
    return out[ctx.query_seq_index, index_in_seq]


def _softcapped_attention(queries, keys, values, mask, scale: float, softcap: float) -> torch.Tensor:
    """softmax(softcap * tanh(q k^T * scale / softcap), masked) v in fp32, in the queries' dtype.

    queries: (B, H, Q, D); keys, values: (B, kv_heads, L, D); mask: bool, broadcastable to (B, H, Q, L)
    """
    group = queries.shape[1] // keys.shape[1]
    keys = keys.repeat_interleave(group, dim=1).float()
    values = values.repeat_interleave(group, dim=1).float()
    scores = torch.matmul(queries.float(), keys.transpose(-1, -2)) * scale
    scores = softcap * torch.tanh(scores / softcap)
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1), values).to(queries.dtype)


def _attention_with_lse(
    queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float, mask: torch.Tensor | None,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(q k^T * scale) v and its log-sum-exp, in fp32; rows with no visible key give (0, -inf).

    queries: (batch, rows, D); keys, values: (batch, L, D); mask: broadcastable to (batch, rows, L)
    softcap: scores become ``softcap * tanh(scores / softcap)``; None: off
    """
    scores = torch.bmm(queries.float(), keys.float().transpose(1, 2)) * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    row_max = scores.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isinf(row_max), torch.zeros_like(row_max), row_max)
    probs = torch.exp(scores - row_max)
    total = probs.sum(dim=-1, keepdim=True)
    out = torch.bmm(probs, values.float()) / total.clamp_min(torch.finfo(torch.float32).tiny)
    lse = (row_max + total.log()).squeeze(-1)
    return out, lse


def _cascade_decode_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    ctx: PagedAttentionContext,
    scale: float,
    used_blocks: int,
    softcap: float | None = None,
) -> torch.Tensor:
    """Decode over a shared prefix: the prefix blocks are read once for all sequences.

    query: (num_seqs, num_heads, head_dim), one token per sequence. The shared blocks'
    keys are visible to every query, so all queries (grouped by KV head) attend to them in
    one matrix product; each sequence's own remaining blocks are gathered and masked as
    usual; the two partial softmaxes are merged by their log-sum-exps.
    """
    num_seqs, num_heads, head_dim = query.shape
    block_size, kv_heads = key_cache.shape[1], key_cache.shape[2]
    group = num_heads // kv_heads
    shared = min(ctx.shared_prefix_blocks, used_blocks)
    shared_len = shared * block_size

    # prefix: (kv_heads, num_seqs * group, D) queries against (kv_heads, shared_len, D) keys
    grouped = query.view(num_seqs, kv_heads, group, head_dim).transpose(0, 1).reshape(kv_heads, -1, head_dim)
    prefix_ids = ctx.block_tables[0, :shared]
    prefix_keys = key_cache.index_select(0, prefix_ids).view(shared_len, kv_heads, head_dim).transpose(0, 1)
    prefix_values = value_cache.index_select(0, prefix_ids).view(shared_len, kv_heads, head_dim).transpose(0, 1)
    prefix_out, prefix_lse = _attention_with_lse(grouped, prefix_keys, prefix_values, scale, None, softcap)
    prefix_out = prefix_out.view(kv_heads, num_seqs, group, head_dim).transpose(0, 1)  # (N, kvh, g, D)
    prefix_lse = prefix_lse.view(kv_heads, num_seqs, group).transpose(0, 1)  # (N, kvh, g)
    if shared == used_blocks:
        return prefix_out.reshape(num_seqs, num_heads, head_dim).to(query.dtype)

    # own blocks: (num_seqs * kv_heads, group, D) queries against their gathered suffixes
    own = used_blocks - shared
    own_ids = ctx.block_tables[:, shared:used_blocks].reshape(-1)
    own_len = own * block_size
    own_keys = key_cache.index_select(0, own_ids).view(num_seqs, own_len, kv_heads, head_dim)
    own_values = value_cache.index_select(0, own_ids).view(num_seqs, own_len, kv_heads, head_dim)
    own_keys = own_keys.transpose(1, 2).reshape(num_seqs * kv_heads, own_len, head_dim)
    own_values = own_values.transpose(1, 2).reshape(num_seqs * kv_heads, own_len, head_dim)
    key_positions = shared_len + torch.arange(own_len, device=query.device)
    visible = key_positions[None, :] <= ctx.query_positions[:, None]  # (N, own_len)
    visible = visible.repeat_interleave(kv_heads, dim=0)[:, None, :]
    own_out, own_lse = _attention_with_lse(
        query.view(num_seqs * kv_heads, group, head_dim), own_keys, own_values, scale, visible, softcap
    )
    own_out = own_out.view(num_seqs, kv_heads, group, head_dim)
    own_lse = own_lse.view(num_seqs, kv_heads, group)

    lse = torch.logaddexp(prefix_lse, own_lse)
    out = prefix_out * torch.exp(prefix_lse - lse)[..., None] + own_out * torch.exp(own_lse - lse)[..., None]
    return out.reshape(num_seqs, num_heads, head_dim).to(query.dtype)


def _triton_paged_attention(query, key_cache, value_cache, ctx: PagedAttentionContext, scale: float,
                            softcap: float | None = None) -> torch.Tensor:
    from powerfast.kernels.paged_attention import paged_attention

    return paged_attention(
        query,
        key_cache,
        value_cache,
        ctx.block_tables,
        ctx.query_seq_index,
        ctx.query_positions,
        scale,
        max_seq_len=ctx.max_seq_len,
        softcap=softcap,
    )


def _flash_paged_attention(query, key_cache, value_cache, ctx: PagedAttentionContext, scale: float,
                           softcap: float | None = None) -> torch.Tensor:
    from flash_attn import flash_attn_varlen_func, flash_attn_with_kvcache

    softcap = 0.0 if softcap is None else softcap  # flash-attn's "off"
    if ctx.max_query_len == 1:
        out = flash_attn_with_kvcache(
            query.unsqueeze(1),
            key_cache,
            value_cache,
            cache_seqlens=ctx.seq_lens,
            block_table=ctx.block_tables,
            softmax_scale=scale,
            causal=True,
            softcap=softcap,
        )
        return out.squeeze(1)
    return flash_attn_varlen_func(
        query,
        key_cache,
        value_cache,
        cu_seqlens_q=ctx.query_start_loc,
        cu_seqlens_k=ctx.cu_seqlens_k,
        max_seqlen_q=ctx.max_query_len,
        max_seqlen_k=ctx.max_seq_len,
        softmax_scale=scale,
        causal=True,
        softcap=softcap,
        block_table=ctx.block_tables,
    )


_BACKEND_FUNCTIONS = {"torch": torch_paged_attention, "triton": _triton_paged_attention, "flash": _flash_paged_attention}


# ---------------------------------------------------------------------------- the registered function


def paged_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention over the paged cache, called by transformers' attention layers.

    query: (B, num_heads, S, head_dim); key, value: (B, kv_heads, S, head_dim), after RoPE,
    with B * S new tokens in the context's order. Returns (out (B, S, num_heads, head_dim), None).
    ``attention_mask`` is ignored: causality comes from the context's positions.
    """
    ctx = kwargs.get(CONTEXT_KWARG)
    if not isinstance(ctx, PagedAttentionContext):
        raise RuntimeError(
            f"attention implementation {ATTENTION_NAME!r} needs a {CONTEXT_KWARG}=PagedAttentionContext keyword "
            f"argument: drive the model through powerfast.runner.ModelRunner; calling the whole model without it "
            f"uses the model's own attention, for a submodule call runner.restore_attention() first"
        )
    if dropout:
        raise ValueError(f"paged attention is for inference: dropout must be 0, got {dropout} (call model.eval())")
    sliding_window = kwargs.get("sliding_window")
    if sliding_window is not None and ctx.max_seq_len > sliding_window:
        raise NotImplementedError(
            f"layer {module.layer_idx} uses a sliding window of {sliding_window} tokens and a sequence has "
            f"{ctx.max_seq_len}: sliding-window attention is not supported by the paged runtime"
        )
    if getattr(module, "sinks", None) is not None:
        raise NotImplementedError("attention sinks are not supported by the paged runtime")
    softcap = kwargs.get("softcap")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"layer {module.layer_idx}: attention logit softcap must be > 0 or None, got {softcap!r}")
    if getattr(module, "is_causal", True) is False:
        raise NotImplementedError(f"{type(module).__name__} is not causal: the paged runtime needs causal attention")

    batch, num_heads, q_len, head_dim = query.shape
    kv_heads = key.shape[1]
    num_tokens = batch * q_len
    if num_tokens != ctx.num_tokens:
        raise ValueError(f"the forward has {num_tokens} new tokens but the paged context {ctx.num_tokens}")
    if scaling is None:
        scaling = head_dim**-0.5
    layer = module.layer_idx
    key_cache, value_cache = ctx.key_caches[layer], ctx.value_caches[layer]

    # (B, h, S, D) -> (B * S, h, D): token order is batch-major, matching the context
    queries = query.transpose(1, 2).reshape(num_tokens, num_heads, head_dim)
    keys = key.transpose(1, 2).reshape(num_tokens, kv_heads, head_dim)
    values = value.transpose(1, 2).reshape(num_tokens, kv_heads, head_dim)
    # two custom operators (powerfast.library): torch.compile and graph capture see each
    # as one opaque op. On the CPU the torch backend writes with plain torch (the Triton
    # kernel would run under TRITON_INTERPRET=1 in every layer of every forward).
    library.write_kv(key_cache, value_cache, keys, values, ctx.slot_mapping, ctx.backend != "torch")
    if queries.dtype != key_cache.dtype:
        queries = queries.to(key_cache.dtype)
    out = library.paged_attention(
        queries, key_cache, value_cache, ctx.block_tables, ctx.seq_lens, ctx.cu_seqlens_k, ctx.query_start_loc,
        ctx.query_seq_index, ctx.query_positions, float(scaling), ctx.max_query_len, ctx.max_seq_len,
        ctx.shared_prefix_blocks, ctx.backend, 0.0 if softcap is None else float(softcap),
    )
    return out.to(query.dtype).reshape(batch, q_len, num_heads, head_dim), None


def no_mask(*args, **kwargs) -> None:
    """The mask function of :data:`ATTENTION_NAME`: no mask (causality comes from the paged context)."""
    return None


@functools.lru_cache(maxsize=None)
def _transformers_skips_unknown_masks() -> bool:
    """Whether transformers builds no mask for an attention name without a mask function.

    5.17 through 5.24 do (``_preprocess_mask_arguments`` returns None early for a name
    missing from ``AttentionMaskInterface``); registering :func:`no_mask` there would only
    make them run their packed-sequence detection first, a data-dependent check (a host
    sync per forward on CUDA) before calling it.
    """
    import inspect

    from transformers import masking_utils

    preprocess = getattr(masking_utils, "_preprocess_mask_arguments", None)
    try:
        source = inspect.getsource(preprocess) if preprocess is not None else ""
    except (OSError, TypeError):
        return False
    return "ALL_MASK_ATTENTION_FUNCTIONS._global_mapping" in source


def register() -> str:
    """Register :func:`paged_attention_forward` with transformers' ``AttentionInterface``
    (idempotent) and the custom operators of :mod:`powerfast.library`. Returns the name.

    The model must build no attention mask under this implementation (no mask tensors,
    no data-dependent checks): :func:`no_mask` is registered with transformers'
    ``AttentionMaskInterface`` for the name unless this transformers already skips mask
    creation for names it has no mask function for (see
    :func:`_transformers_skips_unknown_masks`).
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    if AttentionInterface._global_mapping.get(ATTENTION_NAME) is not paged_attention_forward:
        AttentionInterface.register(ATTENTION_NAME, paged_attention_forward)
    if ATTENTION_NAME not in AttentionMaskInterface._global_mapping and not _transformers_skips_unknown_masks():
        AttentionMaskInterface.register(ATTENTION_NAME, no_mask)
    return ATTENTION_NAME


# ---------------------------------------------------------------------------- sharing the model

_ORIGINAL_ATTENTION = "_powerfast_original_attention"  # model attribute: its own implementation
_FALLBACK_HOOK = "_powerfast_dense_fallback_hook"  # model attribute: the pre-hook's handle


def install_dense_fallback(model) -> None:
    """Let ``model`` be called without the paged context while a runner owns it.

    Remembers the model's current attention implementation on the model (once) and adds a
    forward pre-hook (once): a call without :data:`CONTEXT_KWARG` while the model is set to
    :data:`ATTENTION_NAME` switches it back to that implementation before the forward runs,
    so the model builds its own masks and attends as before (``model(...)``,
    ``model.generate(...)``). The runner switches to the paged attention again on its next
    forward.
    """
    if getattr(model, _ORIGINAL_ATTENTION, None) is None:
        current = model.config._attn_implementation
        setattr(model, _ORIGINAL_ATTENTION, current if current != ATTENTION_NAME else None)
    if getattr(model, _FALLBACK_HOOK, None) is None:
        setattr(model, _FALLBACK_HOOK, model.register_forward_pre_hook(_dense_call_hook, with_kwargs=True))


def restore_original(model) -> None:
    """Set ``model`` back to the attention implementation remembered by :func:`install_dense_fallback`."""
    original = getattr(model, _ORIGINAL_ATTENTION, None)
    if original is not None and model.config._attn_implementation != original:
        model.set_attn_implementation(original)


def _dense_call_hook(model, args, kwargs):
    if CONTEXT_KWARG not in kwargs and model.config._attn_implementation == ATTENTION_NAME:
        restore_original(model)
    return None
