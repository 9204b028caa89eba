"""The sampling request of a step program and the one launch that serves many of them.

A decode loop does not call the sampling op itself: it yields a :class:`Sample` (its
rows' logits, its seed and step counter, temperature, EOS id, and its running ``active``
and ``logliks`` tensors) and receives a :class:`Sampled`. Whoever runs the program
answers it: :func:`powerfast.samplers.program.drive` (one program, as ``generate``
runs it) with one call of the ``powerfast::sample_tokens`` operator;
:class:`powerfast.serving.engine.Engine` with :func:`sample_all`, which samples the
rows of every request that waits on a ``Sample`` in ONE launch of
:func:`powerfast.ops.sampling.sample_rows` (offsets, temperatures and EOS ids as device
tensors, one upload).

Row ``i`` of a Sample draws at the counter-based offset
``seed * 0x9E3779B97F4A7C15 + counter * N + i`` (int64, wrapping) with the Sample's own
``N``, whoever answers it, so a request gets the same tokens alone and merged with others.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from powerfast.ops.sampling import sample_rows, sample_tokens_op

__all__ = ["SEED_MIX", "Launch", "Rows", "RowsSampled", "Sample", "Sampled", "sample_all", "sample_launch",
           "row_offsets", "same_rows", "wrap64"]

SEED_MIX = -7046029254386353131
"""0x9E3779B97F4A7C15 as a signed int64 (wrapping multiply): spreads seeds over offsets."""


class Sample(NamedTuple):
    """Sample one token per row of ``logits``; the program receives a :class:`Sampled`.

    logits:       (N, V) next-token logits
    seed:         the decode loop's seed (a host int in [0, 2**62))
    counter:      the loop's step index (a host int)
    temperature:  > 0, or 0 for the argmax
    eos_token_id: a row that samples it becomes inactive; -1 for none
    active:       (N,) bool, rows still decoding (inactive rows get ``eos_token_id``, or 0)
    logliks:      (N,) float32 running base log-likelihoods
    stream:       the rows are the program's outputs: a driver that streams reports the
                  sampled tokens of the rows that were active (as a ``Tokens`` yield would)
    """

    logits: torch.Tensor
    seed: int
    counter: int
    temperature: float
    eos_token_id: int
    active: torch.Tensor
    logliks: torch.Tensor
    stream: bool = False


class Sampled(NamedTuple):
    """The reply to a :class:`Sample`: (N,) tensors. ``active`` and ``logliks`` are the
    updated state (the program continues from these; they may or may not be the tensors
    it sent), ``was_active`` the rows that were active before this token."""

    tokens: torch.Tensor
    base_logprobs: torch.Tensor
    tempered_logprobs: torch.Tensor
    log_power_sums: torch.Tensor
    was_active: torch.Tensor
    active: torch.Tensor
    logliks: torch.Tensor


def wrap64(value: int) -> int:
    """``value`` wrapped to a signed int64, as int64 arithmetic on a device wraps."""
    return (value + 2**63) % 2**64 - 2**63


def row_offsets(sample: Sample) -> list[int]:
    """The counter-based offsets of the Sample's rows (host ints)."""
    rows = sample.logits.shape[0]
    first = wrap64(sample.seed * SEED_MIX + sample.counter * rows)
    return [wrap64(first + i) for i in range(rows)]


def _sample_one(sample: Sample) -> Sampled:
    """One Sample: one call of the sampling operator (what a decode loop alone launches)."""
    rows = sample.logits.shape[0]
    device = sample.logits.device
    # arange plus a host scalar: no upload (int64 addition wraps as wrap64 does)
    offsets = torch.arange(rows, dtype=torch.int64, device=device) + wrap64(sample.seed * SEED_MIX + sample.counter * rows)
    was_active = sample.active.clone()
    tokens, base, tempered, log_power_sums = sample_tokens_op(
        sample.logits, offsets, sample.active, sample.logliks, float(sample.temperature), int(sample.eos_token_id))
    return Sampled(tokens, base, tempered, log_power_sums, was_active, sample.active, sample.logliks)


