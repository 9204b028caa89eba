#!/usr/bin/env bash
# The one script for a GPU machine (no network), in stages, each with its own time limit:
#
#   tests    cuda-marked tests (kernels, runner, Triton variants)   150 s
#   kernels  kernel timings (bench/device_kernels.py)                 90 s
#   runtime  runner vs model.generate (bench/device_runner.py)        90 s
#   decode   decode step eager vs graphs (bench/device_decode.py)      75 s
#   engine   continuous batching vs one call at a time (bench/device_engine.py)  60 s
#   e2e      end to end, Qwen2.5-1.5B shapes (bench/e2e.py)           what is left
#   tp       2-way tensor parallel vs one GPU, every method's tokens (bench/device_tp.py)
#            90 s; "skipped: 1 GPU" on a machine with one
#
# All of it fits in SCRIPT_BUDGET_S (480 s: one 600-s call with room to spare). Each stage
# prints its table as soon as it finishes, then a line "-- NAME: STATUS, S s of LIMIT s".
# What comes back under $OUT (./out if unset), three files, none in a folder:
#   table.txt     every stage's table and status line, in order (what is printed)
#   results.json  every number: {"stages": {NAME: {"status", "seconds", "limit_s", "results"}}}
#   log.txt       stderr of every stage and the whole pytest log (FAILED / ERROR lines too)
#
#   OUT=dir bash bench/device_check.sh                 # GPU machine: python3 with torch
#   SMOKE=1 OUT=dir bash bench/device_check.sh         # CPU: every stage on tiny shapes, ~1-2 min
#   PYTHON=.venv/bin/python SMOKE=1 OUT=dir bash bench/device_check.sh
#
# SMOKE=1 runs the same stages on a machine without a GPU (kernels under the interpreter,
# a tiny random Llama for runtime and end-to-end) and fails unless every stage finished
# ok, printed its table and the files fit what comes back. CI runs it. Its timings are not
# measurements. Limits: TESTS_S, KERNELS_S, RUNTIME_S, DECODE_S, ENGINE_S, E2E_S, TP_S (seconds; 0: what is left of
# SCRIPT_BUDGET_S, the default for e2e), SCRIPT_BUDGET_S;
# E2E_LONG=1 adds a 3072-token case to e2e. ONLY="tests kernels" runs those stages alone (two
# calls instead of one: ONLY="tests kernels", then ONLY="runtime decode engine e2e", each with the
# whole budget).
#
# Adding a stage: write a function stage_NAME that prints its table on stdout (progress on
# stderr, numbers into "$STAGE_JSON", its long command under run_limited) and add NAME
# with its limit to STAGES below.
set -uo pipefail

PYTHON="${PYTHON:-python3}"
SMOKE="${SMOKE:-0}"
OUT="${OUT:-./out}"
mkdir -p "$OUT" && OUT="$(cd "$OUT" && pwd)"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET  # the kernels stage sets it for a smoke run; the others never want it

LOG="$OUT/log.txt"
TABLE="$OUT/table.txt"
RESULTS="$OUT/results.json"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/device_check.XXXXXX")"  # stage scratch files: never under $OUT
trap 'rm -rf "$WORK"' EXIT
: > "$LOG"
: > "$TABLE"
rm -f "$RESULTS"

if [[ "$SMOKE" == 1 ]]; then
    # generous limits: a smoke run takes 1-2 minutes, more on a busy machine
    SCRIPT_BUDGET_S="${SCRIPT_BUDGET_S:-600}"
    STAGES=("tests:${TESTS_S:-180}" "kernels:${KERNELS_S:-120}" "runtime:${RUNTIME_S:-120}" "decode:${DECODE_S:-120}"
            "engine:${ENGINE_S:-120}" "vllm:${VLLM_S:-60}" "e2e:${E2E_S:-120}" "tp:${TP_S:-120}")
else
    SCRIPT_BUDGET_S="${SCRIPT_BUDGET_S:-480}"
    STAGES=("tests:${TESTS_S:-150}" "kernels:${KERNELS_S:-90}" "runtime:${RUNTIME_S:-90}" "decode:${DECODE_S:-75}"
            "tp:${TP_S:-90}" "engine:${ENGINE_S:-60}" "vllm:${VLLM_S:-120}" "e2e:${E2E_S:-0}")
fi
MIN_STAGE_S=20   # a stage with less time left is skipped

# ------------------------------------------------------------------------------ stages

# run_limited CMD...: CMD under the current stage's limit (SIGTERM, then SIGKILL 10 s later)
run_limited() {
    timeout -k 10 "$STAGE_LIMIT" "$@"
}

# inner_budget MARGIN: seconds a stage's own --budget-s gets (its limit less MARGIN, at least half)
inner_budget() {
    local inner=$(( STAGE_LIMIT - $1 ))
    (( inner < STAGE_LIMIT / 2 )) && inner=$(( STAGE_LIMIT / 2 ))
    echo "$inner"
}

