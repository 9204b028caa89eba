"""How close each power sampler gets to the exact p^alpha, and for what it costs.

On small random Llama models (vocabulary 4-6, completions of 4-6 tokens, with and without
an EOS token) every completion can be enumerated, so the exact sequence distribution
``p(x)^alpha / Z`` (:func:`powerfast.evaluation.exact.sequence_distribution`) is the ground truth.
Each method draws many complete sequences; the table reports the total-variation distance
between their empirical distribution and the exact one, next to the noise floor (the mean
TV of the same number of draws from the exact distribution itself), and the tokens the
model decoded per returned sequence.

Runtimes: ``tabulated`` (default) runs every sampler unchanged on an
:class:`~powerfast.runtime.lm_runner.LMRunner` over the model's exact next-token tables (computed
once by the network through the paged runner), which is what makes thousands of draws per
cell affordable on a CPU; ``paged`` runs the network itself on the
:class:`~powerfast.runtime.runner.ModelRunner` for every draw (same numbers up to float rounding,
much slower).

``python -m powerfast.evaluation.fidelity`` (or ``powerfast fidelity``) prints the table;
``--zeta-variance`` the variance of log zeta_hat of both rollout proposals on the toy
and the synthetic cases of ``powerfast toy --bias``; ``--rollout-ess`` the rollout ESS of
both proposals on the embedded SmolLM2 model.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from powerfast.evaluation import exact
from powerfast.runtime.lm import TableLM

__all__ = [
    "ModelSpec", "MethodSpec", "FidelityRow", "DEFAULT_MODELS", "random_llama", "tabulate", "method_grid",
    "adaptive_grid",
    "total_variation", "noise_floor", "measure", "format_table", "zeta_variance_rows", "rollout_ess_rows", "main",
]

PROMPT = (0,)


@dataclass(frozen=True)
class ModelSpec:
    """A small random Llama: vocabulary, completion length, EOS (the last id) or none, seed."""

    vocab: int
    num_tokens: int
    eos: bool
    seed: int

    @property
    def name(self) -> str:
        return f"V{self.vocab} T{self.num_tokens} {'EOS' if self.eos else 'no EOS'} seed {self.seed}"

    @property
    def eos_token_id(self) -> int | None:
        return self.vocab - 1 if self.eos else None


EOS_BIAS = -3.0

DEFAULT_MODELS = (ModelSpec(5, 4, True, 0), ModelSpec(4, 5, False, 1))


def random_llama(spec: ModelSpec, sharpen: float = 3.0, eos_bias: float = EOS_BIAS):
    """A 2-layer random LlamaForCausalLM; ``sharpen`` scales the output head (peakier laws,
    so that p^alpha and the low-temperature law differ); with EOS, the head gets a bias of
    ``eos_bias`` on the EOS logit (unbiased, the one-token completion [EOS] would carry
    nearly all of p^alpha: a short sequence is far likelier, and every method would pass)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(spec.seed)
    eos = spec.eos_token_id
    config = LlamaConfig(vocab_size=spec.vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         eos_token_id=eos, bos_token_id=0, pad_token_id=0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(sharpen)
        if eos is not None:
            head = torch.nn.Linear(config.hidden_size, spec.vocab, bias=True)
            head.weight.copy_(model.lm_head.weight)
            head.bias.zero_()
            head.bias[eos] = eos_bias
            model.lm_head = head
    return model


def tabulate(model, spec: ModelSpec, prompt: Sequence[int] = PROMPT) -> TableLM:
    """The model's next-token laws after every prefix a sampler can reach, as a TableLM.

    Computed depth by depth in batches through the paged runner (float32 log-probs,
    renormalised in float64). After an EOS the table continues with EOS; prefixes beyond
    ``num_tokens`` (whose logits a sampler may compute but never samples from) get the
    uniform law.
    """
    from powerfast.runtime.lm import HFLanguageModel

    scorer = HFLanguageModel(model, eos_token_id=spec.eos_token_id, batch_size=512)
    eos = spec.eos_token_id
    tables: dict[tuple[int, ...], dict[int, float]] = {}
    level = [tuple(prompt)]
    for _ in range(spec.num_tokens):
        probs = torch.softmax(scorer.next_token_logprobs([list(p) for p in level]).double(), dim=-1)
        next_level = []
        for prefix, row in zip(level, probs):
            table = {t: float(x) for t, x in enumerate(row.tolist())}
            top = max(table, key=table.get)
            table[top] += 1.0 - sum(table.values())
            tables[prefix] = table
            next_level.extend(prefix + (t,) for t in range(spec.vocab) if t != eos)
        level = next_level
    generated_from = len(prompt)

    def next_token(prefix: tuple[int, ...]) -> dict[int, float]:
        if prefix in tables:
            return tables[prefix]
        if eos is not None and eos in prefix[generated_from:]:
            return {eos: 1.0}
        return {t: 1.0 / spec.vocab for t in range(spec.vocab)}

    return TableLM(next_token, spec.vocab, eos_token_id=eos)


@dataclass(frozen=True)
class MethodSpec:
    """A method at one setting: ``build(runner, seed)`` returns a sampler."""

    method: str
    setting: str
    build: Callable


def adaptive_grid(alpha: float, num_tokens: int, *, rollouts: int = 8, skip_share: float = 0.99,
                  per_round: int = 2, tolerance: float = 0.05, entropy_cut: float = 0.6,
                  block_size: int | None = None) -> list[MethodSpec]:
    """The adaptive budgets against the fixed lookahead they save on: tempered rollouts,
    M = ``rollouts``, rollouts to the end of the budget. Method ``power-adaptive``: token
    level (Top-K = the vocabulary), fixed, skip_share alone, rounds alone, both. Method
    ``power-adaptive-block``: blocks of B = ``block_size`` (default ceil(T / 2)), L = 8
    sampled candidates, K = 4, fixed, each rule alone (entropy_cut too) and all three."""
    from powerfast.samplers.factory import make_sampler

    skip = (f"skip {skip_share:g}", dict(skip_share=skip_share))
    rounds = (f"rounds of {per_round}, tol {tolerance:g}", dict(rollouts_per_round=per_round,
                                                                round_tolerance=tolerance))
    cut = (f"entropy cut {entropy_cut:g}", dict(entropy_cut=entropy_cut))

    def both(*parts):
        return " + ".join(name for name, _ in parts), {k: v for _, extra in parts for k, v in extra.items()}

    block = block_size or max(2, math.ceil(num_tokens / 2))
    families = [("power-adaptive", f"M={rollouts}", dict(block_size=1, top_k=None),
                 [("fixed", {}), skip, rounds, both(skip, rounds)]),
                ("power-adaptive-block", f"B={block} L=8 K=4 M={rollouts}",
                 dict(block_size=block, num_candidates=8, top_k=4),
                 [("fixed", {}), skip, rounds, cut, both(skip, rounds, cut)])]
    grid = []
    for method, prefix, shape, variants in families:
        for name, extra in variants:
            def build(runner, seed, extra=extra, shape=shape):
                settings = dict(shape, top_k=shape["top_k"] or runner.vocab_size)
                return make_sampler("power", runner, seed=seed, alpha=alpha, num_rollouts=rollouts,
                                    horizon=num_tokens, rollout_proposal="tempered", **settings, **extra)

            grid.append(MethodSpec(method, f"{prefix} {name}", build))
    return grid


def candidate_grid(alpha: float, num_tokens: int, *, candidates: Sequence[int] = (2, 4, 8), top_k: int = 2,
                   rollouts: int = 8, block_size: int | None = None) -> list[MethodSpec]:
    """Block-level lookahead with base against tempered candidate proposals at equal L and K:
    methods ``power-candidates-base`` and ``power-candidates-tempered``, blocks of
    B = ``block_size`` (default ceil(T / 2)), L in ``candidates``, K = min(``top_k``, L), M =
    ``rollouts`` tempered rollouts to the end of the budget (the rollouts are the same in
    both: only the candidate set differs, powerfast/DESIGN.md section 2)."""
    from powerfast.samplers.factory import make_sampler

    block = block_size or max(2, math.ceil(num_tokens / 2))
    grid = []
    for proposal in ("base", "tempered"):
        for num in candidates:
            k = min(top_k, num)

            def build(runner, seed, num=num, k=k, proposal=proposal):
                return make_sampler("power", runner, seed=seed, alpha=alpha, block_size=block, num_candidates=num,
                                    top_k=k, num_rollouts=rollouts, horizon=num_tokens, rollout_proposal="tempered",
                                    candidate_proposal=proposal)

            grid.append(MethodSpec(f"power-candidates-{proposal}", f"B={block} L={num} K={k} M={rollouts}", build))
    return grid


def method_grid(alpha: float, num_tokens: int, *, mcmc_steps=(2, 8, 32), rollouts=(2, 4, 8, 16),
                particles=(8, 32, 128), sir_samples=(8, 64), include: Sequence[str] | None = None,
                adaptive: dict | None = None, candidates: dict | None = None) -> list[MethodSpec]:
    """The methods of the table. Power sampling is token level (Top-K = the vocabulary) with
    rollouts to the end of the budget; MCMC appends blocks of ceil(T / 2) tokens; SMC
    checks the ESS after every token (with the default of 16 it would never resample
    within a few tokens); sir reweights N = ``sir_samples`` plain samples (T = 1), consistent
    only as N grows: its TV at small N is its finite-N bias. ``adaptive`` (the keywords of
    :func:`adaptive_grid`, ``{}`` for its defaults) adds the adaptive budgets; ``candidates`` (the keywords of
    :func:`candidate_grid`) the block level's base and tempered candidate proposals."""
    from powerfast.samplers.factory import make_sampler

    def sampler(method: str, **settings):
        return lambda runner, seed: make_sampler(method, runner, seed=seed, **settings)

    grid = [MethodSpec("plain", "T=1", sampler("plain")),
            MethodSpec("low-temp", f"T=1/{alpha:g}", sampler("low-temp", alpha=alpha))]
    block = max(1, math.ceil(num_tokens / 2))
    for steps in mcmc_steps:
        grid.append(MethodSpec("mcmc", f"N_MCMC={steps}", sampler("mcmc", alpha=alpha, block_size=block,
                                                                   mcmc_steps=steps)))
    for proposal in ("base", "tempered"):
        for reuse in (False, True):
            for m in rollouts:
                def build(runner, seed, m=m, proposal=proposal, reuse=reuse):  # Top-K: the whole vocabulary
                    return make_sampler("power", runner, seed=seed, alpha=alpha, block_size=1, top_k=runner.vocab_size,
                                        num_rollouts=m, horizon=num_tokens, jackknife=m >= 2,
                                        rollout_proposal=proposal, reuse_rollouts=reuse)

                name = f"power-{proposal}" + ("+reuse" if reuse else "")
                grid.append(MethodSpec(name, f"M={m}", build))
    for m in rollouts:  # tempered rollouts resampled every 2 tokens in 2 independent groups
        if m >= 4 and m % 2 == 0:
            def resampled(runner, seed, m=m):
                return make_sampler("power", runner, seed=seed, alpha=alpha, block_size=1, top_k=runner.vocab_size,
                                    num_rollouts=m, horizon=num_tokens, rollout_proposal="tempered",
                                    rollout_resample_every=2, rollout_groups=2)

            grid.append(MethodSpec("power-resampled", f"M={m}, R=2, G=2", resampled))
    for n in particles:
        grid.append(MethodSpec("smc", f"N={n}", sampler("smc", alpha=alpha, num_particles=n, resample_every=1)))
    for n in sir_samples:
        grid.append(MethodSpec("sir", f"N={n}", sampler("sir", alpha=alpha, num_samples=n)))
    if adaptive:
        grid.extend(adaptive_grid(alpha, num_tokens, **adaptive))
    if candidates is not None:
        grid.extend(candidate_grid(alpha, num_tokens, **candidates))
    if include:
        grid = [m for m in grid if any(m.method == name or m.method.startswith(name + "-") or
                                       f"{m.method} {m.setting}" == name for name in include)]
    return grid


def total_variation(samples: Sequence[tuple[int, ...]], support: Sequence[tuple[int, ...]], probs: torch.Tensor) -> float:
    """TV between the empirical law of ``samples`` and ``probs`` over ``support``."""
    counts = Counter(samples)
    n = len(samples)
    target = dict(zip(support, probs.tolist()))
    keys = set(counts) | set(target)
    return 0.5 * sum(abs(counts.get(k, 0) / n - target.get(k, 0.0)) for k in keys)


def noise_floor(probs: torch.Tensor, draws: int, repeats: int = 50, seed: int = 0) -> float:
    """Mean TV of ``draws`` exact draws to the exact law: the best any sampler can show."""
    generator = torch.Generator().manual_seed(seed)
    total = 0.0
    for _ in range(repeats):
        counts = torch.multinomial(probs, draws, replacement=True, generator=generator).bincount(minlength=probs.numel())
        total += 0.5 * float((counts.double() / draws - probs).abs().sum())
    return total / repeats


@dataclass(frozen=True)
class FidelityRow:
    model: str
    alpha: float
    method: str
    setting: str
    draws: int
    tv: float
    noise_floor: float
    tokens_per_sequence: float
    seconds: float
    forwards_per_sequence: float = 0.0


def measure(spec: ModelSpec, alpha: float, methods: Sequence[MethodSpec], draws: int, *, seed: int = 0,
            runtime: str = "tabulated", batch: int = 250, progress: Callable[[str], None] | None = None,
            forward_draws: int = 20) -> list[FidelityRow]:
    """TV to the exact p^alpha of ``draws`` sequences from each method, on one model, and
    the mean model forwards of ``forward_draws`` more sequences generated one at a time
    (sequential forwards: what bounds a sequence's latency on a GPU)."""
    from powerfast.runtime.lm_runner import LMRunner
    from powerfast.runtime.runner import ModelRunner

    if runtime not in ("tabulated", "paged"):
        raise ValueError(f"runtime must be 'tabulated' or 'paged', got {runtime!r}")
    model = random_llama(spec)
    table = tabulate(model, spec)
    support, probs = exact.sequence_distribution(table, PROMPT, alpha, spec.num_tokens)
    floor = noise_floor(probs, draws, seed=seed)
    runner = LMRunner(table) if runtime == "tabulated" else ModelRunner(model)
    rows = []
    for index, method in enumerate(methods):
        sampler = method.build(runner, seed * 1000 + index)
        started = time.perf_counter()
        samples, tokens = [], 0
        for start in range(0, draws, batch):
            results = sampler.generate([list(PROMPT)] * min(batch, draws - start), spec.num_tokens)
            samples.extend(tuple(r.token_ids) for r in results)
            tokens += sum(r.stats.tokens_total for r in results)
        # sequential forwards of one sequence alone (a batch's forwards are its slowest member's)
        alone = [sampler.generate([list(PROMPT)], spec.num_tokens)[0] for _ in range(min(draws, forward_draws))]
        leaked = runner.live_sequences if runtime == "tabulated" else runner.cache.pages_in_use
        if leaked:
            raise RuntimeError(f"{method.method} {method.setting} left {leaked} sequences / pages in use")
        row = FidelityRow(spec.name, alpha, method.method, method.setting, draws,
                          total_variation(samples, support, probs), floor, tokens / draws,
                          time.perf_counter() - started,
                          sum(r.stats.num_forwards for r in alone) / max(1, len(alone)))
        rows.append(row)
        if progress is not None:
            progress(f"{row.model} alpha {alpha:g} {row.method} {row.setting}: TV {row.tv:.3f} "
                     f"(floor {row.noise_floor:.3f}) {row.seconds:.1f} s")
    return rows


def format_table(rows: Sequence[FidelityRow]) -> str:
    """A markdown table, one line per (model, alpha, method, setting)."""
    lines = ["| model | alpha | method | setting | draws | TV to exact | noise floor | TV / floor | tokens / seq "
             "| forwards / seq |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.model} | {r.alpha:g} | {r.method} | {r.setting} | {r.draws} | {r.tv:.3f} | "
                     f"{r.noise_floor:.3f} | {r.tv / r.noise_floor:.2f} | {r.tokens_per_sequence:.1f} | "
                     f"{r.forwards_per_sequence:.1f} |")
    return "\n".join(lines)


# ------------------------------------------------------ variance of log zeta_hat


def zeta_variance_rows(alpha: float = 4.0, rollout_counts: Sequence[int] = (1, 2, 4, 8, 16),
                       replicates: int = 20000, seed: int = 0) -> list[tuple[str, str, int, float, float, float]]:
    """Variance of log zeta_hat per candidate, base vs tempered proposal, on the toy and the
    synthetic cases of ``powerfast toy --bias``.

    Their futures are one draw from a known law (p_j over the possible rollouts): the base
    proposal draws j ~ p with weight p_j^(alpha - 1); the tempered one draws j ~ p^alpha / c
    with weight c = sum_j p_j^alpha. returns rows (case, candidate, M, exact log zeta,
    variance base, variance tempered).
    """
    from powerfast.evaluation import toy

    generator = torch.Generator().manual_seed(seed)
    rows = []
    for case in [toy.toy_case(), *toy.synthetic_cases()]:
        for name, logliks in zip(case.candidate_names, case.rollout_logliks):
            logliks = logliks.double()
            log_c = float(torch.logsumexp(alpha * logliks, 0))
            tempered_law = torch.softmax(alpha * logliks, 0)
            for m in rollout_counts:
                base_draws = torch.multinomial(torch.exp(logliks), replicates * m, replacement=True,
                                               generator=generator).view(replicates, m)
                base = torch.logsumexp((alpha - 1) * logliks[base_draws], -1) - math.log(m)
                tempered_draws = torch.multinomial(tempered_law, replicates * m, replacement=True,
                                                   generator=generator).view(replicates, m)
                tempered = torch.logsumexp(torch.full(tempered_draws.shape, log_c, dtype=torch.float64), -1) - math.log(m)
                rows.append((case.name, name.split(":")[0], m, log_c, float(base.var()), float(tempered.var())))
    return rows


def format_zeta_variance(rows) -> str:
    lines = ["| case | candidate | M | exact log zeta | var log zeta_hat, base | var, tempered |",
             "|---|---|---|---|---|---|"]
    for case, name, m, log_zeta, base, tempered in rows:
        lines.append(f"| {case} | {name} | {m} | {log_zeta:.3f} | {base:.4f} | {tempered:.4f} |")
    return "\n".join(lines)


# ------------------------------------------------- rollout ESS on a real model


def rollout_ess_rows(horizons: Sequence[int] = (32, 64, 192), *, model_path: str | None = None, alpha: float = 4.0,
                     top_k: int = 4, num_rollouts: int = 16, seed: int = 0,
                     prompt: str = "What is the sum of the first ten odd numbers? Answer briefly.",
                     progress: Callable[[str], None] | None = None, proposals: Sequence[str] = ("base", "tempered"),
                     kv_memory_mib: int = 2048) -> list[tuple]:
    """Rollout ESS (of M) and log zeta of the Top-K first tokens, per proposal and horizon,
    on the embedded SmolLM2-135M-Instruct (or ``model_path``), with a KV pool of
    ``kv_memory_mib`` (K x M rollouts of H tokens must fit). returns rows (proposal, H,
    [ESS per candidate], [log zeta per candidate], seconds)."""
    from powerfast.runtime.models import load_model
    from powerfast.runtime.runner import ModelRunner
    from powerfast.samplers.factory import make_sampler

    model, tokenizer = load_model(model_path)
    runner = ModelRunner(model, max_memory=kv_memory_mib << 20)
    rows = []
    for horizon in horizons:
        for proposal in proposals:
            sampler = make_sampler("power", runner, tokenizer, seed=seed, alpha=alpha, block_size=1, top_k=top_k,
                                   num_rollouts=num_rollouts, horizon=horizon, rollout_proposal=proposal)
            started = time.perf_counter()
            [record] = sampler.decisions([prompt], horizon + 1, ignore_eos=True)
            rows.append((proposal, horizon, record.rollout_ess, record.log_zeta, time.perf_counter() - started))
            if progress is not None:
                progress(format_rollout_ess(rows[-1:]).splitlines()[-1])
    return rows


def format_rollout_ess(rows) -> str:
    lines = ["| proposal | H | rollout ESS of each candidate (of M) | log zeta_hat of each | seconds |",
             "|---|---|---|---|---|"]
    for proposal, horizon, ess, log_zeta, seconds in rows:
        lines.append(f"| {proposal} | {horizon} | {', '.join(f'{e:.2f}' for e in ess)} | "
                     f"{', '.join(f'{z:.1f}' for z in log_zeta)} | {seconds:.0f} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------ command


def _ints(text: str, flag: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{flag} wants comma-separated integers, got {text!r}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--draws", type=int, default=400, help="sequences per method and model (default 400)")
    parser.add_argument("--alphas", default="4", help="comma-separated exponents (default 4)")
    parser.add_argument("--models", default=None,
                        help="comma-separated V:T:eos|noeos:seed specs (default 5:4:eos:0,4:5:noeos:1)")
    parser.add_argument("--methods", default=None,
                        help="comma-separated method names to keep (plain, low-temp, mcmc, power, power-tempered, "
                             "power-base+reuse, power-resampled, smc, sir, ...; default all)")
    parser.add_argument("--mcmc-steps", default="2,8,32", help="N_MCMC values (default 2,8,32)")
    parser.add_argument("--rollouts", default="2,4,8,16", help="M values of power sampling (default 2,4,8,16)")
    parser.add_argument("--particles", default="8,32,128", help="N values of SMC (default 8,32,128)")
    parser.add_argument("--sir-samples", default="8,64", help="N values of sir (default 8,64)")
    parser.add_argument("--runtime", default="tabulated", choices=["tabulated", "paged"],
                        help="tabulated next-token laws (default) or the network on the paged runner")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--zeta-variance", action="store_true",
                        help="also print the variance of log zeta_hat, base vs tempered, on the toy cases")
    parser.add_argument("--rollout-ess", default=None, metavar="H,...",
                        help="also measure the rollout ESS of both proposals on the embedded model at these horizons")
    parser.add_argument("--rollout-proposals", default="base,tempered",
                        help="proposals of --rollout-ess (default base,tempered)")
    parser.add_argument("--no-table", action="store_true", help="skip the fidelity table itself")
    parser.add_argument("--adaptive", action="store_true",
                        help="add the adaptive budgets to the table (tempered rollouts; power-adaptive: token "
                             "level, fixed / skip / rounds / both; power-adaptive-block: blocks of ceil(T / 2), "
                             "fixed / skip / rounds / entropy cut / all)")
    parser.add_argument("--adaptive-rollouts", type=int, default=8, help="M of --adaptive (default 8)")
    parser.add_argument("--adaptive-skip", type=float, default=0.99, help="skip_share of --adaptive (default 0.99)")
    parser.add_argument("--adaptive-per-round", type=int, default=2,
                        help="rollouts_per_round of --adaptive (default 2)")
    parser.add_argument("--adaptive-tolerance", type=float, default=0.05,
                        help="round_tolerance of --adaptive (default 0.05)")
    parser.add_argument("--adaptive-entropy", type=float, default=0.6,
                        help="entropy_cut (nats) of --adaptive's block-level rows (default 0.6)")
    parser.add_argument("--candidate-proposals", default=None, metavar="L,...",
                        help="add block-level rows with base and tempered candidate proposals at these L "
                             "(K = min(2, L), B = ceil(T / 2), M = 8 tempered rollouts), e.g. 2,4,8")


def _parse_model(text: str) -> ModelSpec:
    try:
        vocab, num_tokens, eos, seed = text.split(":")
        if eos not in ("eos", "noeos"):
            raise ValueError
        return ModelSpec(int(vocab), int(num_tokens), eos == "eos", int(seed))
    except ValueError:
        raise ValueError(f"--models wants V:T:eos|noeos:seed items, got {text!r}") from None


def run(args: argparse.Namespace) -> int:
    if args.draws < 1:
        raise ValueError(f"--draws must be >= 1, got {args.draws}")
    if not args.no_table:
        models = [_parse_model(m) for m in args.models.split(",")] if args.models else list(DEFAULT_MODELS)
        alphas = [float(a) for a in args.alphas.split(",") if a.strip()]
        include = [m.strip() for m in args.methods.split(",")] if args.methods else None
        rows = []
        for spec in models:
            for alpha in alphas:
                adaptive = (dict(rollouts=args.adaptive_rollouts, skip_share=args.adaptive_skip,
                                 per_round=args.adaptive_per_round, tolerance=args.adaptive_tolerance,
                                 entropy_cut=args.adaptive_entropy)
                            if args.adaptive else None)
                candidates = (dict(candidates=_ints(args.candidate_proposals, "--candidate-proposals"))
                              if args.candidate_proposals else None)
                grid = method_grid(alpha, spec.num_tokens, mcmc_steps=_ints(args.mcmc_steps, "--mcmc-steps"),
                                   rollouts=_ints(args.rollouts, "--rollouts"),
                                   particles=_ints(args.particles, "--particles"),
                                   sir_samples=_ints(args.sir_samples, "--sir-samples"), include=include,
                                   adaptive=adaptive, candidates=candidates)
                rows.extend(measure(spec, alpha, grid, args.draws, seed=args.seed, runtime=args.runtime,
                                    progress=lambda line: print(line, file=sys.stderr, flush=True)))
        print(format_table(rows))
    if args.zeta_variance:
        print()
        print(format_zeta_variance(zeta_variance_rows()))
    if args.rollout_ess:
        print()
        proposals = [p.strip() for p in args.rollout_proposals.split(",") if p.strip()]
        horizons = _ints(args.rollout_ess, "--rollout-ess")
        print(format_rollout_ess(rollout_ess_rows(horizons, seed=args.seed, proposals=proposals,
                                                  progress=lambda line: print(line, file=sys.stderr, flush=True))))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="powerfast fidelity", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
