"""Every setting of every method, declared once (powerfast/DESIGN.md section 3).

A :class:`Setting` holds a setting's name, type, default, help text, command-line flag and
check. The config dataclasses (:class:`PowerConfig`, :class:`MCMCConfig`, :class:`SMCConfig`,
:class:`SamplingConfig`, :class:`SIRConfig`) are built from them, are constructed by keyword
and validate on construction. Everything else is derived from these declarations, never
retyped: the engine's ``SamplingParams`` (every setting as a request field), the command's
flags (:func:`add_arguments` / :func:`settings_from_arguments`), the server's extra body
fields (:data:`SETTINGS`), the benchmarks' and the fidelity runs' settings.

Defaults are the paper's. An entry point that wants other defaults names a *preset*
(:data:`PRESETS`, declared here too): ``serving`` scales the lookahead down for requests
that should answer in seconds. Errors are :class:`SettingError`, a ``ValueError`` whose
``field`` attribute names the setting (the message carries the bad value).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "CANDIDATE_PROPOSALS", "METHODS", "METHOD_SETTINGS", "PRESETS", "RESAMPLERS", "ROLLOUT_PROPOSALS", "SETTINGS", "MCMCConfig",
    "PowerConfig", "SIRConfig", "SMCConfig", "SamplingConfig", "Setting", "SettingError", "add_arguments",
    "check_settings", "method_config", "preset_defaults", "setting_fields", "settings_from_arguments",
]

METHODS = ("power", "mcmc", "smc", "plain", "low-temp", "greedy", "best-of-n", "sir")
"""The sampling methods by name (:func:`powerfast.samplers.factory.make_sampler`)."""
ROLLOUT_PROPOSALS = ("base", "tempered")
CANDIDATE_PROPOSALS = ("base", "tempered")
RESAMPLERS = ("systematic", "chopthin")


class SettingError(ValueError):
    """A setting out of range or of the wrong type; ``field`` names it, the message gives the value."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


# ---------------------------------------------------------------------------- checks
# Each returns None for a good value and otherwise the end of the message "<name> must be ...".


def _is_number(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float))


def int_at_least(minimum: int) -> Callable[[Any], str | None]:
    def check(value) -> str | None:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            return f"an int >= {minimum}"
        return None
    return check


def _positive_finite(value) -> str | None:
    return None if _is_number(value) and math.isfinite(value) and value > 0 else "a positive finite number"


def _non_negative_finite(value) -> str | None:
    return None if _is_number(value) and math.isfinite(value) and value >= 0 else "a finite number >= 0"


def _fraction(value) -> str | None:
    return None if _is_number(value) and 0 < value <= 1 else "a number in (0, 1]"


def _eta(value) -> str | None:
    if _is_number(value) and math.isfinite(value) and value >= 4:
        return None
    return "a finite number >= 4 (chopthin needs it)"


def _skip_share(value) -> str | None:
    return None if _is_number(value) and (value == 0 or 0.5 < value <= 1) else "0 (never skip) or in (0.5, 1]"


def _boolean(value) -> str | None:
    return None if isinstance(value, bool) else "a bool"


# -------------------------------------------------------------------------- settings


@dataclass(frozen=True, slots=True)
class Setting:
    """One setting, declared once.

    name:    the keyword (config field, request field, JSON body field)
    kind:    int, float, bool or str (the JSON and command-line type)
    default: the paper's value (presets may name others)
    help:    one line for ``--help``, docstrings and the docs
    check:   value -> None, or what the value must be (None: one of ``choices``)
    choices: the values a str setting takes
    flag:    the command-line spelling (default ``--name-with-dashes``; a bool that defaults
             to True is switched off by ``--no-...``)
    """

    name: str
    kind: type
    default: Any
    help: str
    check: Callable[[Any], str | None] | None = None
    choices: tuple[str, ...] | None = None
    flag: str | None = None

    def validate(self, value) -> None:
        """SettingError naming this setting unless ``value`` passes its check."""
        if self.choices is not None:
            problem = None if isinstance(value, str) and value in self.choices else f"one of {self.choices}"
        else:
            problem = self.check(value)
        if problem is not None:
            raise SettingError(self.name, f"{self.name} must be {problem}, got {value!r}")

    def field(self):
        """This setting as a dataclass field (a fresh one per class)."""
        return dataclasses.field(default=self.default, metadata={"setting": self})

    @property
    def option(self) -> str:
        if self.flag is not None:
            return self.flag
        dashed = self.name.replace("_", "-")
        return f"--no-{dashed}" if self.kind is bool and self.default else f"--{dashed}"


