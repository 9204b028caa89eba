"""Test-only fault injection: make one rank of a tensor-parallel launch fail or diverge.

Not for use in production. The tests of the tensor-parallel guard and of failure handling
(tests/test_tensor_parallel.py) set ``POWERFAST_TEST_FAULT`` before a launch; the engine reads
it once, at construction:

    POWERFAST_TEST_FAULT=KIND@RANK:STEP

    diverge   on rank RANK, at engine step STEP, the first token of the step's first sampling
              launch is changed (+1 modulo the vocabulary): that rank's request goes on from
              other tokens than the other ranks', the silent divergence the step guard catches
    raise     on rank RANK, at the start of engine step STEP, the step raises FaultInjected

Unset (always, outside those tests) the engine holds None and pays nothing.
"""

from __future__ import annotations

import os
import re

__all__ = ["ENV", "Fault", "FaultInjected", "from_env"]

ENV = "POWERFAST_TEST_FAULT"
_SPEC = re.compile(r"(diverge|raise)@(\d+):(\d+)")


class FaultInjected(RuntimeError):
    """The failure a ``raise`` fault makes (test-only)."""


class Fault:
    """One injected fault on this rank (see the module's docstring)."""

    def __init__(self, kind: str, rank: int, step: int) -> None:
        self.kind, self.rank, self.step = kind, rank, step
        self._done = False

    def before_step(self, step: int) -> None:
        if self.kind == "raise" and step == self.step:
            raise FaultInjected(f"test fault ({ENV}): rank {self.rank} raises at step {step}")

    def after_sampling(self, step: int, launch, vocab_size: int):
        """The sampling launch (a :class:`~powerfast.samplers.sampling.Launch`) as the engine
        goes on with it: its first token changed when this is the diverging rank and step."""
        if self.kind != "diverge" or step != self.step or self._done or launch.tokens.numel() == 0:
            return launch
        self._done = True
        tokens = launch.tokens.clone()
        tokens.view(-1)[0] = (tokens.view(-1)[0] + 1) % vocab_size
        if launch.rows is not None:  # the first rows are the engine's batched loops'
            rows = launch.rows._replace(tokens=tokens[: launch.rows.tokens.shape[0]])
            return launch._replace(tokens=tokens, rows=rows)
        first = launch.replies[0]
        replies = [first._replace(tokens=tokens[: first.tokens.shape[0]]), *launch.replies[1:]]
        return launch._replace(tokens=tokens, replies=replies)


def from_env(rank: int | None = None) -> Fault | None:
    """The fault ``POWERFAST_TEST_FAULT`` sets for this rank (``RANK``, 0 without a launch),
    or None. ValueError for a malformed value."""
    spec = os.environ.get(ENV)
    if not spec:
        return None
    match = _SPEC.fullmatch(spec.strip())
    if match is None:
        raise ValueError(f"{ENV} must be KIND@RANK:STEP with KIND diverge or raise, got {spec!r}")
    kind, fault_rank, step = match.group(1), int(match.group(2)), int(match.group(3))
    here = int(os.environ.get("RANK", "0")) if rank is None else rank
    return Fault(kind, fault_rank, step) if fault_rank == here else None
