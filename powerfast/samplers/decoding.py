"""The one decode loop: seeds, the sampling step and the batched loop of continuations.

Every sampler decodes through :func:`continuations_program` (or, one token at a time,
:func:`sample_step`): the product's sampling op, its device-side seeds and stop rules.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from contextlib import contextmanager
from typing import NamedTuple

import torch

from powerfast.decisions.seeds import SeedStream
from powerfast.ops.sampling import SampleOutput, check_temperature, sample_tokens_op
from powerfast.runtime.protocol import eos_token_ids
from powerfast.samplers.program import Decode, Loop, drive
from powerfast.samplers.sampling import SEED_MIX, Sample


def check_no_nan(values: torch.Tensor, where: str) -> None:
    """Raise FloatingPointError if the model's logits (or log-likelihoods summed from them)
    hold a NaN. One host sync: call it once per phase, not per token."""
    if bool(torch.isnan(values).any()):
        raise FloatingPointError(f"the model returned NaN logits during {where}")



def to_host(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Host copies of device tensors (any dtypes and shapes) in ONE device-to-host copy:
    their bytes side by side in one buffer, copied once, cut and viewed back (on the CPU
    the same steps, without a transfer). Use it where a phase needs several results on the
    host: one sync instead of one per tensor."""
    if not tensors:
        return ()
    flat = [t.detach().contiguous().reshape(-1).view(torch.uint8) for t in tensors]
    host = torch.cat(flat).cpu()
    out, start = [], 0
    for tensor, part in zip(tensors, flat):
        size = part.numel()
        out.append(host[start : start + size].clone().view(tensor.dtype).reshape(tensor.shape))
        start += size
    return tuple(out)


def nan_flag(values: torch.Tensor) -> torch.Tensor:
    """() bool device tensor: whether ``values`` hold a NaN (read it with the phase's other
    results through :func:`to_host`, then :func:`raise_on_nan`)."""
    return torch.isnan(values).any()


def raise_on_nan(flag: torch.Tensor, where: str) -> None:
    """:func:`check_no_nan` for a flag already on the host."""
    if bool(flag):
        raise FloatingPointError(f"the model returned NaN logits during {where}")


# ---------------------------------------------------------------------------- seeds


# ------------------------------------------------------------------------ profiling


def _nvtx():
    """``torch.cuda.nvtx`` on CUDA, None elsewhere (a test may stand in for it)."""
    return torch.cuda.nvtx if torch.cuda.is_available() else None


@contextmanager
def phase(name: str):
    """An NVTX range named after a sampler phase on CUDA; nothing elsewhere.

    The range is a start/end range closed by its own handle, not a push/pop on the thread's
    stack: a phase of a step program stays open across its yields while the engine runs other
    requests' programs, whose phases open and close in between, so each range must end only
    itself."""
    nvtx = _nvtx()
    if nvtx is None:
        yield
        return
    handle = nvtx.range_start(name)
    try:
        yield
    finally:
        nvtx.range_end(handle)


# ---------------------------------------------------------------------- decode loop


class Continuations(NamedTuple):
    """What :func:`sample_continuations` returns for N sequences and S steps.

    tokens:           (N, S) int64 sampled tokens (after a row's EOS: the EOS id again)
    lengths:          (N,) int64 tokens generated per row, an ending EOS included
    base_logliks:     (N,) float32 sum of base log-probs of those tokens
    tempered_logliks: (N,) float32 the same under the tempered distribution, or None at T = 0 or 1
    last_logits:      (N, V) logits after the last token, or None if not asked for
    token_logprobs:   (N, S) float32 base log-prob of each token (0 after the end), or None
    token_tempered:   (N, S) float32 tempered log-prob of each token, or None
    log_power_sums:   (N,) float32 sum over the row's steps of log sum_x p(x | h_t)^(1/T)
                      (the tempered rollout weight of powerfast/DESIGN.md section 6), or None unless
                      asked for; 0 at T = 1
    active:           (N,) bool rows that have not ended (no EOS sampled)
    """

    tokens: torch.Tensor
    lengths: torch.Tensor
    base_logliks: torch.Tensor
    tempered_logliks: torch.Tensor | None
    last_logits: torch.Tensor | None
    token_logprobs: torch.Tensor | None = None
    token_tempered: torch.Tensor | None = None
    log_power_sums: torch.Tensor | None = None
    active: torch.Tensor | None = None


