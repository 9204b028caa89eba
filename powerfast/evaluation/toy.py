"""The toy problem of the paper (section 4.1) and a Monte Carlo bias study.

Vocabulary {PLAN, GUESS, CALC, A4, A5, EOS}, sequences of at most four tokens:

    p(PLAN) = 0.4, p(GUESS) = 0.6, p(CALC | PLAN) = 1,
    p(A4 | PLAN, CALC) = 0.95, p(A4 | GUESS) = 0.55, then EOS.

At alpha = 4 low-temperature sampling picks PLAN with probability 0.165; the power
distribution picks it with probability 0.548, because zeta(PLAN) = 0.95^4 + 0.05^4 ≈ 0.8145
is much larger than zeta(GUESS) = 0.55^4 + 0.45^4 ≈ 0.1325.

``python -m powerfast.evaluation.toy`` (or ``powerfast toy``) prints those numbers and the Monte
Carlo estimates at several M; ``--bias`` prints the measured bias of the plain and the
jackknife estimator on the toy and on two harder synthetic cases.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from powerfast.evaluation import exact
from powerfast.ops.jackknife import torch_power_estimates
from powerfast.runtime.lm import TableLM

__all__ = [
    "PLAN", "GUESS", "CALC", "A4", "A5", "EOS", "BOS", "TOKEN_NAMES", "TOY_PROMPT",
    "DecisionCase", "toy_model", "toy_case", "synthetic_cases",
    "simulate", "bias_table",
]

PLAN, GUESS, CALC, A4, A5, EOS, BOS = range(7)
TOKEN_NAMES = ("PLAN", "GUESS", "CALC", "A4", "A5", "EOS", "BOS")
TOY_LENGTH = 4
"""Longest toy sequence (PLAN CALC A4 EOS)."""
TOY_PROMPT = (BOS,)
"""The prompt to give samplers (which refuse empty prompts); the table ignores a leading BOS."""


def _toy_next_token(prefix: tuple[int, ...]) -> dict[int, float]:
    if prefix[:1] == (BOS,):
        prefix = prefix[1:]
    if prefix == ():
        return {PLAN: 0.4, GUESS: 0.6}
    if prefix == (PLAN,):
        return {CALC: 1.0}
    if prefix == (PLAN, CALC):
        return {A4: 0.95, A5: 0.05}
    if prefix == (GUESS,):
        return {A4: 0.55, A5: 0.45}
    return {EOS: 1.0}  # after an answer, and after EOS (absorbing)


def toy_model() -> TableLM:
    """The PLAN/GUESS model as a :class:`~powerfast.TableLM` (prompt: empty or ``TOY_PROMPT``)."""
    return TableLM(_toy_next_token, vocab_size=len(TOKEN_NAMES), eos_token_id=EOS, token_names=TOKEN_NAMES)


# ------------------------------------------------------------------ decision cases


@dataclass(frozen=True)
class DecisionCase:
    """One decision between K candidates whose futures are known exactly.

    candidate_logprobs: (K,) log p(candidate | prefix)
    rollout_logliks:    K tensors (J_k,), the log-likelihood of every possible rollout
                        of candidate k; a rollout is drawn with probability exp(loglik)
                        (they must sum to 1), as the base model would draw it.
    """

    name: str
    candidate_names: tuple[str, ...]
    candidate_logprobs: torch.Tensor
    rollout_logliks: tuple[torch.Tensor, ...]

    def __post_init__(self) -> None:
        if len(self.rollout_logliks) != self.candidate_logprobs.numel():
            raise ValueError(f"{self.name}: {len(self.rollout_logliks)} rollout laws for {self.candidate_logprobs.numel()} candidates")
        for k, logliks in enumerate(self.rollout_logliks):
            total = float(torch.exp(logliks.double()).sum())
            if abs(total - 1.0) > 1e-9:
                raise ValueError(f"{self.name}: rollout probabilities of candidate {k} sum to {total}, not 1")

    def exact_log_zeta(self, alpha: float) -> torch.Tensor:
        """(K,) exact log zeta = log E[p(rollout)^(alpha - 1)] = log sum_j p_j^alpha."""
        return torch.stack([torch.logsumexp(alpha * l.double(), dim=0) for l in self.rollout_logliks])

    def exact_probs(self, alpha: float) -> torch.Tensor:
        """(K,) exact power distribution over the candidates."""
        return torch.softmax(alpha * self.candidate_logprobs.double() + self.exact_log_zeta(alpha), dim=0)

    def low_temperature_probs(self, alpha: float) -> torch.Tensor:
        """(K,) p^alpha renormalised: low-temperature sampling, zeta == 1."""
        return torch.softmax(alpha * self.candidate_logprobs.double(), dim=0)


def toy_case() -> DecisionCase:
    """The first decision of the toy, PLAN vs GUESS, with futures from exact enumeration."""
    model = toy_model()
    logliks = []
    for token in (PLAN, GUESS):
        _, logprobs = exact.continuations(model, [token], TOY_LENGTH - 1)
        logliks.append(logprobs)
    return DecisionCase("toy", ("PLAN", "GUESS"), torch.tensor([0.4, 0.6], dtype=torch.float64).log(), tuple(logliks))


def _law(*groups: tuple[int, float]) -> torch.Tensor:
    """Rollout log-likelihoods from (count, probability-each) groups."""
    return torch.cat([torch.full((count,), math.log(prob), dtype=torch.float64) for count, prob in groups])


def synthetic_cases() -> list[DecisionCase]:
    """Two decisions harder than the toy: a candidate whose future is mostly one likely
    rollout plus a long tail of unlikely ones, against candidates with flatter futures."""
    return [
        DecisionCase(
            "dominant+tail",
            ("A: 0.6 + 400 x 0.001", "B: 2 x 0.5"),
            torch.tensor([0.5, 0.5], dtype=torch.float64).log(),
            (_law((1, 0.6), (400, 0.001)), _law((2, 0.5))),
        ),
        DecisionCase(
            "rare-heavy",
            ("A: 0.1 + 900 x 0.001", "B: 10 x 0.1", "C: 0.3 + 700 x 0.001"),
            torch.tensor([0.5, 0.2, 0.3], dtype=torch.float64).log(),
            (_law((1, 0.1), (900, 0.001)), _law((10, 0.1)), _law((1, 0.3), (700, 0.001))),
        ),
    ]


# -------------------------------------------------------------------- simulation


def simulate(
    case: DecisionCase,
    alpha: float,
    num_rollouts: int,
    replicates: int,
    seed: int = 0,
    chunk: int = 1 << 16,
    dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw ``replicates`` independent Monte Carlo decisions (M = ``num_rollouts`` rollouts
    per candidate) and return the plain and the jackknife estimates, each (replicates, K)."""
    generator = torch.Generator().manual_seed(seed)
    cumulative = [torch.cumsum(torch.exp(l.double()), 0) for l in case.rollout_logliks]
    plain_parts, jack_parts = [], []
    for start in range(0, replicates, chunk):
        n = min(chunk, replicates - start)
        draws = []
        for cdf, logliks in zip(cumulative, case.rollout_logliks):
            uniform = torch.rand(n, num_rollouts, generator=generator, dtype=torch.float64) * cdf[-1]
            index = torch.searchsorted(cdf, uniform).clamp_max(len(logliks) - 1)
            draws.append(logliks[index])
        rollout_logliks = torch.stack(draws, dim=1).to(dtype)  # (n, K, M)
        candidate_logprobs = case.candidate_logprobs.to(dtype).expand(n, -1)
        jack = torch_power_estimates(candidate_logprobs, rollout_logliks, alpha, jackknife=True)
        plain_parts.append(jack.p_hat)
        jack_parts.append(jack.probs)
    return torch.cat(plain_parts), torch.cat(jack_parts)


