"""The decode loops the engine steps itself: one batch of one-row streaming loops.

A plain, low-temperature or greedy request's program yields its whole decode loop as one
:class:`~powerfast.samplers.program.Loop` (a sequence, its first logits, a step budget, a seed, a
temperature, EOS ids). Stepping each such loop as a generator costs two resumes and a handful
of per-request tensor views per token; :class:`LoopBatch` instead keeps every loop's state as
one row of a few device tensors (the last token, active, log-likelihood, tempered
log-likelihood, offset base, step counter, temperature, EOS id), so that a step of the engine
decodes all of them as one block of rows and samples them as one block of a launch
(:class:`~powerfast.samplers.sampling.Rows`). Row ``r`` of loop step ``t`` draws at offset
``seed * SEED_MIX + t``: what the loop's own one-row Sample would use, so the same draws from the
same logits as the loop run alone (a batched forward's logits may differ from a lone one's in the
last bits, as for every request of the engine).

Rows keep the order they joined in; a row that joined since the last decode waits for its first
sample (on its own first logits) before its first decode, which makes the rows due for a sample
always the last ones. A loop ends after its budget, or at an EOS id on a step where the loop
itself would look (every :data:`~powerfast.samplers.decoding.LOOP_EOS_CHECK` steps); then the
batch builds its :class:`~powerfast.samplers.decoding.Continuations` and the engine resumes the
program with it. Rows of requests that end otherwise are marked and dropped before the next use.
"""

from __future__ import annotations

import torch

from powerfast.samplers.decoding import LOOP_EOS_CHECK, Continuations
from powerfast.samplers.program import Loop
from powerfast.samplers.sampling import SEED_MIX, Rows, RowsSampled, same_rows, wrap64

__all__ = ["LoopBatch", "LoopRow"]


class LoopRow:
    """One loop of the batch: its request, its sequence and what the host keeps of it."""

    __slots__ = ("request", "seq", "loop", "steps", "history", "first_logits", "dead", "tempered")

    def __init__(self, request, loop: Loop) -> None:
        self.request = request
        self.seq = loop.seq
        self.loop = loop
        self.steps = 0  # tokens sampled so far
        self.history: list[int] = []  # the host ids of those tokens, appended when streamed
        self.first_logits = loop.first_logits  # until its first sample
        self.dead = False
        self.tempered = loop.temperature not in (0, 1.0)

    @property
    def last_step(self) -> bool:
        """Whether the token just sampled was the loop's last."""
        return self.steps >= self.loop.num_steps

    @property
    def eos_check(self) -> bool:
        """Whether the loop looks at its EOS after the token just sampled."""
        return bool(self.loop.eos_token_ids) and not self.last_step and self.steps % LOOP_EOS_CHECK == 0