def sample_step(
    logits: torch.Tensor,
    seed: torch.Tensor,
    counter: torch.Tensor,
    active: torch.Tensor,
    logliks: torch.Tensor,
    temperature: float,
    eos_token_id: int | None,
) -> SampleOutput:
    """One step's sampling as a function of device tensors: sample (temperature 0:
    argmax), score, accumulate, in one fused operator; no Python value read from the device.

    logits:  (N, V) the next-token logits of N rows
    seed:    () int64 device tensor, fixed for a decode loop
    counter: () int64 device tensor, the step counter; incremented in place
    active:  (N,) bool, updated in place (a row that samples EOS becomes inactive)
    logliks: (N,) float32 running base log-likelihoods, updated in place for active rows

    Row i of a step draws from the kernel's counter-based generator at offset
    ``seed * 0x9E3779B97F4A7C15 + counter * N + i`` (int64, wrapping): distinct for every
    row and step of a loop, and a pure function of tensors, so the step compiles with
    ``torch.compile(fullgraph=True)`` and can be captured as a CUDA graph.
    Returns SampleOutput(tokens (N,) int64, base_logprobs (N,), tempered_logprobs (N,),
    log_power_sums (N,); the tempered log-probs equal the base ones and the log power sums
    are 0 at temperature 0 or 1).
    """
    rows = logits.shape[0]
    offsets = seed * SEED_MIX + counter * rows + torch.arange(rows, device=logits.device)
    eos = -1 if eos_token_id is None else int(eos_token_id)
    tokens, base, tempered, log_power_sums = sample_tokens_op(
        logits, offsets, active, logliks, float(temperature), eos
    )
    counter.add_(1)
    return SampleOutput(tokens, base, tempered, log_power_sums)


def continuations_program(
    seqs: list,
    first_logits: torch.Tensor,
    num_steps: int,
    seeds: SeedStream,
    *,
    temperature: float | Sequence[float] = 1.0,
    eos_token_id: int | Sequence[int] | None = None,
    want_last_logits: bool = False,
    per_token: bool = False,
    stop_check_every: int = 32,
    want_log_power_sums: bool = False,
    stream: bool = False,
    logliks: torch.Tensor | None = None,
    log_weights: torch.Tensor | None = None,
    active: torch.Tensor | None = None,
    stop_entropy: float = 0.0,
    stop_after: int = 1,
):
    """Sample ``num_steps`` tokens for every sequence in one batched decode loop, as a
    step program (it yields its samples and decodes, see :mod:`powerfast.samplers.program`;
    with ``stream`` its Samples are marked so that a streaming driver reports each step's tokens); :func:`sample_continuations` runs it on a runner.

    first_logits: (N, V) logits of the next token of each sequence. Every step yields a
    :class:`powerfast.samplers.sampling.Sample` of all rows (answered by ``drive`` with one
    call of the sampling operator, by the engine in one launch with the rows of every
    other request; a row that sampled EOS keeps being fed EOS, its statistics frozen),
    then decodes the batch (a Decode yield) so the sequences hold the new tokens' KV. The
    loop's seed (one drawn from ``seeds`` per call) and step counter fix each row's
    counter-based offset; nothing is read from the device per token: whether every row
    has finished is looked at every ``stop_check_every`` steps. Temperature 0 is greedy
    decoding. ``want_log_power_sums`` accumulates each active row's
    ``log sum_x p(x)^(1/T)`` from the sampling op.

    eos_token_id: one id or several (a row stops at the first of them it samples); after
    its end a row is fed the first id.
    temperature:  one for every step, or one per step (a schedule of ``num_steps`` values,
                  e.g. Power-SMC's ramp of 1/alpha_t)
    logliks:      (N,) float32 running base log-likelihoods to continue from (default 0);
                  ``base_logliks`` of the result are then these plus the new tokens' (the
                  tensor passed may or may not be updated in place: read the result)
    log_weights:  (N,) float64 importance weights updated in place: every step adds each
                  active row's log sum_x p(x | h_t)^(1/T_t) (the incremental weight of a
                  tempered proposal; Power-SMC's particle weights)
    active:       (N,) bool rows still decoding (default all): a row that ended in an earlier
                  loop (its EOS) stays ended, fed EOS, its statistics frozen
    stop_entropy: > 0: a row stops (without a token) before any step after the first whose
                  next-token law has a base entropy above this many nats; its
                  ``last_logits`` are that law's logits (the sequence itself goes on being
                  fed tokens like an ended row: cut it to its length). 0: never
    stop_after:   the first step at which ``stop_entropy`` may stop a row (>= 1: a row keeps
                  at least this many tokens, unless it ends earlier)

    A streaming loop of one row that keeps nothing but its tokens and log-likelihoods (no
    per-token values, power sums, weights, given state, entropy stop or last logits: a plain,
    low-temperature or greedy request) yields one :class:`~powerfast.samplers.program.Loop`
    instead of its steps, after drawing its seed: the engine batches such loops itself;
    ``drive`` runs the same steps as below.
    """
    eos_ids = eos_token_ids(eos_token_id)
    eos_token_id = eos_ids[0] if eos_ids else None  # the sampling ops handle the first id
    num_rows = first_logits.shape[0]
    device = first_logits.device
    num_steps = max(num_steps, 0)
    schedule = [temperature] * num_steps if isinstance(temperature, (int, float)) else list(temperature)
    if len(schedule) != num_steps:
        raise ValueError(f"a temperature schedule needs one value per step ({num_steps}), got {len(schedule)}")
    base = torch.zeros(num_rows, dtype=torch.float32, device=device) if logliks is None else logliks
    tempered = (torch.zeros(num_rows, dtype=torch.float32, device=device)
                if any(t not in (0, 1.0) for t in schedule) else None)
    given_active = active
    active = torch.ones(num_rows, dtype=torch.bool, device=device) if active is None else active.clone()
    log_power_sums = torch.zeros(num_rows, dtype=torch.float32, device=device) if want_log_power_sums else None
    for value in set(schedule):
        if value != 0:
            check_temperature(value)
    seed = seeds.next()
    loop = functools.partial(
        _loop, seqs, first_logits, num_steps, seed, schedule, eos_ids, base, tempered, active, log_power_sums,
        want_last_logits=want_last_logits, per_token=per_token, stop_check_every=stop_check_every, stream=stream,
        log_weights=log_weights, stop_entropy=stop_entropy, stop_after=stop_after)
    if (stream and num_rows == 1 and num_steps > 0 and len(set(schedule)) == 1 and logliks is None
            and log_weights is None and log_power_sums is None and not per_token and not want_last_logits
            and not stop_entropy and stop_check_every == LOOP_EOS_CHECK and given_active is None):
        return (yield Loop(seqs[0], first_logits, num_steps, seed, float(schedule[0]), tuple(eos_ids), loop))
    return (yield from loop())


