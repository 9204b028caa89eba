"""The step guard of tensor-parallel serving: after every step the ranks compare what they did.

Lockstep (powerfast/serving/lockstep.py) rests on every rank computing the same step from the
same commands. If one rank ever computes something else (a token drawn from other numbers,
a request it ended alone), the all-reduces inside the next forward would sum activations of
different tokens and every rank would go on silently wrong. So after each step every rank
hashes the step into one int64 (:func:`fingerprint`) and posts it to every other rank in an
all-gather that runs in the background (lockstep.py); before the next step's forward (or the
stop) every rank waits for it and compares (:func:`verify`): by then it is done, so the check
costs the hash and the posting, not a round trip on the step's path. Equal, the step stands;
different, every rank raises the same :class:`DivergenceError` before the next forward, with
one line naming the step, the ranks that differ and the first request that differs (found
by a second exchange, of every rank's per-request digests, made only then). A step's outputs
go to the clients before its check: they are rank 0's own, and no forward has mixed the
ranks' different states yet.

What is hashed, per request: the tokens of every row it sampled in the step (all sampling
launches, rollouts and candidates included; read to the host in the engine's one copy of the
step, beside its streamed tokens), its
rows in the step's decode forward and their positions (the sequences' lengths), its prompt
and output lengths, its last output token, its forwards and rows so far; per step: the step
counter, every output the step reported (finished or not, why, its length and last token),
the engine's KV pages in use, its reservations and its queue's length.
"""

from __future__ import annotations

import hashlib

import torch

__all__ = ["DivergenceError", "describe", "fingerprint", "verify"]


class DivergenceError(RuntimeError):
    """Two ranks of a tensor-parallel engine computed different steps (one line: the step,
    the ranks, the first request that differs)."""


def _int64(digest: hashlib.blake2b) -> int:
    return int.from_bytes(digest.digest(), "little", signed=True)


def fingerprint(engine, step: int, outputs: list) -> tuple[int, list[tuple[str, int]]]:
    """(the step's digest as an int64, [(request id, its digest)] in a fixed order) of the
    step ``engine`` just ran and the ``outputs`` it returned. The engine records its sampled
    tokens in ``engine.sampled`` (a list of (request id, tokens)) for this."""
    digests: dict[str, hashlib.blake2b] = {}

    def of(request_id: str) -> hashlib.blake2b:
        digest = digests.get(request_id)
        if digest is None:
            digest = digests[request_id] = hashlib.blake2b(request_id.encode(), digest_size=8)
        return digest

    sampled = engine.sampled or []
    if sampled:
        values = getattr(engine, "sampled_host", None)  # read with the step's streamed tokens
        if values is None or len(values) != sum(tokens.numel() for _, tokens in sampled):
            flat = torch.cat([tokens.reshape(-1) for _, tokens in sampled]).to(dtype=torch.int64)
            values = flat.cpu().tolist()  # one copy for every launch of the step
        start = 0
        for request_id, tokens in sampled:
            count = tokens.numel()
            of(request_id).update(repr(values[start : start + count]).encode())
            start += count
    rows = engine.last_step_rows
    positions = engine.last_step_positions
    for request in engine.running_requests():
        of(request.id).update(repr((
            len(request.prompt_ids), len(request.token_ids), request.token_ids[-1] if request.token_ids else -1,
            rows.get(request.id, 0), positions.get(request.id, 0), request.forwards, request.forward_rows,
            type(request.pending).__name__)).encode())
    for out in outputs:
        of(out.request_id).update(repr((out.finished, out.finish_reason, len(out.token_ids),
                                        out.token_ids[-1] if out.token_ids else -1)).encode())
    stats = engine.stats()
    total = hashlib.blake2b(repr((step, stats.kv_pages_used, stats.kv_pages_reserved,
                                  stats.num_waiting, stats.num_running)).encode(), digest_size=8)
    per_request = [(request_id, _int64(digest)) for request_id, digest in digests.items()]
    total.update(repr(per_request).encode())
    return _int64(total), per_request


def verify(step: int | None, digests: list[int], per_request: list[tuple[str, int]], group) -> None:
    """Every rank's digest of ``step`` (``digests``, one per rank, as exchanged): nothing when
    they agree; else every rank sends every other its per-request digests
    (an all-gather of Python objects on ``group``, only on this path) and raises the same
    DivergenceError. Every rank must call it at the same point with the same ``digests``."""
    if len(set(digests)) <= 1:
        return
    import torch.distributed as dist

    lists: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(lists, per_request, group=group)  # only now: which request differs
    raise DivergenceError(describe(step, digests, lists))


def describe(step: int | None, values: list[int], lists: list[list[tuple[str, int]]]) -> str:
    """The one line of a divergence: the step, the ranks that differ from rank 0 and the first
    request whose digest differs (or the engine's totals, when every request agrees)."""
    ranks = [r for r, value in enumerate(values) if value != values[0]]
    first = None
    for r in ranks:
        reference, other = lists[0], lists[r]
        for index in range(max(len(reference), len(other))):
            if index >= len(reference) or index >= len(other) or reference[index] != other[index]:
                candidate = (reference if index < len(reference) else other)[index][0]
                first = first or candidate
                break
    where = f"first at request {first}" if first else "every request agrees; the engine's totals differ"
    names = ", ".join(f"rank {r}" for r in ranks)
    return (f"tensor-parallel ranks diverged at step {step}: {names} computed a different step from rank 0 "
            f"({where}); the server stops")
