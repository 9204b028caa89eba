"""Our methods on other inference engines (powerfast/DESIGN.md section 10).

``engines.vllm``: the lookahead, Power-SMC, MCMC and the baselines on an unpatched vLLM, through
its public API. An engine here shares the decision rules with our samplers
(``powerfast.decisions``) and never imports our runtime; the engine's own package is imported only
when it is asked for (``--engine vllm``), so an environment without it never imports it.
"""