@dataclass(frozen=True)
class BiasRow:
    case: str
    num_rollouts: int
    exact: float
    plain_bias: float
    plain_stderr: float
    jackknife_bias: float
    jackknife_stderr: float


def bias_table(
    cases: Sequence[DecisionCase],
    alpha: float = 4.0,
    rollout_counts: Sequence[int] = (2, 4, 8, 16, 32),
    replicates: int = 1 << 20,
    seed: int = 0,
) -> list[BiasRow]:
    """Measured bias E[estimate] - exact of P(first candidate), plain and jackknife."""
    rows = []
    for case in cases:
        target = float(case.exact_probs(alpha)[0])
        for m in rollout_counts:
            plain, jack = simulate(case, alpha, m, replicates, seed=seed + m)
            rows.append(
                BiasRow(
                    case.name, m, target,
                    float(plain[:, 0].mean()) - target, float(plain[:, 0].std()) / math.sqrt(replicates),
                    float(jack[:, 0].mean()) - target, float(jack[:, 0].std()) / math.sqrt(replicates),
                )
            )
    return rows


def format_bias_table(rows: Sequence[BiasRow]) -> str:
    lines = [
        f"{'case':<14} {'M':>3} {'exact P':>8} {'plain bias':>11} {'jackknife bias':>15} {'stderr':>8}  better",
    ]
    for r in rows:
        better = "jackknife" if abs(r.jackknife_bias) < abs(r.plain_bias) else "plain"
        lines.append(
            f"{r.case:<14} {r.num_rollouts:>3} {r.exact:>8.4f} {r.plain_bias:>+11.5f} {r.jackknife_bias:>+15.5f} "
            f"{max(r.plain_stderr, r.jackknife_stderr):>8.5f}  {better}"
        )
    return "\n".join(lines)


