"""Every sampler checks its peak KV need before it starts.

``peak_kv_pages`` must be an upper bound of the pages a ``generate`` really holds (the
run is watched through the allocator), and not a loose one: with ``ignore_eos`` every
row decodes its whole budget, so the observed peak comes within a few pages of it. A
pool one page short of the bound is refused before any work, with a ValueError that
says what is needed; a pool of exactly the bound runs.
"""

from __future__ import annotations


import pytest
from conftest import fresh_seed
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from powerfast.core.config import MCMCConfig, PowerConfig, SMCConfig
from powerfast.runtime.cache import KVCacheTooSmallError
from powerfast.runtime.runner import ModelRunner
from powerfast.samplers.factory import make_sampler

SEED = fresh_seed()

SETTINGS = {
    "power-block": dict(method="power", config=PowerConfig(alpha=2.0, block_size=5, num_candidates=4, top_k=3,
                                                                  num_rollouts=2, horizon=7)),
    "power-token": dict(method="power", config=PowerConfig(alpha=2.0, block_size=1, top_k=4, num_rollouts=3,
                                                                  horizon=6)),
    "power-resampled": dict(method="power", config=PowerConfig(alpha=4.0, block_size=5, num_candidates=4, top_k=3,
                                                               num_rollouts=4, horizon=7, rollout_proposal="tempered",
                                                               rollout_resample_every=2, rollout_groups=2)),
    # adaptive budgets: rounds hold one round's rollouts at a time, a skipped decision none
    "power-adaptive": dict(method="power", config=PowerConfig(alpha=2.0, block_size=5, num_candidates=4, top_k=3,
                                                              num_rollouts=4, horizon=7, skip_share=0.9,
                                                              rollouts_per_round=2, round_tolerance=0.01)),
    "power-resampled-rounds": dict(method="power", config=PowerConfig(
        alpha=4.0, block_size=5, num_candidates=4, top_k=3, num_rollouts=8, horizon=7, rollout_proposal="tempered",
        rollout_resample_every=2, rollout_groups=4, rollouts_per_round=4, round_tolerance=0.01)),
    # blocks cut where the next-token entropy is above the tiny model's median (3.454-3.462 nats): a mix
    "power-entropy": dict(method="power", config=PowerConfig(alpha=2.0, block_size=5, num_candidates=4, top_k=3,
                                                             num_rollouts=2, horizon=7, entropy_cut=3.4597)),
    "power-entropy-after": dict(method="power", config=PowerConfig(alpha=2.0, block_size=5, num_candidates=4, top_k=3,
                                                                   num_rollouts=2, horizon=7, entropy_cut=3.4597,
                                                                   entropy_cut_after=2)),
    "mcmc": dict(method="mcmc", config=MCMCConfig(alpha=2.0, block_size=6, mcmc_steps=3)),
    "plain": dict(method="plain"),
    "best-of-n": dict(method="best-of-n", num_samples=5),
    "sir": dict(method="sir", num_samples=5, temperature=0.8),
    # no resampling within the budget, so the particles' pages stay distinct and the bound is reached
    "smc": dict(method="smc", config=SMCConfig(alpha=2.0, num_particles=5, resample_every=64)),
    "smc-resampling": dict(method="smc", config=SMCConfig(alpha=4.0, num_particles=6, resample_every=2,
                                                              ess_threshold=1.0)),
}

# settings whose branches share pages after a while (resampled particles): the bound holds, not tightly
SHARING = {"smc-resampling", "power-resampled"}
# settings that hold fewer rollouts than the bound allows (rounds of M / 2, skipped decisions)
SHARING |= {"power-adaptive", "power-resampled-rounds", "power-entropy"}
# a minimum block length: the bound still takes a 1-token block at every point (a candidate may
# end on EOS sooner), which these cuts never make
SHARING |= {"power-entropy-after"}


def tiny_model(seed: int):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return LlamaForCausalLM(config).eval()


class PeakWatch:
    """Records the most pages in use after each allocation of the runner's cache."""

    def __init__(self, runner: ModelRunner) -> None:
        self.peak = 0
        cache = runner.cache
        append_slots = cache.append_slots

        def watched(seqs, counts):
            slots = append_slots(seqs, counts)
            self.peak = max(self.peak, cache.pages_in_use)
            return slots

        cache.append_slots = watched


@pytest.mark.parametrize("name", list(SETTINGS))
def test_peak_bound_holds_is_tight_and_is_checked_first(name, monkeypatch):
    monkeypatch.setenv("POWERFAST_INTERPRET_OPS", "0")
    model = tiny_model(SEED % 1000)
    prompts = [[1, 2, 3, 4, 5, 6, 7], [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3, 2, 3]]
    max_new = 21
    probe = make_sampler(model=ModelRunner(model, page_size=4, num_pages=1), seed=SEED, **SETTINGS[name])
    bound = probe.peak_kv_pages([len(p) for p in prompts], max_new, 4)

    short = ModelRunner(model, page_size=4, num_pages=bound - 1)
    calls = []
    short.model.register_forward_pre_hook(lambda *a: calls.append(1))
    with pytest.raises(KVCacheTooSmallError) as info:
        make_sampler(model=short, seed=SEED, **SETTINGS[name]).generate(prompts, max_new, ignore_eos=True)
    assert info.value.needed == bound and info.value.num_pages == bound - 1
    assert f"needs up to {bound} pages" in str(info.value) and "\n" not in str(info.value)
    assert not calls and short.cache.pages_in_use == 0  # refused before any forward

    runner = ModelRunner(model, page_size=4, num_pages=bound)
    watch = PeakWatch(runner)
    results = make_sampler(model=runner, seed=SEED, **SETTINGS[name]).generate(prompts, max_new, ignore_eos=True)
    assert [len(r.token_ids) for r in results] == [max_new, max_new]
    assert watch.peak <= bound
    if name not in SHARING:
        assert watch.peak >= bound - 2 * len(prompts) - 2, (watch.peak, bound)  # at most a few copy-on-write pages off
    assert runner.cache.pages_in_use == 0


def test_pages_in_use_by_others_count_against_the_pool():
    model = tiny_model(0)
    runner = ModelRunner(model, page_size=4, num_pages=40)
    sampler = make_sampler("plain", runner, seed=1)
    need = sampler.peak_kv_pages([8], 8, 4)  # 16 positions: 4 pages
    assert need == 4
    held, _ = runner.prefill([list(range(1, 30)) * 5])  # 145 positions: 37 pages held by someone else
    with pytest.raises(KVCacheTooSmallError, match="3 free of 40") as info:
        sampler.generate([list(range(8))], 8)
    assert info.value.least_bytes == (4 + 37) * runner.cache.bytes_per_page
    runner.free(held)
    assert len(sampler.generate([list(range(8))], 8)[0].token_ids) <= 8
