"""The Metropolis-Hastings power sampler of Karan & Du on the runtime. A proposal forks the
current sequence at the resampling position: the shared prefix is never recomputed."""

from __future__ import annotations

import time

from powerfast.core.config import MCMCConfig
from powerfast.decisions.mcmc import accept, log_acceptance
from powerfast.samplers.base import RunnerSampler, appended_pages, pages_for
from powerfast.samplers.decoding import continuations_program, nan_flag, phase, raise_on_nan, to_host
from powerfast.samplers.program import Decode, Prefill
from powerfast.samplers.results import GenerationStats

__all__ = ["MCMCSampler"]


class MCMCSampler(RunnerSampler):
    """Metropolis-Hastings power sampling (Karan & Du, "Reasoning with Sampling").

    After every block of B tokens drawn from the proposal q = p at temperature 1/alpha,
    ``mcmc_steps`` MH steps each pick a position m uniformly in the generated part,
    resample the suffix from m with q, and accept with

        log A = alpha * (log p(x') - log p(x)) + log q(x) - log q(x')

    (sums over the resampled suffix). A proposal forks the sequence at m; the prompts of
    a batch run their blocks together and their MH steps one after another.
    """

    method = "mcmc"

    def __init__(self, model, tokenizer=None, config: MCMCConfig | None = None, seed: int | None = None,
                 **runner_kwargs) -> None:
        self.config = config if config is not None else MCMCConfig()
        if not isinstance(self.config, MCMCConfig):
            raise ValueError(f"config must be an MCMCConfig, got {type(self.config).__name__}")
        super().__init__(model, tokenizer, seed, **runner_kwargs)

    def program(self, prompt_ids: list[list[int]], max_new_tokens: int, eos: tuple[int, ...], progress=None,
                stream: bool = False):
        """MH power sampling of a completion per prompt (a step program). Blocks and MH rounds
        run batched over the open prompts; ``stats.acceptance_rate`` reports accepted /
        proposed. A later MH step can rewrite any generated token: nothing is final before
        the end, so ``stream`` yields nothing."""
        started = time.perf_counter()
        chains = [_Chain(ids) for ids in prompt_ids]
        stats = [GenerationStats(self.method) for _ in prompt_ids]
        live: list = []
        try:
            with phase("prefill"):
                seqs, logits = yield Prefill(prompt_ids)
            live.extend(seqs)
            for chain, seq, stat in zip(chains, seqs, stats):
                chain.seq = seq
                stat.add("prefill", len(chain.prompt))
            open_chains = list(range(len(chains)))
            block_end = 0  # generated tokens up to the end of the current block
            while open_chains:
                if logits is None:  # the chains' next-token logits after the last MH round
                    with phase("fork"):
                        logits = yield from self._next_token_logits([chains[i] for i in open_chains], live)
                    for i in open_chains:
                        stats[i].add("refresh", 1)
                block = min(self.config.block_size, max_new_tokens - block_end)  # open chains reach block_end
                with phase("candidates"):
                    out = yield from continuations_program(
                        [chains[i].seq for i in open_chains], logits, block, self.seeds,
                        temperature=1.0 / self.config.alpha, eos_token_id=eos, per_token=True,
                    )
                tokens, logp, logq, lengths, nan = to_host(out.tokens, out.token_logprobs, out.token_tempered,
                                                           out.lengths, nan_flag(out.base_logliks))  # one copy
                raise_on_nan(nan, "MCMC")
                lengths = lengths.tolist()
                for row, i in enumerate(open_chains):
                    n = lengths[row]
                    chains[i].extend(tokens[row, :n].tolist(), logp[row, :n].tolist(), logq[row, :n].tolist())
                    stats[i].add("sample", n)
                    stats[i].num_blocks += 1
                block_end += block
                for _ in range(self.config.mcmc_steps):
                    with phase("mcmc-step"):
                        yield from self._mh_round([chains[i] for i in open_chains], [stats[i] for i in open_chains],
                                       block_end, eos, live)
                logits = None
                open_chains = [i for i in open_chains
                               if not chains[i].ended(eos) and len(chains[i].tokens) < max_new_tokens]
                if progress is not None:
                    progress(max(len(c.tokens) for c in chains), max_new_tokens)
        finally:
            self.runner.free(live)
        elapsed = time.perf_counter() - started
        results = []
        for chain, stat in zip(chains, stats):
            stat.wall_seconds = elapsed
            stat.acceptance_rate = chain.accepted / chain.proposed if chain.proposed else None
            results.append(self.result(chain.tokens, stat, float(sum(chain.logp))))
        return results

    def peak_kv_pages(self, prompt_lengths: list[int], max_new_tokens: int, page_size: int) -> int:
        """Most KV pages a ``generate`` holds: per prompt, the chain of the whole budget and
        one proposal forked from as early as the prompt's last position."""
        return sum(pages_for(length + max_new_tokens, page_size)
                   + appended_pages(length - 1, max_new_tokens + 1, page_size) for length in prompt_lengths)

    def _next_token_logits(self, chains: list[_Chain], live: list):
        """(Step program returning) the (N, V) next-token logits of each chain's sequence: fork it one token short and
        decode its last token again (the runner returns logits only for new tokens)."""
        children = []
        for chain in chains:
            [child] = self.runner.fork(chain.seq, 1, length=chain.length - 1)
            live.append(child)
            children.append(child)
        last = [chain.token_at(chain.length - 1) for chain in chains]  # the runner uploads them, no sync
        logits = yield Decode(children, last)
        for chain, child in zip(chains, children):
            self._replace(chain, child, live)
        return logits

    def _mh_round(self, chains: list[_Chain], stats: list[GenerationStats], block_end: int, eos, live: list):
        """One MH step for every chain, the proposals decoded as one batch (a step program).

        A proposal resamples from m up to the end of the current block (``block_end``
        generated tokens) or to EOS, whatever the current sequence's length: a chain
        that ended early can grow back, so moves between lengths are reversible.
        """
        alpha = self.config.alpha
        starts = [self.seeds.integers(len(chain.tokens)) for chain in chains]  # m, in generated positions
        children = []
        for chain, m in zip(chains, starts):
            [child] = self.runner.fork(chain.seq, 1, length=len(chain.prompt) + m - 1)
            live.append(child)
            children.append(child)
        fed = [chain.token_at(len(chain.prompt) + m - 1) for chain, m in zip(chains, starts)]  # uploaded, no sync
        logits = yield Decode(children, fed)
        wanted = [block_end - m for m in starts]
        proposal = yield from continuations_program(children, logits, max(wanted), self.seeds,
                                                    temperature=1.0 / alpha, eos_token_id=eos, per_token=True)
        tokens, logp, logq, lengths, nan = to_host(proposal.tokens, proposal.token_logprobs, proposal.token_tempered,
                                                   proposal.lengths, nan_flag(proposal.base_logliks))  # one copy
        raise_on_nan(nan, "MCMC")
        lengths = lengths.tolist()
        for row, (chain, m, child, stat) in enumerate(zip(chains, starts, children, stats)):
            n = min(lengths[row], wanted[row])  # the resampled suffix: to the block's end, or to EOS
            stat.add("proposals", n + 1)
            new_logp, new_logq = logp[row, :n].tolist(), logq[row, :n].tolist()
            log_accept = log_acceptance(alpha, new_logp, new_logq, chain.logp[m:], chain.logq[m:])
            chain.proposed += 1
            if accept(log_accept, self.seeds.uniform()):
                chain.accepted += 1
                chain.truncate(m)
                chain.extend(tokens[row, :n].tolist(), new_logp, new_logq)
                # the child decoded up to max(wanted) tokens: keep the KV of the accepted ones
                [kept] = self.runner.fork(child, 1, length=chain.length - 1)
                live.append(kept)
                self._drop(child, live)
                self._replace(chain, kept, live)
            else:
                self._drop(child, live)

    def _replace(self, chain: _Chain, seq, live: list) -> None:
        self._drop(chain.seq, live)
        chain.seq = seq

    def _drop(self, seq, live: list) -> None:
        self.runner.free([seq])
        live.remove(seq)


