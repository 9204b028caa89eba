"""The paged attention function registered with transformers.

:func:`register` adds :func:`paged_attention_forward` to transformers'
``AttentionInterface`` under :data:`ATTENTION_NAME` (once). A model set to that
implementation calls it in every attention layer with the new tokens' q/k/v after RoPE;
the per-forward paged metadata (:class:`PagedAttentionContext`) arrives through the
forward's keyword arguments under :data:`CONTEXT_KWARG`, and ``module.layer_idx`` picks
the layer's pool. The function writes the new keys and values into their slots, attends
causally over each sequence's cached positions and returns ``(out (B, S, H, D), None)``.

The backends (torch, Triton, flash-attn) live in :mod:`powerfast.ops.paged_attention`
and are reached through the custom ops ``powerfast::write_kv`` (:mod:`powerfast.ops.kv_cache`)
and ``powerfast::paged_attention``.

Sharing the model: :func:`install_dense_fallback` remembers the model's own attention
implementation on the model and adds a forward pre-hook, so a call of the model without
the paged context (a plain forward, ``model.generate``) runs with that implementation.
"""

from __future__ import annotations

import functools

import torch

from powerfast.ops.kv_cache import write_kv_op
from powerfast.ops.paged_attention import (
    BACKENDS,
    PagedAttentionContext,
    paged_attention_op,
    resolve_backend,
    torch_paged_attention,
)

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
    ``attention_mask`` is ignored: causality comes from the context's positions, and a
    sliding window (the ``sliding_window`` keyword of a windowed layer, W) from the backends:
    a query at position p sees keys p - W + 1 .. p.
    """
    ctx = kwargs.get(CONTEXT_KWARG)
    if not isinstance(ctx, PagedAttentionContext):
        raise RuntimeError(
            f"attention implementation {ATTENTION_NAME!r} needs a {CONTEXT_KWARG}=PagedAttentionContext keyword "
            f"argument: drive the model through powerfast.runtime.runner.ModelRunner; calling the whole model without it "
            f"uses the model's own attention, for a submodule call runner.restore_attention() first"
        )
    if dropout:
        raise ValueError(f"paged attention is for inference: dropout must be 0, got {dropout} (call model.eval())")
    sliding_window = kwargs.get("sliding_window")  # the layer's constant (None: a full-attention layer)
    if sliding_window is not None and (isinstance(sliding_window, bool) or not isinstance(sliding_window, int)
                                       or sliding_window < 1):
        raise ValueError(f"layer {module.layer_idx}: sliding window must be an int >= 1 or None, got {sliding_window!r}")
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
    # two custom operators (powerfast.ops): torch.compile and graph capture see each
    # as one opaque op. On the CPU the torch backend writes with plain torch (the Triton
    # kernel would run under TRITON_INTERPRET=1 in every layer of every forward).
    write_kv_op(key_cache, value_cache, keys, values, ctx.slot_mapping, ctx.backend != "torch")
    if queries.dtype != key_cache.dtype:
        queries = queries.to(key_cache.dtype)
    out = paged_attention_op(
        queries, key_cache, value_cache, ctx.page_tables, ctx.seq_lens, ctx.cu_seqlens_k, ctx.query_start_loc,
        ctx.query_seq_index, ctx.query_positions, float(scaling), ctx.max_query_len, ctx.max_seq_len,
        ctx.shared_prefix_pages, ctx.backend, 0.0 if softcap is None else float(softcap),
        # 0 while every sequence fits in the window: plain causal attention, the same result
        0 if sliding_window is None or ctx.max_seq_len <= sliding_window else int(sliding_window),
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
    (idempotent); importing this module registers the custom operators it calls. Returns the name.

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
