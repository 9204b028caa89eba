"""The sampling op: sample (or score) one token per row of logits, with its log-probs.

One contract, two implementations:

- the Triton kernel of ``powerfast.kernels.sampling`` (one fused pass over the vocabulary),
  used for CUDA tensors, and for CPU tensors when ``TRITON_INTERPRET=1`` is set (that is how
  CI runs the kernels: under the interpreter, on CPU);
- the torch reference (``_torch_*`` below), used for CPU tensors otherwise.

The dispatch is decided per call by :func:`powerfast.ops.device.use_triton`. No function
here synchronises with the device (values inside tensors, e.g. NaNs or out-of-range token
ids, are not inspected).

Sampling is counter-based: the noise of row ``i`` is a pure function of ``seed``,
``offsets[i]`` and the vocabulary index, so a call is reproducible for a given seed and
offsets. The caller must change ``seed`` or ``offsets`` between decoding steps to get
fresh draws. The Triton kernel and the torch reference use different generators (Philox
in the kernel, ``torch.Generator`` in the reference): the same seed gives the same tokens
on the same path, not across paths.

The decode loops call the op as the ``torch.library`` operator
``powerfast::sample_tokens(logits, offsets, active!, logliks!, temperature, eos_token_id)
-> (tokens, base_logprobs, tempered_logprobs, log_power_sums)`` (:func:`sample_tokens_op`):
the RNG counter is a device tensor (``offsets``) and the kernel key is fixed, so no Python
value changes between steps, and ``torch.compile`` / CUDA-graph capture see one opaque
operator with a fake implementation; temperature 0 is greedy. See
:func:`powerfast.samplers.decoding.sample_step` for how offsets are derived from a device
seed and a device step counter.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch

from powerfast.ops.device import INT_DTYPES, check_logits, check_row_vector, use_triton

__all__ = [
    "SampleOutput",
    "check_temperature",
    "greedy_tokens",
    "sample_rows",
    "sample_tokens",
    "sample_tokens_op",
    "score_tokens",
    "token_logprobs",
]


class SampleOutput(NamedTuple):
    """What :func:`sample_tokens` / :func:`score_tokens` return, for ``N`` rows."""

    tokens: torch.Tensor
    """(N,) int64 the sampled (or given) tokens; inactive rows: eos_token_id, else 0."""
    base_logprobs: torch.Tensor
    """(N,) float32 log-prob of the token under softmax(logits) (temperature 1); 0 for inactive rows."""
    tempered_logprobs: Optional[torch.Tensor]
    """(N,) float32 log-prob under softmax(logits / T); None when T == 1; 0 for inactive rows."""
    log_power_sums: Optional[torch.Tensor] = None
    """(N,) float32 ``log sum_x p(x)^(1/T)`` with p = softmax(logits): the normaliser of the
    tempered distribution relative to the base one (so ``tempered_logprob = base_logprob / T
    - log_power_sum``); the per-step weight of Power-SMC and of tempered rollouts (powerfast/DESIGN.md
    section 6). None when T == 1 (where it is 0); 0 for inactive rows."""


# ------------------------------------------------------------------------------ checks


def check_temperature(temperature: float) -> float:
    """A sampling temperature as a float: positive and finite (greedy decoding is
    :func:`greedy_tokens`, not temperature 0); ValueError naming the value otherwise."""
    try:
        value = float(temperature)
    except (TypeError, ValueError):
        raise ValueError(f"temperature must be a positive finite number, got {temperature!r}") from None
    if not math.isfinite(value) or value <= 0.0:
        raise ValueError(
            f"temperature must be a positive finite number, got {temperature!r} "
            "(for greedy decoding use greedy_tokens)"
        )
    return value


def _check_sampling_args(logits, offsets, active, logliks, eos_token_id, tokens=None) -> None:
    num_rows = logits.shape[0]
    check_row_vector("offsets", offsets, num_rows, INT_DTYPES, logits.device)
    check_row_vector("active", active, num_rows, (torch.bool,), logits.device)
    check_row_vector("logliks", logliks, num_rows, (torch.float32,), logits.device)
    check_row_vector("tokens", tokens, num_rows, INT_DTYPES, logits.device)
    if logliks is not None and not logliks.is_contiguous():
        raise ValueError(f"logliks must be contiguous (updated in place), got strides {logliks.stride()}")
    if active is not None and not active.is_contiguous():
        raise ValueError(f"active must be contiguous (updated in place), got strides {active.stride()}")
    if eos_token_id is not None:
        if isinstance(eos_token_id, bool) or not isinstance(eos_token_id, int):
            raise ValueError(f"eos_token_id must be an int or None, got {eos_token_id!r}")
        if not 0 <= eos_token_id < logits.shape[1]:
            raise ValueError(f"eos_token_id must be in [0, {logits.shape[1]}), got {eos_token_id}")


def _check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    if not 0 <= seed < 2**63:
        raise ValueError(f"seed must be in [0, 2**63), got {seed}")
    return seed


# ------------------------------------------------------------------- torch references


def _torch_log_softmax(logits: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits.float(), dim=-1)


def _torch_log_power_sums(logits: torch.Tensor, temperature: float) -> Optional[torch.Tensor]:
    """(N,) float32 log sum_x softmax(logits)_x^(1/T), None at T == 1.

    Both log-sum-exps of the max-shifted logits: lse(z / T) - lse(z) / T with z = l - max,
    so large logits do not cancel."""
    if temperature == 1.0:
        return None
    shifted = logits.float() - logits.float().amax(dim=-1, keepdim=True)
    return torch.logsumexp(shifted / temperature, dim=-1) - torch.logsumexp(shifted, dim=-1) / temperature


def _torch_finish_rows(
    tokens: torch.Tensor,
    base: torch.Tensor,
    tempered: Optional[torch.Tensor],
    active: Optional[torch.Tensor],
    eos_token_id: Optional[int],
    logliks: Optional[torch.Tensor],
    log_power_sums: Optional[torch.Tensor] = None,
) -> SampleOutput:
    """Inactive rows: token eos (or 0), log-probs 0, logliks untouched; EOS deactivates."""
    if active is not None:
        idle_token = torch.full_like(tokens, eos_token_id if eos_token_id is not None else 0)
        tokens = torch.where(active, tokens, idle_token)
        base = torch.where(active, base, torch.zeros_like(base))
        if tempered is not None:
            tempered = torch.where(active, tempered, torch.zeros_like(tempered))
        if log_power_sums is not None:
            log_power_sums = torch.where(active, log_power_sums, torch.zeros_like(log_power_sums))
    if logliks is not None:
        logliks.add_(base)  # inactive rows add 0
    if active is not None and eos_token_id is not None:
        active.logical_and_(tokens != eos_token_id)
    return SampleOutput(tokens, base, tempered, log_power_sums)


def _torch_sample_tokens(logits, temperature, seed, offsets, active, eos_token_id, logliks) -> SampleOutput:
    num_rows, vocab = logits.shape
    base_logprobs = _torch_log_softmax(logits)
    tempered_logprobs = base_logprobs if temperature == 1.0 else torch.log_softmax(logits.float() / temperature, dim=-1)
    # Inverse CDF with one uniform per row, each row its own reproducible stream.
    row_offsets = offsets.tolist() if offsets is not None else list(range(num_rows))
    uniforms = torch.empty(num_rows, 1, dtype=torch.float64)
    generator = torch.Generator(device="cpu")
    for row, row_offset in enumerate(row_offsets):
        generator.manual_seed((seed * 0x9E3779B97F4A7C15 + int(row_offset)) % (2**63))
        uniforms[row].uniform_(generator=generator)
    cdf = torch.cumsum(torch.exp(tempered_logprobs.double()), dim=-1)
    thresholds = uniforms.to(logits.device) * cdf[:, -1:]
    # the first token whose cumulative mass exceeds the threshold: never a zero-probability one
    tokens = torch.searchsorted(cdf, thresholds, right=True).squeeze(1).clamp_max(vocab - 1)
    base = base_logprobs.gather(1, tokens[:, None]).squeeze(1)
    tempered = None if temperature == 1.0 else tempered_logprobs.gather(1, tokens[:, None]).squeeze(1)
    return _torch_finish_rows(tokens, base, tempered, active, eos_token_id, logliks,
                              _torch_log_power_sums(logits, temperature))


def _torch_sample_rows(logits, offsets, temperatures, eos_ids, active, logliks) -> SampleOutput:
    """Rows grouped by (temperature, EOS id), each group sampled as one call of its own
    would sample it: the same tokens and log-probs, bit for bit."""
    num_rows = logits.shape[0]
    tokens = torch.empty(num_rows, dtype=torch.long)
    base = torch.empty(num_rows, dtype=torch.float32)
    tempered = torch.empty(num_rows, dtype=torch.float32)
    log_power_sums = torch.zeros(num_rows, dtype=torch.float32)
    groups: dict[tuple[float, int], list[int]] = {}
    for row, key in enumerate(zip(temperatures.tolist(), eos_ids.tolist())):
        groups.setdefault(key, []).append(row)
    for (temperature, eos), rows in groups.items():
        whole = len(rows) == num_rows
        index = slice(None) if whole else torch.tensor(rows, dtype=torch.long)
        sub_active = active if whole else active[index]
        sub_logliks = logliks if whole else logliks[index]
        eos = None if eos < 0 else int(eos)
        if temperature == 0:  # greedy: the argmax, scored at temperature 1
            chosen = torch.argmax(logits[index], dim=-1)
            out = _torch_score_tokens(logits[index], chosen, 1.0, sub_active, eos, sub_logliks)
        else:
            out = _torch_sample_tokens(logits[index], temperature, 0, offsets[index], sub_active, eos, sub_logliks)
        tokens[index], base[index] = out.tokens, out.base_logprobs
        tempered[index] = out.base_logprobs if out.tempered_logprobs is None else out.tempered_logprobs
        if out.log_power_sums is not None:
            log_power_sums[index] = out.log_power_sums
        if not whole:
            active[index], logliks[index] = sub_active, sub_logliks
    return SampleOutput(tokens, base, tempered, log_power_sums)


def _torch_score_tokens(logits, tokens, temperature, active, eos_token_id, logliks) -> SampleOutput:
    vocab = logits.shape[1]
    tokens = tokens.long()
    in_range = (tokens >= 0) & (tokens < vocab)
    safe = tokens.clamp(0, vocab - 1)[:, None]
    nan = torch.full(tokens.shape, math.nan, dtype=torch.float32, device=logits.device)
    base = torch.where(in_range, _torch_log_softmax(logits).gather(1, safe).squeeze(1), nan)
    tempered = None
    if temperature != 1.0:
        tempered_all = torch.log_softmax(logits.float() / temperature, dim=-1)
        tempered = torch.where(in_range, tempered_all.gather(1, safe).squeeze(1), nan)
    return _torch_finish_rows(tokens, base, tempered, active, eos_token_id, logliks,
                              _torch_log_power_sums(logits, temperature))


# ----------------------------------------------------------------------------- public API


def sample_tokens(
    logits: torch.Tensor,
    temperature: float = 1.0,
    *,
    seed: int,
    offsets: Optional[torch.Tensor] = None,
    active: Optional[torch.Tensor] = None,
    eos_token_id: Optional[int] = None,
    logliks: Optional[torch.Tensor] = None,
) -> SampleOutput:
    """Sample one token per row from softmax(logits / temperature) and score it.

    logits:       (N, V) float32 / bfloat16 / float16 (float64 accepted); read once
    temperature:  > 0 (ValueError otherwise; greedy decoding is :func:`greedy_tokens`)
    seed:         int in [0, 2**63); with ``offsets`` it fixes the draw
    offsets:      (N,) int64 / int32 per-row counter, None for arange(N); change seed or
                  offsets between steps
    active:       (N,) bool, None for all rows active; updated in place: a row that
                  samples ``eos_token_id`` becomes inactive. Inactive rows are not sampled:
                  their token is ``eos_token_id`` (0 when it is None), their log-probs 0
    eos_token_id: int in [0, V) or None
    logliks:      (N,) float32 running base log-likelihoods; the base log-prob of the
                  sampled token is added in place for active rows

    returns SampleOutput(tokens (N,) int64, base_logprobs (N,) float32 under softmax(logits),
    tempered_logprobs (N,) float32 under softmax(logits / T), or None when T == 1,
    log_power_sums (N,) float32 log sum_x softmax(logits)_x^(1/T), or None when T == 1).
    """
    check_logits(logits)
    temperature = check_temperature(temperature)
    seed = _check_seed(seed)
    _check_sampling_args(logits, offsets, active, logliks, eos_token_id)
    if use_triton(logits):
        from powerfast.kernels.sampling import sample_logprob

        return SampleOutput(
            *sample_logprob(
                logits, temperature, seed=seed, offsets=offsets, active=active,
                eos_token_id=eos_token_id, logliks=logliks,
            )
        )
    return _torch_sample_tokens(logits, temperature, seed, offsets, active, eos_token_id, logliks)


def sample_rows(
    logits: torch.Tensor,
    *,
    offsets: torch.Tensor,
    temperatures: torch.Tensor,
    eos_token_ids: torch.Tensor,
    active: torch.Tensor,
    logliks: torch.Tensor,
) -> SampleOutput:
    """:func:`sample_tokens` with a temperature and an EOS id per row, in one call: what
    the serving engine launches once per step for the rows of all its requests.

    logits:        (N, V) as in :func:`sample_tokens`
    offsets:       (N,) int64 per-row counter; the seed is 0 (the offsets carry it)
    temperatures:  (N,) float64; 0 picks the argmax (the first on ties), scored at temperature 1
    eos_token_ids: (N,) int64 in [-1, V), -1 for no EOS
    active, logliks: (N,) bool / float32, updated in place as by :func:`sample_tokens`

    Each row gets exactly the token and log-probs that :func:`sample_tokens` (or, at
    temperature 0, :func:`greedy_tokens` then :func:`score_tokens`) gives it with the
    same offset, temperature and EOS id. Returns SampleOutput with every field a (N,)
    tensor: at temperature 0 or 1 the tempered log-probs equal the base ones and the log
    power sums are 0. Values inside the tensors are not checked (no host sync).
    """
    check_logits(logits)
    num_rows = logits.shape[0]
    _check_sampling_args(logits, offsets, active, logliks, None)
    for name, tensor, dtypes in (("offsets", offsets, INT_DTYPES), ("temperatures", temperatures, (torch.float64,)),
                                 ("eos_token_ids", eos_token_ids, (torch.int64,)), ("active", active, (torch.bool,)),
                                 ("logliks", logliks, (torch.float32,))):
        if tensor is None:
            raise ValueError(f"{name} must be a ({num_rows},) tensor, got None")
        check_row_vector(name, tensor, num_rows, dtypes, logits.device)
    if use_triton(logits):
        from powerfast.kernels.sampling import sample_logprob_rows

        return SampleOutput(*sample_logprob_rows(logits, offsets=offsets, temperatures=temperatures,
                                                 eos_ids=eos_token_ids, active=active, logliks=logliks))
    return _torch_sample_rows(logits, offsets, temperatures, eos_token_ids, active, logliks)


def score_tokens(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    temperature: float = 1.0,
    *,
    active: Optional[torch.Tensor] = None,
    eos_token_id: Optional[int] = None,
    logliks: Optional[torch.Tensor] = None,
) -> SampleOutput:
    """Teacher forcing: :func:`sample_tokens` with the tokens given instead of sampled.

    logits: (N, V); tokens: (N,) int64 / int32 in [0, V) (a token out of range gives NaN
    log-probs; not checked, that would need a host sync). ``active``, ``eos_token_id`` and
    ``logliks`` behave as in :func:`sample_tokens`.
    returns SampleOutput(tokens (N,) int64, base_logprobs (N,), tempered_logprobs (N,) or None,
    log_power_sums (N,) or None).
    """
    check_logits(logits)
    temperature = check_temperature(temperature)
    _check_sampling_args(logits, None, active, logliks, eos_token_id, tokens=tokens)
    if tokens is None:
        raise ValueError("tokens must be a (N,) integer tensor, got None")
    if use_triton(logits):
        from powerfast.kernels.sampling import score_logprob

        return SampleOutput(
            *score_logprob(
                logits, tokens, temperature, active=active, eos_token_id=eos_token_id, logliks=logliks
            )
        )
    return _torch_score_tokens(logits, tokens, temperature, active, eos_token_id, logliks)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Base log-prob of given tokens.

    logits: (N, V) float32 / bfloat16 / float16; tokens: (N,) int64 / int32 in [0, V)
    returns (N,) float32 log softmax(logits)[i, tokens[i]] (NaN for a token out of range).
    """
    return score_tokens(logits, tokens).base_logprobs