class _Chain:
    """One prompt's MCMC state: the generated tokens with their base and proposal
    log-probs, and the runner sequence. Between rounds the sequence holds the KV of at
    least the first ``length - 1`` positions (the last token may be pending), so every
    fork cuts at ``length - 1`` or earlier; before a block is appended it holds exactly
    ``length`` (see ``_next_token_logits``)."""

    def __init__(self, prompt: list[int]) -> None:
        self.prompt = prompt
        self.tokens: list[int] = []
        self.logp: list[float] = []
        self.logq: list[float] = []
        self.seq = None
        self.accepted = 0
        self.proposed = 0

    @property
    def length(self) -> int:
        return len(self.prompt) + len(self.tokens)

    def token_at(self, position: int) -> int:
        return self.prompt[position] if position < len(self.prompt) else self.tokens[position - len(self.prompt)]

    def extend(self, tokens: list[int], logp: list[float], logq: list[float]) -> None:
        self.tokens += tokens
        self.logp += logp
        self.logq += logq

    def truncate(self, generated: int) -> None:
        del self.tokens[generated:], self.logp[generated:], self.logq[generated:]

    def ended(self, eos: tuple[int, ...]) -> bool:
        """Whether the last token is one of the ``eos`` ids."""
        return bool(self.tokens) and self.tokens[-1] in eos
