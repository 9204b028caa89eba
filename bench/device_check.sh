#!/usr/bin/env bash
# One script for a GPU machine (no network): correctness, then timings. Later sections
# (runtime, end-to-end) append below the kernel section. Full results go under $OUT
# (./out if unset); a short table is printed last.
set -uo pipefail
cd "$(dirname "$0")/.."
pip install -q -e . --no-deps --no-build-isolation
OUT="${OUT:-./out}"
export OUT
mkdir -p "$OUT/kernels" "$OUT/runner"
status=0

# ---------------------------------------------------------------------------- kernels
echo "== kernel correctness (cuda-marked tests)"
timeout -k 10 180 python -m pytest -q -p no:cacheprovider -m cuda \
    tests/test_ops_sampling.py tests/test_ops_jackknife.py tests/test_ops_topk.py tests/test_ops_kv.py \
    tests/test_paged_attention.py tests/test_runner.py \
    > "$OUT/kernels/tests.txt" 2>&1 || status=1
tail -n 3 "$OUT/kernels/tests.txt"

echo "== kernel timings"
timeout 300 python bench/device_kernels.py --out "$OUT/kernels" > "$OUT/kernels/table.txt" 2> "$OUT/kernels/timings.log" || status=1

# ----------------------------------------------------------------------------- runtime
# Runner vs model.generate: decode throughput and KV memory at batch 1 and at batch 64 over
# a shared 1,000-token prefix (Qwen2.5-1.5B shapes, random weights, bf16), after a check of
# the runner's logits against the dense forward.
echo "== runtime (runner vs model.generate)"
timeout 150 python bench/device_runner.py --out "$OUT/runner" > "$OUT/runner/table.txt" 2> "$OUT/runner/runner.log" || status=1
tail -n 2 "$OUT/runner/runner.log"

# -------------------------------------------------------------------------- end-to-end
# Qwen2.5-1.5B configuration, random weights, bf16, EOS ignored, paper settings (alpha 4,
# K = M = 8, B = H = 192, L = 32, N_MCMC = 10). Cases in priority order: a method projected
# past the budget (its decode steps x plain's seconds per step) is skipped and listed.
#   768: model.generate, plain, power          -> power/plain, plain/hf-generate
#   384: plain, power, mcmc, recompute-mcmc    -> mcmc/power, recompute-mcmc/mcmc
#   768: low-temp, best-of-n, mcmc              (mcmc/power at 768 when it fits)
#   3072: plain, power                          only with E2E_LONG=1
# The whole script stays under ~8 minutes: the budget is what is left of SCRIPT_BUDGET_S.
echo "== end-to-end (Qwen2.5-1.5B shapes)"
mkdir -p "$OUT/e2e"
e2e_budget=$(( ${SCRIPT_BUDGET_S:-450} - SECONDS - 60 ))
(( e2e_budget > ${E2E_BUDGET_S:-270} )) && e2e_budget=${E2E_BUDGET_S:-270}
e2e_cases=(--case 768:hf-generate,plain,power --case 384:plain,power,mcmc,recompute-mcmc
           --case 768:low-temp,best-of-n,mcmc)
[[ "${E2E_LONG:-0}" == 1 ]] && e2e_cases+=(--case 3072:plain,power)
if (( e2e_budget >= 60 )); then
    timeout -k 20 $(( e2e_budget + 90 )) python bench/e2e.py --model qwen2.5-1.5b "${e2e_cases[@]}" \
        --num-prompts 1 --prompt-len 128 --reps 1 --kv-memory-mib 16384 --budget-s "$e2e_budget" \
        --out "$OUT/e2e" > "$OUT/e2e/table.out" 2> "$OUT/e2e/e2e.log" || status=1
    tail -n 2 "$OUT/e2e/e2e.log"
else
    echo "skipped: ${e2e_budget} s left of the script's budget" | tee "$OUT/e2e/table.out"
fi

# ------------------------------------------------------------------------------ summary
echo
echo "== kernels (full results: $OUT/kernels)"
cat "$OUT/kernels/table.txt"
echo
echo "== runtime (full results: $OUT/runner)"
cat "$OUT/runner/table.txt"
echo
echo "== end-to-end (full results: $OUT/e2e; ${SECONDS} s in all)"
cat "$OUT/e2e/table.out"
exit $status