def same_rows(tensors: list[torch.Tensor]) -> torch.Tensor | None:
    """The rows of ``tensors`` as one view when they are consecutive row ranges of one
    tensor (the decode forward's logits, split per request, in order); else None."""
    first = tensors[0]
    base = first._base
    if base is None or first.dim() != 2 or first.stride(1) != 1:
        return None
    row_stride, vocab = first.stride(0), first.shape[1]
    pointer, row_bytes = first.data_ptr(), row_stride * first.element_size()
    for tensor in tensors:
        if (tensor._base is not base or tensor.data_ptr() != pointer or tensor.dim() != 2
                or tensor.stride() != (row_stride, 1) or tensor.shape[1] != vocab):
            return None
        pointer += tensor.shape[0] * row_bytes
    rows = sum(t.shape[0] for t in tensors)
    return first.as_strided((rows, vocab), (row_stride, 1), first.storage_offset())


class Rows(NamedTuple):
    """Rows a driver samples for decode loops it steps itself (the engine's batched loops),
    each with its own state as (n,) device tensors: what n one-row Samples would carry.

    offsets: int64 counter-based offsets (a one-row loop's step t: ``seed * SEED_MIX + t``)
    active, logliks: read, not updated (the launch's :class:`RowsSampled` has the new values)
    """

    logits: torch.Tensor
    offsets: torch.Tensor
    temperatures: torch.Tensor
    eos_token_ids: torch.Tensor
    active: torch.Tensor
    logliks: torch.Tensor


class RowsSampled(NamedTuple):
    """What a launch answered for its :class:`Rows`: (n,) tensors; ``tempered_logprobs`` is
    the base log-prob at temperature 0 or 1."""

    tokens: torch.Tensor
    was_active: torch.Tensor
    active: torch.Tensor
    logliks: torch.Tensor
    tempered_logprobs: torch.Tensor


class Launch(NamedTuple):
    """What one launch answered: ``replies``, one per Sample in order, and the launch's own
    (rows,) ``tokens`` and ``was_active`` over all their rows (the :class:`Rows` first, then
    Sample ``i``'s rows after those of the Samples before it): what a driver reads to the
    host once for everyone; ``rows``: the answer for the Rows, if any."""

    replies: list
    tokens: torch.Tensor
    was_active: torch.Tensor
    rows: RowsSampled | None = None


class _LogProbs:
    """A launch's (rows,) base, tempered and log-power-sum outputs, each split into the
    Samples' rows when a reply first reads it (a loop at temperature 1 reads none)."""

    __slots__ = ("sizes", "fields", "parts")

    def __init__(self, sizes: list[int], *fields: torch.Tensor) -> None:
        self.sizes, self.fields, self.parts = sizes, fields, [None] * len(fields)

    def part(self, field: int, index: int) -> torch.Tensor:
        parts = self.parts[field]
        if parts is None:
            parts = self.parts[field] = torch.split(self.fields[field], self.sizes)
        return parts[index]


class _SplitReply:
    """A :class:`Sampled` of one Sample of a shared launch: the fields every decode loop
    reads at every step (tokens, was_active, active, logliks) are its rows of the launch's
    tensors; the log-probs are read through :class:`_LogProbs`."""

    __slots__ = ("tokens", "was_active", "active", "logliks", "_logprobs", "_index")

    def __init__(self, logprobs: _LogProbs, index: int, tokens, was_active, active, logliks) -> None:
        self.tokens, self.was_active, self.active, self.logliks = tokens, was_active, active, logliks
        self._logprobs, self._index = logprobs, index

    base_logprobs = property(lambda self: self._logprobs.part(0, self._index))
    tempered_logprobs = property(lambda self: self._logprobs.part(1, self._index))
    log_power_sums = property(lambda self: self._logprobs.part(2, self._index))

    def _replace(self, **fields) -> Sampled:
        """A :class:`Sampled` of these fields, ``fields`` replaced (as ``Sampled._replace``)."""
        return Sampled(*(getattr(self, name) for name in Sampled._fields))._replace(**fields)


def sample_all(samples: list[Sample]) -> list[Sampled]:
    """Answer every Sample: one alone with :func:`_sample_one`; several in ONE launch of
    :func:`powerfast.ops.sampling.sample_rows` over all their rows (each row keeps the offset,
    temperature and EOS id its own launch would give it, so the same tokens). The logits
    are used in place when they are consecutive rows of one tensor (the engine's decode
    forward), else concatenated; the per-row offsets, temperatures and EOS ids go to the
    device in one upload. The replies' fields are views of the launch's tensors (the
    log-probs made when first read)."""
    return sample_launch(samples).replies