# cuda-marked tests: kernels against float64 references, the runner on the Triton backend,
# no Triton recompilation across lengths. SMOKE: the same collection, every test skipped.
stage_tests() {
    run_limited "$PYTHON" -m pytest -v -rfE -p no:cacheprovider --continue-on-collection-errors -m cuda tests 2>&1 | tee -a "$LOG" > "$WORK/pytest.txt"
    local rc=${PIPESTATUS[0]}
    "$PYTHON" -m bench.device_report pytest "$WORK/pytest.txt" --json "$STAGE_JSON"
    return "$rc"
}

# sampling / top-k / estimator / KV kernels vs torch and vs a device copy (SMOKE: interpreter)
stage_kernels() {
    local smoke=()
    [[ "$SMOKE" == 1 ]] && smoke=(--smoke)
    TRITON_INTERPRET="$([[ "$SMOKE" == 1 ]] && echo 1)" \
        run_limited "$PYTHON" -u -m bench.device_kernels --json "$STAGE_JSON" \
        --budget-s "$(inner_budget 25)" "${smoke[@]}"
}

# Runner vs model.generate: decode throughput and KV memory at batch 1 and at batch 64 over
# a shared 1,000-token prefix (Qwen2.5-1.5B shapes, random weights, bf16), after a check of
# the runner's logits against the dense forward.
stage_runtime() {
    local smoke=()
    [[ "$SMOKE" == 1 ]] && smoke=(--smoke)
    run_limited "$PYTHON" -u -m bench.device_runner --json "$STAGE_JSON" --budget-s "$(inner_budget 30)" "${smoke[@]}"
}

# Decode step: eager vs CUDA graphs (DECODE_MODES adds compiled, compiled+graphs: inductor
# on 28 layers takes minutes, give it its own call), ms per step at batch 1, 8, 64, 256 over
# a shared 2,000-token prefix (Qwen2.5-1.5B shapes, random weights, bf16), metadata bytes
# uploaded per step, plain decoding's tokens/s vs model.generate.
stage_decode() {
    local args=(--modes "${DECODE_MODES:-eager,graphs}")
    [[ "$SMOKE" == 1 ]] && args=(--smoke --modes eager,graphs,compiled)
    run_limited "$PYTHON" -u -m bench.device_decode "${args[@]}" --json "$STAGE_JSON" --budget-s "$(inner_budget 30)"
}

# Continuous batching: requests/s and tokens/s through the engine at 1, 8, 16 concurrent
# requests vs the same 16 requests one generate call at a time (Qwen2.5-1.5B shapes, random
# weights, bf16, 48 tokens each, EOS ignored; plain, and power at B = H = 16, L = 8, K = M = 4).
stage_engine() {
    local smoke=()
    [[ "$SMOKE" == 1 ]] && smoke=(--smoke)
    run_limited "$PYTHON" -u -m bench.device_engine "${smoke[@]}" --json "$STAGE_JSON" --budget-s "$(inner_budget 20)"
}

# Qwen2.5-1.5B configuration, random weights, bf16, EOS ignored, paper settings (alpha 4,
# K = M = 8, B = H = 192, L = 32, N_MCMC = 10). Cases in priority order: a method projected
# past the budget (its decode steps x plain's seconds per step) is skipped and listed.
#   768: model.generate, plain, power          -> power/plain, plain/hf-generate
#   768: smc (N = 32), power-tr (tempered rollouts + reuse) -> smc/plain (target <= 1.1),
#        power-tr/plain (target <= 1.3)
#   384: plain, power, mcmc, recompute-mcmc, power-rs (tempered rollouts resampled every 8 tokens),
#        power-ad (adaptive budgets)          -> mcmc/power, recompute-mcmc/mcmc, power-rs/power, power-ad/power
#   768: low-temp, best-of-n, mcmc              (mcmc/power at 768 when it fits)
#   3072: plain, power                          only with E2E_LONG=1
# SMOKE: the tiny random Llama, 8-16 tokens, every method.
stage_e2e() {
    local args
    if [[ "$SMOKE" == 1 ]]; then
        args=(--model tiny --case 16:hf-generate,plain,power,smc,power-tr --case 8:plain,power,mcmc,recompute-mcmc,power-rs,power-ad
              --case 16:low-temp,best-of-n --prompt-len 8 --block-size 4 --horizon 4 --candidates 4
              --top-k 2 --rollouts 2 --mcmc-steps 2 --num-samples 2 --warmup-tokens 4)
    else
        args=(--model qwen2.5-1.5b --case 768:hf-generate,plain,power,smc,power-tr --case 384:plain,power,mcmc,recompute-mcmc,power-rs,power-ad
              --case 768:low-temp,best-of-n,mcmc --prompt-len 128 --kv-memory-mib 16384)
        [[ "${E2E_LONG:-0}" == 1 ]] && args+=(--case 3072:plain,power)
    fi
    # e2e skips what its budget cannot fit; a SIGTERM (the limit, 60 s after that budget) stops
    # it and it still prints what it measured
    run_limited "$PYTHON" -u -m bench.e2e "${args[@]}" --num-prompts 1 --reps 1 \
        --budget-s "$(inner_budget 60)" --out "$WORK/e2e"
    local rc=$?
    [[ -f "$WORK/e2e/e2e.json" ]] && cp "$WORK/e2e/e2e.json" "$STAGE_JSON"
    return "$rc"
}