def _declare(*settings: Setting) -> dict[str, Setting]:
    return {setting.name: setting for setting in settings}


SETTINGS: dict[str, Setting] = _declare(
    Setting("alpha", float, 4.0, "exponent of the target p(x)^alpha (> 1 sharpens); low-temp samples at T = 1/alpha",
            _positive_finite),
    Setting("block_size", int, 192, "B: tokens per decision of power and mcmc (1: power's token level)",
            int_at_least(1)),
    Setting("num_candidates", int, 32, "L: candidate blocks sampled from p per power decision", int_at_least(1),
            flag="--candidates"),
    Setting("top_k", int, 8, "K: distinct candidates kept (by base log-likelihood) and scored", int_at_least(1)),
    Setting("num_rollouts", int, 8, "M: rollouts per candidate", int_at_least(1), flag="--rollouts"),
    Setting("horizon", int, 192, "H: rollout length in tokens (0: choose by p^alpha alone)", int_at_least(0)),
    Setting("jackknife", bool, True, "the jackknife (bias-corrected) estimate instead of the plain one (needs M >= 2)",
            _boolean),
    Setting("rollout_proposal", str, "base",
            "rollouts from p ('base', the paper's) or from p at T = 1/alpha ('tempered')", choices=ROLLOUT_PROPOSALS),
    Setting("candidate_proposal", str, "base",
            "candidate blocks from p ('base', the paper's) or from p at T = 1/alpha ('tempered'); the choice among "
            "them stays p^alpha * zeta_hat", choices=CANDIDATE_PROPOSALS),
    Setting("reuse_rollouts", bool, False,
            "the chosen candidate's rollouts become the next decision's candidates (needs H >= B)", _boolean),
    Setting("rollout_resample_every", int, 0,
            "R: resample the tempered rollouts every R tokens, within independent groups (0: never)",
            int_at_least(0)),
    Setting("rollout_groups", int, 2,
            "G: independent groups the M resampled rollouts are split into (the jackknife leaves one out)",
            int_at_least(1)),
    Setting("skip_share", float, 0.0,
            "skip a decision's rollouts when one candidate is left or the top one holds >= this share of the "
            "candidates' p^alpha mass (0: never)", _skip_share),
    Setting("rollouts_per_round", int, 0,
            "rollouts per candidate per round; rounds go on while the choice's standard error > round_tolerance, "
            "up to M (0: all M at once)", int_at_least(0)),
    Setting("round_tolerance", float, 0.05,
            "rounds stop once every candidate's jackknife standard error of its choice probability is <= this",
            _fraction),
    Setting("entropy_cut", float, 0.0,
            "end a power candidate block early (after >= entropy_cut_after tokens) before a token whose base "
            "next-token entropy "
            "exceeds this many nats, so decisions fall where the model hesitates (0: blocks of B)",
            _non_negative_finite),
    Setting("entropy_cut_after", int, 1,
            "an entropy cut leaves a block at least this many tokens (1..B): a minimum block length",
            int_at_least(1)),
    Setting("mcmc_steps", int, 10, "N_MCMC: Metropolis-Hastings steps after each mcmc block", int_at_least(0)),
    Setting("num_particles", int, 32, "N: particles of smc", int_at_least(1), flag="--particles"),
    Setting("ess_threshold", float, 0.5, "smc resamples when ESS < this * N", _fraction),
    Setting("resample_every", int, 16, "R: smc tokens between ESS checks (a host sync each)", int_at_least(1)),
    Setting("ramp_tokens", int, 0, "smc's alpha rises linearly from 1 over this many tokens (0: no ramp)",
            int_at_least(0)),
    Setting("resampler", str, "systematic", "smc resampling: 'systematic' (weights reset) or 'chopthin'",
            choices=RESAMPLERS),
    Setting("eta", float, 3.0 + math.sqrt(8.0), "chopthin's bound on largest / smallest weight (>= 4)", _eta),
    Setting("temperature", float, 1.0, "temperature of plain, best-of-n and sir's samples (0: greedy; sir needs > 0)",
            _non_negative_finite),
    Setting("num_samples", int, 8,
            "N of best-of-n and sir: samples drawn; best-of-n keeps the most likely, sir draws one by p^alpha / q",
            int_at_least(1)),
)
"""Every setting of every method, by name."""