class LoopBatch:
    """Every running :class:`Loop` of an engine as rows of device tensors (see the module)."""

    def __init__(self, device) -> None:
        self.device = torch.device(device)
        self.rows: list[LoopRow] = []
        self._joining: list[LoopRow] = []
        self._due_from: int | None = None  # rows [due_from:] wait for a sample
        self._due_logits: list[torch.Tensor] = []
        self._dead = 0
        empty = dict(device=self.device)
        self.tokens = torch.zeros(0, dtype=torch.long, **empty)  # the last token of each row
        self.active = torch.zeros(0, dtype=torch.bool, **empty)
        self.logliks = torch.zeros(0, dtype=torch.float32, **empty)
        self.tempered = torch.zeros(0, dtype=torch.float32, **empty)
        self.offset_bases = torch.zeros(0, dtype=torch.int64, **empty)  # seed * SEED_MIX, wrapped
        self.counters = torch.zeros(0, dtype=torch.int64, **empty)
        self.temperatures = torch.zeros(0, dtype=torch.float64, **empty)
        self.eos_ids = torch.zeros(0, dtype=torch.int64, **empty)

    _STATE = ("tokens", "active", "logliks", "tempered", "offset_bases", "counters", "temperatures", "eos_ids")

    def __len__(self) -> int:
        return len(self.rows) + len(self._joining)

    def join(self, request, loop: Loop) -> LoopRow:
        """Take over ``loop`` of ``request``: it is sampled at the next launch on its first logits."""
        row = LoopRow(request, loop)
        self._joining.append(row)
        return row

    def drop(self, row: LoopRow) -> None:
        """The row's request ended (its sequence freed by its program): leave it out from now on."""
        if not row.dead:
            row.dead = True
            self._dead += 1

    def _compact(self) -> None:
        if self._joining:
            self._joining = [row for row in self._joining if not row.dead]
        if not any(row.dead for row in self.rows):
            self._dead = 0
            return
        keep = [i for i, row in enumerate(self.rows) if not row.dead]
        index = torch.tensor(keep, dtype=torch.long, device=self.device)
        for name in self._STATE:
            setattr(self, name, getattr(self, name).index_select(0, index))
        self.rows = [self.rows[i] for i in keep]
        self._dead = 0

    def _admit_joining(self) -> None:
        """Append the joining rows to the state tensors (one ``cat`` per tensor); they are due."""
        joining, self._joining = self._joining, []
        n = len(joining)
        if self._due_from is None:
            self._due_from = len(self.rows)
        self._due_logits.extend(row.first_logits for row in joining)
        for row in joining:
            row.first_logits = None
        loops = [row.loop for row in joining]
        fresh = {
            "tokens": torch.zeros(n, dtype=torch.long),
            "active": torch.ones(n, dtype=torch.bool),
            "logliks": torch.zeros(n, dtype=torch.float32),
            "tempered": torch.zeros(n, dtype=torch.float32),
            "offset_bases": torch.tensor([wrap64(loop.seed * SEED_MIX) for loop in loops], dtype=torch.int64),
            "counters": torch.zeros(n, dtype=torch.int64),
            "temperatures": torch.tensor([loop.temperature for loop in loops], dtype=torch.float64),
            "eos_ids": torch.tensor([loop.eos_token_ids[0] if loop.eos_token_ids else -1 for loop in loops],
                                    dtype=torch.int64),
        }
        for name in self._STATE:
            setattr(self, name, torch.cat([getattr(self, name), fresh[name].to(self.device)]))
        self.rows.extend(joining)

    # ------------------------------------------------------------------ decode

    def decode_inputs(self) -> tuple[list, torch.Tensor]:
        """(sequences, (G,) last tokens) of every row, in order, for the decode forward: each
        row has had a sample since its last decode (drops ended rows first)."""
        if self._dead:
            self._compact()
        return [row.seq for row in self.rows], self.tokens

    def decoded(self, logits: torch.Tensor) -> None:
        """The decode forward's (G, V) logits of the rows: they are all due for a sample."""
        self._due_from = 0
        self._due_logits = [logits]

    # ------------------------------------------------------------------ sampling

    def due(self) -> Rows | None:
        """The rows due for a sample (the last ones), as the launch's :class:`Rows`; None if none."""
        if self._dead:
            self._compact_due()
        if self._joining:
            self._admit_joining()
        if self._due_from is None:
            return None
        start = self._due_from
        logits = same_rows(self._due_logits) if len(self._due_logits) > 1 else self._due_logits[0]
        if logits is None:
            logits = torch.cat(self._due_logits)
        return Rows(logits, self.offset_bases[start:] + self.counters[start:], self.temperatures[start:],
                    self.eos_ids[start:], self.active[start:], self.logliks[start:])

    def _compact_due(self) -> None:
        """Drop ended rows that are not due (dropping a due row would misalign its logits)."""
        if self._due_from is None:
            self._compact()
            return
        if any(row.dead for row in self.rows[: self._due_from]):
            due_rows = self.rows[self._due_from :]
            keep = [i for i, row in enumerate(self.rows[: self._due_from]) if not row.dead]
            index = torch.tensor(keep + list(range(self._due_from, len(self.rows))), dtype=torch.long,
                                 device=self.device)
            for name in self._STATE:
                setattr(self, name, getattr(self, name).index_select(0, index))
            self.rows = [self.rows[i] for i in keep] + due_rows
            self._due_from = len(keep)
        self._joining = [row for row in self._joining if not row.dead]
        self._dead = sum(row.dead for row in self.rows)

    def sampled(self, answer: RowsSampled) -> list[LoopRow]:
        """Take the launch's answer for the due rows: their state advances (the token, active,
        log-likelihoods, the step counter). Returns those rows, in order (the launch's first rows)."""
        start, self._due_from, self._due_logits = self._due_from, None, []
        self.tokens[start:] = answer.tokens
        self.active[start:] = answer.active
        self.logliks[start:] = answer.logliks
        self.tempered[start:] += answer.tempered_logprobs
        self.counters[start:] += 1
        rows = self.rows[start:]
        for row in rows:
            row.steps += 1
        return rows

    def abandon_due(self) -> list[LoopRow]:
        """The rows that were due when their launch failed (their requests fail); nothing is due."""
        start, self._due_from, self._due_logits = self._due_from, None, []
        return [] if start is None else [row for row in self.rows[start:] if not row.dead]

    def finish(self, row: LoopRow, index: int | None = None, unread: torch.Tensor | None = None) -> Continuations:
        """The loop's result; the row leaves the batch. ``index``: its place among the rows
        (looked up if None); ``unread``: (k,) the tokens it sampled after its history (the
        host ids appended when a step's tokens are read), in order: those of the running step."""
        if index is None:
            index = self.rows.index(row)
        device = self.device
        tokens = torch.tensor(row.history, dtype=torch.long, device=device)
        if unread is not None and unread.numel():
            tokens = torch.cat([tokens, unread.reshape(-1).to(torch.long)])
        tokens = tokens.view(1, -1)
        lengths = torch.tensor([tokens.shape[1]], dtype=torch.long, device=device)
        base = self.logliks[index : index + 1].clone()
        tempered = self.tempered[index : index + 1].clone() if row.tempered else None
        active = self.active[index : index + 1].clone()
        self.drop(row)
        return Continuations(tokens, lengths, base, tempered, None, None, None, None, active)