# Tensor parallelism: every method on a 2-way sharded tiny Llama (NCCL, one GPU per rank)
# against one GPU, token for token; "skipped: 1 GPU" with fewer than 2. SMOKE: gloo on the CPU.
stage_tp() {
    local smoke=()
    [[ "$SMOKE" == 1 ]] && smoke=(--smoke)
    run_limited "$PYTHON" -u -m bench.device_tp "${smoke[@]}" --json "$STAGE_JSON" --budget-s "$(inner_budget 20)"
}

# Our runtime beside vLLM, every method, same model and settings (bench/vllm_side_by_side.py),
# where vLLM is installed for $PYTHON; one line and no failure elsewhere. SMOKE: budgets / 16.
stage_vllm() {
    if ! "$PYTHON" -c "import vllm" > /dev/null 2>&1; then
        echo "skipped: vLLM is not installed for $PYTHON (docs/vllm.md installs it)"
        return 0
    fi
    local args=()
    [[ "$SMOKE" == 1 ]] && args=(--scale 0.0625)
    run_limited "$PYTHON" -u -m bench.vllm_side_by_side "${args[@]}" --out "$STAGE_JSON"
}

# ------------------------------------------------------------------------------ driver

summaries=()
failed=0

# run_stage NAME LIMIT_S: the stage's table to the terminal and table.txt, its numbers
# into results.json, one status line
run_stage() {
    local name=$1 limit=$2 started=$SECONDS rc status
    local left=$(( SCRIPT_BUDGET_S - SECONDS ))
    (( limit <= 0 || limit > left )) && limit=$left
    STAGE_JSON="$WORK/$name.json"
    STAGE_LIMIT=$limit
    echo | tee -a "$TABLE"
    echo "== $name (limit ${limit} s)" | tee -a "$TABLE" | tee -a "$LOG"
    if (( limit < MIN_STAGE_S )); then
        status="skipped: ${left} s left of the script's ${SCRIPT_BUDGET_S} s"
        echo "$status" | tee -a "$TABLE"
    else
        "stage_$name" 2>> "$LOG" | tee -a "$TABLE"
        rc=${PIPESTATUS[0]}
        case $rc in
            0) status=ok ;;
            124|137) status="timed out at ${limit} s" ;;
            *) status="failed (exit $rc)" ;;
        esac
        if (( rc != 0 )); then
            echo "last lines of its log:" | tee -a "$TABLE"
            tail -n 5 "$LOG" | sed -e 's/^/    /' -e '$a\' | tee -a "$TABLE"
        fi
        [[ -n "$(tail -c 1 "$LOG")" ]] && echo >> "$LOG"  # a killed stage may leave half a line
    fi
    [[ "$status" == ok ]] || failed=1
    "$PYTHON" -m bench.device_report add "$RESULTS" "$name" "$status" $(( SECONDS - started )) "$limit" "$STAGE_JSON"
    summaries+=("-- $name: $status, $(( SECONDS - started )) s of ${limit} s")
    echo "${summaries[-1]}" | tee -a "$TABLE" | tee -a "$LOG"
}

echo "device check: $("$PYTHON" --version 2>&1), SMOKE=$SMOKE, budget ${SCRIPT_BUDGET_S} s, results in $OUT"
if [[ "$SMOKE" != 1 ]]; then
    # the package from this checkout, nothing from the network
    if ! "$PYTHON" -m pip install -q -e . --no-deps --no-build-isolation >> "$LOG" 2>&1; then
        echo "pip install -e . failed: see $LOG"
        tail -n 5 "$LOG"
        exit 1
    fi
fi

names=()
for entry in "${STAGES[@]}"; do
    name=${entry%%:*}
    [[ -n "${ONLY:-}" && " $ONLY " != *" $name "* ]] && continue
    names+=("$name")
    run_stage "$name" "${entry##*:}"
done
if (( ${#names[@]} == 0 )); then
    echo "no stage selected: ONLY=\"${ONLY:-}\" names none of ${STAGES[*]%%:*}"
    exit 2
fi

echo
echo "== summary (${SECONDS} s in all; full results in $OUT)"
printf '%s\n' "${summaries[@]}"
check=()
[[ "$SMOKE" == 1 ]] && check=(--require-ok)
"$PYTHON" -m bench.device_report check "$OUT" "${names[@]}" "${check[@]}" || failed=1
exit $failed