PRESETS: dict[str, dict[str, Any]] = {
    "paper": {},
    "serving": {"block_size": 16, "num_candidates": 8, "top_k": 4, "num_rollouts": 4, "horizon": 16,
                "rollout_proposal": "tempered", "mcmc_steps": 2, "num_particles": 8, "num_samples": 4},
    "adaptive": {"rollout_proposal": "tempered", "skip_share": 0.99, "rollouts_per_round": 2,
                 "round_tolerance": 0.05},
    "small": {"alpha": 8.0, "block_size": 8, "num_candidates": 8, "top_k": 4, "num_rollouts": 4, "horizon": 16,
              "rollout_proposal": "tempered", "candidate_proposal": "tempered"},
}
"""Named sets of defaults other than the paper's (``paper``: none). ``serving`` (the engine's
requests and the HTTP server) scales the lookahead down so a request answers in seconds, with
tempered rollouts: at its M = 4 and H = 16 they spread log zeta_hat 2.8 nats on the embedded
model against 15.9 for the paper's rollouts from p (docs/studies.md, "Choosing M and H on a real model").
``adaptive`` keeps the paper's shape and spends the rollouts where a decision needs them:
tempered rollouts, no rollouts for a decided decision (top p^alpha share >= 0.99), rollouts
in rounds of 2 until the choice's standard error is <= 0.05 (docs/studies.md, "Adaptive rollout
budgets: measured", has the measurements behind it; entropy cuts stay off: their threshold depends on
the model). ``small`` is the lookahead that validation chose for small models (SmolLM2-135M and
Gemma 3 270M on multi-step arithmetic, bench/RESULTS.md "where does power sampling win?"):
alpha 8, tempered candidates, B = 8, L = 8, K = M = 4, H = 16, tempered rollouts; about 20x
greedy's decoded tokens. Chosen on validation, it did not beat greedy there."""


