"""Every method on one model, fixed seeds: the tokens a tensor-parallel launch must reproduce.

Used twice by tests/test_tensor_parallel.py: in the test's own process (one device, the
reference) and on every rank of a 2-process ``torchrun`` (``python tests/tp_cases.py MODEL
OUT``), each rank writing ``OUT/rank<R>.json``.
"""

import json
import os
import sys

PROMPTS = [[3, 4, 5, 6], [7, 8, 9]]
MAX_NEW = 8
CASES = {
    "plain": dict(method="plain"),
    "low-temp": dict(method="low-temp", alpha=4.0),
    "greedy": dict(method="greedy"),
    "best-of-n": dict(method="best-of-n", num_samples=3),
    "power": dict(method="power", block_size=3, num_candidates=4, top_k=2, num_rollouts=2, horizon=4),
    "power-token": dict(method="power", block_size=1, top_k=3, num_rollouts=2, horizon=3),
    "power-resampled": dict(method="power", block_size=3, num_candidates=4, top_k=2, num_rollouts=4, horizon=4,
                            rollout_proposal="tempered", rollout_resample_every=2, rollout_groups=2),
    "power-adaptive": dict(method="power", block_size=3, num_candidates=4, top_k=2, num_rollouts=4, horizon=4,
                           skip_share=0.99, rollouts_per_round=2, round_tolerance=0.05, entropy_cut=3.2),
    "mcmc": dict(method="mcmc", block_size=4, mcmc_steps=2),
    "smc": dict(method="smc", num_particles=4, resample_every=2),
    "sir": dict(method="sir", num_samples=3, temperature=0.8),
}


def run_cases(model) -> dict:
    """{case: token ids per prompt}, every case on one runner; then the engine with mixed
    requests and an abort: its tokens and the pages left in use."""
    from powerfast.runtime.runner import ModelRunner
    from powerfast.samplers.factory import make_sampler
    from powerfast.serving.engine import Engine
    from powerfast.serving.params import SamplingParams

    runner = ModelRunner(model, page_size=4, num_pages=512)
    out = {}
    for seed, (name, settings) in enumerate(CASES.items()):
        settings = dict(settings)
        method = settings.pop("method")
        results = make_sampler(method, runner, seed=100 + seed, **settings).generate(PROMPTS, MAX_NEW, ignore_eos=True)
        out[name] = [r.token_ids for r in results]
        assert runner.cache.pages_in_use == 0, name

    engine = Engine(ModelRunner(model, page_size=4, num_pages=512))
    requests = {
        "power": engine.add_request(PROMPTS[0], SamplingParams(method="power", max_tokens=6, seed=5, ignore_eos=True,
                                                               block_size=2, num_candidates=3, top_k=2, num_rollouts=2,
                                                               horizon=2)),
        "plain": engine.add_request(PROMPTS[1], SamplingParams(method="plain", max_tokens=7, seed=6, ignore_eos=True)),
        "doomed": engine.add_request(PROMPTS[0], SamplingParams(method="smc", max_tokens=20, seed=7, ignore_eos=True,
                                                                num_particles=3)),
    }
    finals, steps = {}, 0
    while engine.has_unfinished():
        steps += 1
        if steps == 3:
            engine.abort(requests["doomed"])
        for item in engine.step():
            if item.finished:
                finals[item.request_id] = item
    out["engine"] = {name: [finals[rid].finish_reason, finals[rid].token_ids] for name, rid in requests.items()}
    out["engine_pages_in_use"] = engine.cache.pages_in_use

    # the peak-KV check refuses the same request on every rank, before any forward
    from powerfast.runtime.cache import KVCacheTooSmallError

    small = ModelRunner(model, page_size=4, num_pages=6)
    try:
        make_sampler("power", small, seed=1, block_size=3, num_candidates=4, top_k=2, num_rollouts=2,
                     horizon=4).generate(PROMPTS, MAX_NEW, ignore_eos=True)
        out["kv_check"] = "admitted"
    except KVCacheTooSmallError as error:
        out["kv_check"] = [error.needed, error.num_pages, small.cache.pages_in_use]
    return out


def main(model_dir: str, out_dir: str) -> int:
    from powerfast.runtime.models import load_model

    model, _ = load_model(model_dir, tensor_parallel=int(os.environ["WORLD_SIZE"]))
    result = run_cases(model)
    result["tp_size"] = model.tp_size
    from powerfast.runtime import parallel

    # pools sized from different free memory agree on the smallest
    result["agreed_pages"] = parallel.agree_on_pages(100 + int(os.environ["RANK"]), model.device)
    with open(os.path.join(out_dir, f"rank{os.environ['RANK']}.json"), "w") as f:
        json.dump(result, f)
    import torch.distributed as dist

    # end the group before the interpreter does: a rank once aborted at exit in CI ("terminate
    # called without an active exception") with the group's threads still up
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(*sys.argv[1:]))
