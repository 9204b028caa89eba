"""Finished studies and their runners, outside the installed package.

- :mod:`bench.lab.study`: named arms of ``powerfast eval`` on one task, compute-matched
  best-of-N and sir, one comparison (specs ``bench/study_*.json``, records ``bench/studies/``);
- :mod:`bench.lab.horizon_study`: the spread of log zeta_hat per estimator, horizon H and
  rollouts M on the embedded model (``bench/horizon_study.jsonl``);
- :mod:`bench.lab.adaptive`: what each adaptive rollout budget saves, in counts;
- :mod:`bench.lab.score_completions`: log p(completion | prompt) of every record of an arm.

Each runs as ``python -m bench.lab.<name>`` from the repository root.
"""