def preset_defaults(preset: str = "paper") -> dict[str, Any]:
    """Every setting's default under ``preset``."""
    if preset not in PRESETS:
        raise SettingError("preset", f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    return {name: PRESETS[preset].get(name, setting.default) for name, setting in SETTINGS.items()}


def setting_fields(preset: str = "paper") -> list[tuple[str, type, Any]]:
    """Every setting as a ``dataclasses.make_dataclass`` field with ``preset``'s default: how
    a class holding all the settings (the benchmarks' ``Settings``) is derived instead of
    retyped."""
    defaults = preset_defaults(preset)
    return [(name, setting.kind, dataclasses.field(default=defaults[name], metadata={"setting": setting}))
            for name, setting in SETTINGS.items()]


def check_settings(settings: Mapping[str, Any]) -> None:
    """SettingError for an unknown name or a value its setting refuses, whatever the method."""
    for name, value in settings.items():
        if name not in SETTINGS:
            raise SettingError(name, f"unknown setting {name!r}; known: {', '.join(SETTINGS)}")
        SETTINGS[name].validate(value)


# --------------------------------------------------------------------------- configs


def _validate_fields(config) -> None:
    for field in dataclasses.fields(config):
        field.metadata["setting"].validate(getattr(config, field.name))


@dataclass(slots=True, frozen=True, kw_only=True)
class PowerConfig:
    """Power sampling by Monte Carlo lookahead (Algorithm 2 of the paper; Algorithm 1 at
    ``block_size = 1``). Fields: alpha, block_size (B), num_candidates (L), top_k (K),
    num_rollouts (M), horizon (H), jackknife, rollout_proposal ("base": rollouts from p,
    weight p(s)^(alpha-1); "tempered": from p at T = 1/alpha, weight prod_t sum_x
    p(x|h_t)^alpha, powerfast/DESIGN.md section 6), candidate_proposal ("base": the L candidate
    blocks from p; "tempered": from p at T = 1/alpha, section 2), reuse_rollouts, rollout_resample_every (R),
    rollout_groups (G), and the adaptive budgets skip_share, rollouts_per_round,
    round_tolerance, entropy_cut and entropy_cut_after (:data:`SETTINGS` has each one's help)."""

    alpha: float = SETTINGS["alpha"].field()
    block_size: int = SETTINGS["block_size"].field()
    num_candidates: int = SETTINGS["num_candidates"].field()
    top_k: int = SETTINGS["top_k"].field()
    num_rollouts: int = SETTINGS["num_rollouts"].field()
    horizon: int = SETTINGS["horizon"].field()
    jackknife: bool = SETTINGS["jackknife"].field()
    rollout_proposal: str = SETTINGS["rollout_proposal"].field()
    candidate_proposal: str = SETTINGS["candidate_proposal"].field()
    reuse_rollouts: bool = SETTINGS["reuse_rollouts"].field()
    rollout_resample_every: int = SETTINGS["rollout_resample_every"].field()
    rollout_groups: int = SETTINGS["rollout_groups"].field()
    skip_share: float = SETTINGS["skip_share"].field()
    rollouts_per_round: int = SETTINGS["rollouts_per_round"].field()
    round_tolerance: float = SETTINGS["round_tolerance"].field()
    entropy_cut: float = SETTINGS["entropy_cut"].field()
    entropy_cut_after: int = SETTINGS["entropy_cut_after"].field()

    def __post_init__(self) -> None:
        _validate_fields(self)
        if self.rollouts_per_round:
            self._check_rounds()
        if self.entropy_cut and (self.block_size == 1 or self.reuse_rollouts):
            raise SettingError("entropy_cut", f"entropy_cut={self.entropy_cut} needs block_size > 1 (got "
                                              f"{self.block_size}) and no reuse_rollouts (got {self.reuse_rollouts})")
        if self.entropy_cut_after > self.block_size:
            raise SettingError("entropy_cut_after", f"entropy_cut_after={self.entropy_cut_after} must be <= block_size "
                                                    f"({self.block_size}): a block holds at most B tokens")
        if self.rollout_resample_every:
            if self.rollout_proposal != "tempered":
                raise SettingError("rollout_resample_every",
                                   f"rollout_resample_every={self.rollout_resample_every} needs rollout_proposal="
                                   f"'tempered' (the resampling weights are the tempered ones), got "
                                   f"{self.rollout_proposal!r}")
            if self.reuse_rollouts:
                raise SettingError("rollout_resample_every",
                                   f"rollout_resample_every={self.rollout_resample_every} cannot be combined with "
                                   "reuse_rollouts")
            if self.num_rollouts % self.rollout_groups:
                raise SettingError("rollout_groups",
                                   f"num_rollouts ({self.num_rollouts}) must be a multiple of rollout_groups "
                                   f"({self.rollout_groups}) when rollouts are resampled")
            if self.jackknife and self.rollout_groups < 2:
                raise SettingError("rollout_groups",
                                   f"the jackknife over resampled rollouts leaves one group out: it needs "
                                   f"rollout_groups >= 2, got {self.rollout_groups} (or set jackknife=False)")
        if self.candidate_proposal != "base" and (self.block_size == 1 or self.reuse_rollouts):
            raise SettingError("candidate_proposal",
                               f"candidate_proposal={self.candidate_proposal!r} draws the L candidate blocks: it needs "
                               f"block_size > 1 (the token level takes the Top-K next tokens; got {self.block_size}) "
                               f"and no reuse_rollouts (reused candidates are rollouts; got {self.reuse_rollouts})")
        if self.reuse_rollouts and self.horizon < self.block_size:
            raise SettingError("reuse_rollouts",
                               f"reuse_rollouts needs horizon >= block_size (the rollouts become the next candidates), "
                               f"got horizon {self.horizon} < block_size {self.block_size}")
        if self.jackknife and self.num_rollouts < 2:
            raise SettingError("jackknife", f"the jackknife needs num_rollouts >= 2, got {self.num_rollouts} "
                                               f"(or set jackknife=False)")
        if self.block_size > 1 and self.top_k > self.num_candidates:
            raise SettingError("top_k", f"top_k ({self.top_k}) cannot exceed num_candidates "
                                        f"({self.num_candidates}) at block level")

    def _check_rounds(self) -> None:
        per_round, num = self.rollouts_per_round, self.num_rollouts
        if num % per_round:
            raise SettingError("rollouts_per_round", f"num_rollouts ({num}) must be a multiple of rollouts_per_round "
                                                     f"({per_round})")
        if self.reuse_rollouts:
            raise SettingError("rollouts_per_round", f"rollouts_per_round={per_round} cannot be combined with "
                                                     "reuse_rollouts")
        # the standard error after the first round needs two independent columns
        size = num // self.rollout_groups if self.rollout_resample_every else 1
        if per_round % size or per_round // size < 2:
            what = (f"a multiple of the group size num_rollouts / rollout_groups = {size}, at least 2 groups"
                    if size > 1 else "at least 2")
            raise SettingError("rollouts_per_round", f"rollouts_per_round must be {what} (a standard error needs two "
                                                     f"independent columns), got {per_round}")

    @property
    def token_level(self) -> bool:
        """True at ``block_size = 1``: Algorithm 1, candidates are the Top-K next tokens."""
        return self.block_size == 1


@dataclass(slots=True, frozen=True, kw_only=True)
class MCMCConfig:
    """Metropolis-Hastings power sampling of Karan & Du: alpha (the proposal is p at
    temperature 1 / alpha), block_size (B, tokens appended before each round of MH steps),
    mcmc_steps (N_MCMC)."""

    alpha: float = SETTINGS["alpha"].field()
    block_size: int = SETTINGS["block_size"].field()
    mcmc_steps: int = SETTINGS["mcmc_steps"].field()

    def __post_init__(self) -> None:
        _validate_fields(self)


@dataclass(slots=True, frozen=True, kw_only=True)
class SMCConfig:
    """Power-SMC (Azizi et al.): N particles, tempered proposal, resampling (powerfast/DESIGN.md
    section 6). Fields: alpha, num_particles (N), ess_threshold (kappa: resample when
    ESS < kappa N), resample_every (R), ramp_tokens, resampler ("systematic" or "chopthin",
    Gandy & Lau 2016), eta (chopthin's weight-ratio bound)."""

    alpha: float = SETTINGS["alpha"].field()
    num_particles: int = SETTINGS["num_particles"].field()
    ess_threshold: float = SETTINGS["ess_threshold"].field()
    resample_every: int = SETTINGS["resample_every"].field()
    ramp_tokens: int = SETTINGS["ramp_tokens"].field()
    resampler: str = SETTINGS["resampler"].field()
    eta: float = SETTINGS["eta"].field()

    def __post_init__(self) -> None:
        _validate_fields(self)

    def alpha_at(self, step: int) -> float:
        """alpha_t of the token at 0-based position ``step``: the linear ramp from 1, then alpha."""
        if self.ramp_tokens == 0 or step >= self.ramp_tokens:
            return float(self.alpha)
        return 1.0 + (self.alpha - 1.0) * (step + 1) / self.ramp_tokens


@dataclass(slots=True, frozen=True, kw_only=True)
class SamplingConfig:
    """Ancestral sampling: temperature (> 0, or 0 for greedy) and num_samples (N of
    best-of-N: keep the sample of highest base log-likelihood; 1 for the other methods)."""

    temperature: float = SETTINGS["temperature"].field()
    num_samples: int = 1

    def __post_init__(self) -> None:
        SETTINGS["temperature"].validate(self.temperature)
        SETTINGS["num_samples"].validate(self.num_samples)


@dataclass(slots=True, frozen=True, kw_only=True)
class SIRConfig:
    """Sampling-importance-resampling from plain samples (powerfast/DESIGN.md section 6):
    num_samples (N) completions drawn from q = p at ``temperature`` (> 0), one of them
    returned with probability proportional to p(x)^alpha / q(x)."""

    alpha: float = SETTINGS["alpha"].field()
    temperature: float = SETTINGS["temperature"].field()
    num_samples: int = SETTINGS["num_samples"].field()

    def __post_init__(self) -> None:
        _validate_fields(self)
        if self.temperature == 0:
            raise SettingError("temperature", f"sir weighs its samples by p^alpha / q, q the law at the temperature: "
                                              f"temperature must be > 0 (greedy q is degenerate), "
                                              f"got {self.temperature!r}")


METHOD_SETTINGS: dict[str, tuple[str, ...]] = {
    "power": tuple(f.name for f in dataclasses.fields(PowerConfig)),
    "mcmc": tuple(f.name for f in dataclasses.fields(MCMCConfig)),
    "smc": tuple(f.name for f in dataclasses.fields(SMCConfig)),
    "plain": ("temperature",),
    "low-temp": ("alpha",),
    "greedy": (),
    "best-of-n": ("temperature", "num_samples"),
    "sir": tuple(f.name for f in dataclasses.fields(SIRConfig)),
}
"""The settings each method uses (the others are validated and ignored)."""


def method_config(method: str, *, preset: str = "paper", **settings):
    """The validated config of ``method`` (one of METHODS) from keyword settings; settings
    not given take ``preset``'s defaults, settings the method does not use are still checked.
    Returns a PowerConfig, MCMCConfig, SMCConfig, SamplingConfig or SIRConfig; SettingError (a
    ValueError naming the field) for an unknown method, an unknown setting or a bad value.
    """
    if method not in METHODS:
        raise SettingError("method", f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    check_settings(settings)
    values = {**preset_defaults(preset), **settings}
    used = {name: values[name] for name in METHOD_SETTINGS[method]}
    if method == "power":
        return PowerConfig(**used)
    if method == "mcmc":
        return MCMCConfig(**used)
    if method == "smc":
        return SMCConfig(**used)
    if method == "plain":
        return SamplingConfig(**used)
    if method == "low-temp":
        return SamplingConfig(temperature=1.0 / values["alpha"])
    if method == "greedy":
        return SamplingConfig(temperature=0.0)
    if method == "sir":
        return SIRConfig(**used)
    return SamplingConfig(**used)  # best-of-n


# ---------------------------------------------------------------------- command line


def _parse(setting: Setting):
    kind = setting.kind

    def parse(text: str):
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{setting.option} takes {kind.__name__} values, got {text!r}") from None
    parse.__name__ = kind.__name__
    return parse


def add_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup, preset: str = "paper",
                  names: Iterable[str] | None = None) -> None:
    """Add a flag per setting (all, or ``names``) with ``preset``'s defaults; read them back
    with :func:`settings_from_arguments`."""
    defaults = preset_defaults(preset)
    for name in SETTINGS if names is None else names:
        setting = SETTINGS[name]
        default = defaults[name]
        if setting.kind is bool:
            action = "store_false" if default else "store_true"
            parser.add_argument(setting.option, dest=name, action=action, default=default,
                                help=f"turn off: {setting.help}" if default else setting.help)
            continue
        shown = f"{default:g}" if isinstance(default, float) else default
        parser.add_argument(setting.option, dest=name, type=_parse(setting), default=default, choices=setting.choices,
                            metavar=None if setting.choices else name.upper(), help=f"{setting.help} (default {shown})")


def settings_from_arguments(args: argparse.Namespace, names: Iterable[str] | None = None) -> dict[str, Any]:
    """The settings parsed by :func:`add_arguments`, by name."""
    return {name: getattr(args, name) for name in (SETTINGS if names is None else names)}