def toy_report(alpha: float = 4.0, rollout_counts: Sequence[int] = (2, 4, 8, 16, 64), seeds: int = 2000) -> str:
    """The toy table: low-temperature and exact values, then Monte Carlo estimates by M."""
    model = toy_model()
    pi = exact.power_conditional(model, [], alpha, TOY_LENGTH)
    low_temp = torch.tensor([0.4, 0.6], dtype=torch.float64) ** alpha
    low_temp = low_temp / low_temp.sum()
    zeta_plan = exact.scaling_factor(model, [], PLAN, alpha, TOY_LENGTH)
    zeta_guess = exact.scaling_factor(model, [], GUESS, alpha, TOY_LENGTH)
    lines = [
        f"Toy problem of the paper, alpha = {alpha:g}",
        f"  low-temperature P(PLAN)  {float(low_temp[0]):.4f}",
        f"  power (exact)   P(PLAN)  {float(pi[PLAN]):.4f}",
        f"  zeta(PLAN) = {zeta_plan:.4f}   zeta(GUESS) = {zeta_guess:.4f}",
        "",
        f"Monte Carlo estimates of P(PLAN) over {seeds} seeds (mean ± std)",
        f"  {'M':>3}  {'plain':>17}  {'jackknife':>17}",
    ]
    case = toy_case()
    for m in rollout_counts:
        plain, jack = simulate(case, alpha, m, seeds, seed=m)
        lines.append(
            f"  {m:>3}  {float(plain[:, 0].mean()):.4f} ± {float(plain[:, 0].std()):.4f}"
            f"   {float(jack[:, 0].mean()):.4f} ± {float(jack[:, 0].std()):.4f}"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    if not (math.isfinite(args.alpha) and args.alpha > 1):
        raise SystemExit(f"--alpha must be a finite number > 1, got {args.alpha}")
    if args.seeds < 2 or args.replicates < 2:
        raise SystemExit(f"--seeds and --replicates must be >= 2, got {args.seeds} and {args.replicates}")
    print(toy_report(args.alpha, seeds=args.seeds))
    if args.bias:
        print()
        print(f"Bias of the estimated P(first candidate), alpha = {args.alpha:g}, {args.replicates} replicates per cell")
        print(format_bias_table(bias_table([toy_case(), *synthetic_cases()], args.alpha, replicates=args.replicates)))
    return 0