LOOP_EOS_CHECK = 32
"""Steps between a decode loop's looks at whether every row has ended (the default of
``stop_check_every``; a :class:`~powerfast.samplers.program.Loop` ends on this rule)."""


def _loop(seqs, first_logits, num_steps, seed, schedule, eos_ids, base, tempered, active, log_power_sums, *,
          want_last_logits, per_token, stop_check_every, stream, log_weights, stop_entropy, stop_after):
    """The steps of :func:`continuations_program` after its seed is drawn."""
    num_rows = first_logits.shape[0]
    device = first_logits.device
    eos_token_id = eos_ids[0] if eos_ids else None
    eos = -1 if eos_token_id is None else int(eos_token_id)
    logits = first_logits
    other_eos = torch.tensor(eos_ids[1:], dtype=torch.long, device=device) if len(eos_ids) > 1 else None
    # per step, views of what the sampling answered: stacked once at the end (no copy per token)
    step_tokens, step_live, step_base, step_tempered = [], [], [], []
    cut = cut_logits = None
    for step in range(num_steps):
        if stop_entropy and step >= max(stop_after, 1):
            entropy = torch.special.entr(torch.softmax(logits.float(), -1)).sum(-1)
            now = active & (entropy > stop_entropy)
            active = active & ~now
            cut = now if cut is None else cut | now
            cut_logits = torch.where(now[:, None], logits, logits if cut_logits is None else cut_logits)
        out = yield Sample(logits, seed, step, float(schedule[step]), eos, active, base, stream)
        chosen, was_active, active, base = out.tokens, out.was_active, out.active, out.logliks
        if tempered is not None:
            tempered += out.tempered_logprobs  # 0 for rows that were inactive
        if log_power_sums is not None:
            log_power_sums += out.log_power_sums  # 0 for inactive rows, at T = 0 and at T = 1
        if log_weights is not None:
            log_weights += out.log_power_sums.double()
        if other_eos is not None:  # the op stopped rows on the first id; the others here, on the device
            active = active & ~torch.isin(chosen, other_eos)
        step_tokens.append(chosen)
        step_live.append(was_active)
        if per_token:
            step_base.append(out.base_logprobs)  # 0 for rows that were inactive
            step_tempered.append(out.tempered_logprobs)
        last_step = step == num_steps - 1
        if eos_ids and not last_step and (step + 1) % stop_check_every == 0 and not bool(active.any()):
            break
        if not last_step or want_last_logits:
            logits = yield Decode(seqs, chosen)

    def stacked(columns: list[torch.Tensor], dtype) -> torch.Tensor:
        if not columns:
            return torch.zeros(num_rows, 0, dtype=dtype, device=device)
        return torch.stack(columns, dim=1)

    tokens = stacked(step_tokens, torch.long)
    lengths = stacked(step_live, torch.bool).sum(dim=1)
    token_base = stacked(step_base, torch.float32) if per_token else None
    token_tempered = stacked(step_tempered, torch.float32) if per_token else None
    last_logits = logits if want_last_logits else None
    if want_last_logits and cut is not None:
        last_logits = torch.where(cut[:, None], cut_logits, logits)
    return Continuations(tokens, lengths, base, tempered, last_logits,
                         token_base, token_tempered, log_power_sums, active)


def sample_continuations(
    runner,
    seqs: list,
    first_logits: torch.Tensor,
    num_steps: int,
    seeds: SeedStream,
    **options,
) -> Continuations:
    """Sample ``num_steps`` tokens for every sequence in one batched decode loop on
    ``runner``: :func:`continuations_program` run alone (see there for the options)."""
    return drive(continuations_program(seqs, first_logits, num_steps, seeds, **options), runner)