def greedy_tokens(logits: torch.Tensor) -> torch.Tensor:
    """Greedy decoding (temperature 0): logits (N, V) -> (N,) int64 argmax (first on ties)."""
    check_logits(logits)
    return torch.argmax(logits, dim=-1)


# ------------------------------------------------------------------- the custom operator


def _sample_tokens(
    logits: torch.Tensor,
    offsets: torch.Tensor,
    active: torch.Tensor,
    logliks: torch.Tensor,
    temperature: float,
    eos_token_id: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sample (or, at temperature 0, pick the argmax of) one token per row and score it.

    logits: (N, V); offsets: (N,) int64 per-row RNG counters (the kernel key is fixed at 0);
    active: (N,) bool and logliks: (N,) float32, updated in place as by
    :func:`sample_tokens`; eos_token_id: -1 for none.
    Returns (tokens (N,) int64, base_logprobs (N,) float32, tempered_logprobs (N,) float32,
    equal to base_logprobs at temperature 0 or 1, log_power_sums (N,) float32
    ``log sum_x p(x)^(1/T)``, 0 at temperature 0 or 1 and for inactive rows).
    """
    eos = None if eos_token_id < 0 else eos_token_id
    if temperature == 0:
        chosen = greedy_tokens(logits)
        if eos is not None:
            chosen = torch.where(active, chosen, torch.full_like(chosen, eos))
        out = score_tokens(logits, chosen, active=active, eos_token_id=eos, logliks=logliks)
    else:
        out = sample_tokens(logits, temperature, seed=0, offsets=offsets, active=active, eos_token_id=eos,
                            logliks=logliks)
    tempered = out.base_logprobs.clone() if out.tempered_logprobs is None else out.tempered_logprobs
    log_power_sums = getattr(out, "log_power_sums", None)
    if log_power_sums is None:
        log_power_sums = torch.zeros_like(out.base_logprobs)
    return out.tokens.clone(), out.base_logprobs, tempered, log_power_sums


_sample_tokens_op = torch.library.custom_op("powerfast::sample_tokens", mutates_args=("active", "logliks"))(
    _sample_tokens
)


@_sample_tokens_op.register_fake
def _(logits, offsets, active, logliks, temperature, eos_token_id):
    rows = logits.shape[0]
    return (
        logits.new_empty(rows, dtype=torch.int64),
        logits.new_empty(rows, dtype=torch.float32),
        logits.new_empty(rows, dtype=torch.float32),
        logits.new_empty(rows, dtype=torch.float32),
    )


def sample_tokens_op(*args) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``torch.ops.powerfast.sample_tokens`` (see :func:`_sample_tokens` for the arguments):
    the operator while ``torch.compile`` traces, its implementation directly otherwise (the
    same result, without the dispatcher's per-call cost in an eager decode loop)."""
    if torch.compiler.is_compiling():
        return torch.ops.powerfast.sample_tokens(*args)
    return _sample_tokens(*args)