def _sample_params(samples: list[Sample], sizes: list[int], device) -> tuple[torch.Tensor, ...]:
    """(offsets, temperatures, EOS ids) of every row of ``samples``, on ``device`` in one upload."""
    firsts = torch.tensor([wrap64(s.seed * SEED_MIX + s.counter * n) for s, n in zip(samples, sizes)],
                          dtype=torch.int64)
    temperatures = torch.tensor([float(s.temperature) for s in samples], dtype=torch.float64)
    eos_ids = torch.tensor([int(s.eos_token_id) for s in samples], dtype=torch.int64)
    if any(n != 1 for n in sizes):  # expand to rows: row i of a Sample adds i to its first offset
        counts = torch.tensor(sizes, dtype=torch.int64)
        starts = torch.cumsum(counts, 0) - counts
        local = torch.arange(sum(sizes), dtype=torch.int64) - torch.repeat_interleave(starts, counts)
        firsts = torch.repeat_interleave(firsts, counts) + local  # int64 addition wraps, as wrap64
        temperatures, eos_ids = torch.repeat_interleave(temperatures, counts), torch.repeat_interleave(eos_ids, counts)
    # one upload: offsets, EOS ids and the temperatures' float64 bits as three int64 rows
    host = torch.stack([firsts, eos_ids, temperatures.view(torch.int64)])
    params = host if device.type == "cpu" else host.pin_memory().to(device, non_blocking=True)
    return params[0], params[2].view(torch.float64), params[1]


def sample_launch(samples: list[Sample], rows: Rows | None = None) -> Launch:
    """:func:`sample_all`, with the launch's tokens and live rows as whole tensors besides
    the replies (the engine reads the streamed rows from them, one copy for all), and
    ``rows``, rows with their own per-row state, sampled in the same launch before the
    Samples' rows (each row draws at its own offset: the same tokens as alone)."""
    if rows is None and len(samples) == 1:
        reply = _sample_one(samples[0])
        return Launch([reply], reply.tokens, reply.was_active)
    parts = ([rows] if rows is not None else [])
    sizes = [s.logits.shape[0] for s in samples]
    device = (rows.logits if rows is not None else samples[0].logits).device
    logits = same_rows([part.logits for part in parts] + [s.logits for s in samples])
    if logits is None:
        logits = torch.cat([part.logits for part in parts] + [s.logits for s in samples])
    columns = [(part.offsets, part.temperatures, part.eos_token_ids) for part in parts]
    if samples:
        columns.append(_sample_params(samples, sizes, device))
    offsets, temperatures, eos_ids = (torch.cat(c) if len(c) > 1 else c[0] for c in zip(*columns))
    was_active = torch.cat([part.active for part in parts] + [s.active for s in samples])
    active = was_active.clone()
    logliks = torch.cat([part.logliks for part in parts] + [s.logliks for s in samples])
    out = sample_rows(logits, offsets=offsets, temperatures=temperatures, eos_token_ids=eos_ids,
                      active=active, logliks=logliks)
    tokens, base, tempered, log_power_sums = out
    answered = None
    if rows is not None:
        n = rows.logits.shape[0]
        answered = RowsSampled(tokens[:n], was_active[:n], active[:n], logliks[:n], tempered[:n])
        if not samples:
            return Launch([], tokens, was_active, answered)
        tokens_s, was_s, active_s, logliks_s = (t[n:] for t in (tokens, was_active, active, logliks))
        base, tempered, log_power_sums = base[n:], tempered[n:], log_power_sums[n:]
    else:
        tokens_s, was_s, active_s, logliks_s = tokens, was_active, active, logliks
    logprobs = _LogProbs(sizes, base, tempered, log_power_sums)
    state = zip(*(torch.split(t, sizes) for t in (tokens_s, was_s, active_s, logliks_s)))
    return Launch([_SplitReply(logprobs, index, *r) for index, r in enumerate(state)], tokens, was_active, answered)
