"""The lookahead, Power-SMC, MCMC and the baselines on an unpatched vLLM (powerfast/DESIGN.md section 10).

- ``programs``: every method as a program of Draw / Score requests, on the shared decisions
  (no vLLM import; tested without vLLM on exact next-token tables);
- ``engine``: ``VLLMEngine``, which answers them with ``vllm.LLM`` (imports vLLM when built).

``powerfast sample --engine vllm`` and ``VLLMEngine(model).generate(prompts, method, ...)`` take
the same settings as our runtime, validated before vLLM starts; settings that need our
runtime's forks (reuse_rollouts, rollout_resample_every, entropy_cut, SMC's ramp) are refused
naming the field.
"""

__all__ = ["VLLMEngine"]


def __getattr__(name: str):
    if name == "VLLMEngine":
        from powerfast.engines.vllm.engine import VLLMEngine

        return VLLMEngine
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
