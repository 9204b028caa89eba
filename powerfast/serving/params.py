"""What a request asks for: :class:`SamplingParams`, the method and its settings.

Its fields are written out, so that a reader and an IDE see them: the request's own fields
(method, max_tokens, seed, stop, ignore_eos) and then every setting of
:data:`powerfast.core.config.SETTINGS` with the ``serving`` preset's defaults;
``tests/test_settings.py`` fails when they drift from those declarations. Every field is validated on construction whether the
request's method uses it or not; :class:`~powerfast.serving.errors.InvalidRequestError`
names the field (``error.field``).
"""

from __future__ import annotations

import dataclasses
import math
import secrets
from dataclasses import dataclass

from powerfast.core.config import METHODS, SETTINGS, SettingError, method_config, preset_defaults
from powerfast.serving.errors import InvalidRequestError

__all__ = ["REQUEST_FIELDS", "SamplingParams", "SERVING_PRESET"]

SERVING_PRESET = "serving"
"""The preset whose defaults a request's settings take (:data:`powerfast.core.config.PRESETS`)."""

REQUEST_FIELDS = {
    "method": (str, "plain", "one of " + ", ".join(METHODS)),
    "max_tokens": (int, 256, "the token budget (> 0)"),
    "seed": (int | None, None, "the request's own random stream (None: a fresh one)"),
    "stop": (tuple, (), "stop strings: the text is cut before the first one found"),
    "ignore_eos": (bool, False, "generate the whole budget whatever the model samples"),
}
"""The fields of a request that are not a method's settings: (type, default, help)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class SamplingParams:
    """What a request asks for: the method and its settings, validated on construction
    (InvalidRequestError naming the field), keyword only. The request's own fields
    (:data:`REQUEST_FIELDS`), then every setting of :data:`powerfast.core.config.SETTINGS` in its
    order with the ``serving`` preset's default (``tests/test_settings.py`` keeps them equal)."""

    # the request's own fields (REQUEST_FIELDS)
    method: str = "plain"
    max_tokens: int = 256
    seed: int | None = None
    stop: tuple = ()
    ignore_eos: bool = False
    # every setting (SETTINGS), with the serving preset's defaults
    alpha: float = 4.0
    block_size: int = 16
    num_candidates: int = 8
    top_k: int = 4
    num_rollouts: int = 4
    horizon: int = 16
    jackknife: bool = True
    rollout_proposal: str = "tempered"
    candidate_proposal: str = "base"
    reuse_rollouts: bool = False
    rollout_resample_every: int = 0
    rollout_groups: int = 2
    skip_share: float = 0.0
    rollouts_per_round: int = 0
    round_tolerance: float = 0.05
    entropy_cut: float = 0.0
    entropy_cut_after: int = 1
    mcmc_steps: int = 2
    num_particles: int = 8
    ess_threshold: float = 0.5
    resample_every: int = 16
    ramp_tokens: int = 0
    resampler: str = "systematic"
    eta: float = 3.0 + math.sqrt(8.0)
    temperature: float = 1.0
    num_samples: int = 4

    def __post_init__(self) -> None:
        if not isinstance(self.method, str) or self.method not in METHODS:
            raise InvalidRequestError("method", f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens <= 0:
            raise InvalidRequestError("max_tokens", f"max_tokens must be an int > 0, got {self.max_tokens!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or not 0 <= self.seed < 2**63):
            raise InvalidRequestError("seed", f"seed must be an int in [0, 2**63) or None, got {self.seed!r}")
        stop = (self.stop,) if isinstance(self.stop, str) else self.stop
        if not isinstance(stop, (tuple, list)) or not all(isinstance(s, str) and s for s in stop):
            raise InvalidRequestError("stop", f"stop must be a non-empty string or a list of them, got {self.stop!r}")
        object.__setattr__(self, "stop", tuple(stop))
        if not isinstance(self.ignore_eos, bool):
            raise InvalidRequestError("ignore_eos", f"ignore_eos must be a bool, got {self.ignore_eos!r}")
        try:
            self.config()  # every setting, then the method's own constraints between them
        except SettingError as error:
            raise InvalidRequestError(error.field, str(error)) from None

    def resolved(self):
        """These params with their seed fixed: themselves when seeded, else a copy with a fresh
        63-bit seed from the operating system's randomness (:mod:`secrets`), never from torch's
        global generator, so that no library call anywhere can shift it. The engine resolves
        a request once, when it is added; what runs it (on every rank) then draws nothing."""
        if self.seed is not None:
            return self
        return dataclasses.replace(self, seed=secrets.randbits(63))

    def settings(self) -> dict:
        """Every setting of the request, by name."""
        return {name: getattr(self, name) for name in SETTINGS}

    def config(self):
        """The method's validated config (PowerConfig, MCMCConfig, SMCConfig, SamplingConfig or SIRConfig)."""
        return method_config(self.method, **self.settings())

    def sampler(self, runner, tokenizer=None):
        """The sampler (``make_sampler``) that does what these params ask, with its own seed
        stream: what the engine runs for a request, and ``sampler.generate([prompt])`` the
        same computation outside the engine."""
        from powerfast.samplers.factory import make_sampler

        return make_sampler(self.method, runner, tokenizer, seed=self.seed, config=self.config())

    def branches(self) -> tuple[int, str]:
        """(most sequences the request decodes at once, the field that sets it)."""
        if self.method == "power":
            first = self.top_k if self.block_size == 1 else self.num_candidates
            return max(first, self.top_k * self.num_rollouts), "num_rollouts"
        if self.method == "smc":
            return self.num_particles, "num_particles"
        if self.method in ("best-of-n", "sir"):
            return self.num_samples, "num_samples"
        return 1, "method"


def _field_help() -> str:
    """The fields' help, from their declarations (the settings' defaults are the serving preset's,
    scaled for serving, not the papers')."""
    defaults = preset_defaults(SERVING_PRESET)
    lines = ["    Fields:", ""]
    lines += [f"        {name}: {help}" for name, (_, _, help) in REQUEST_FIELDS.items()]
    lines += [f"        {name}: {setting.help} (default {defaults[name]!r})" for name, setting in SETTINGS.items()]
    return "\n".join(lines)


SamplingParams.__doc__ += "\n\n" + _field_help()
