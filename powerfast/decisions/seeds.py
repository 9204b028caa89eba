"""SeedStream: one request's reproducible stream of seeds, uniforms, integers and draws."""

from __future__ import annotations

import torch

__all__ = ["SeedStream"]


class SeedStream:
    """A reproducible stream of 63-bit seeds for the counter-based sampling kernels, and of the
    host draws a sampler makes (uniforms, integers, a categorical draw)."""

    def __init__(self, seed: int | None) -> None:
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,)).item())
        self._generator = torch.Generator().manual_seed(int(seed) % (2**63))

    def next(self) -> int:
        return int(torch.randint(0, 2**62, (1,), generator=self._generator).item())

    def uniform(self) -> float:
        return float(torch.rand((), generator=self._generator, dtype=torch.float64))

    def integers(self, high: int) -> int:
        return int(torch.randint(0, high, (1,), generator=self._generator).item())

    def categorical(self, probs: torch.Tensor) -> int:
        """Index drawn from a (K,) probability vector (on any device; one host copy)."""
        probs = probs.detach().double().cpu()
        return int(torch.multinomial(probs / probs.sum(), 1, generator=self._generator).item())
