#!/usr/bin/env bash
# One script for a GPU machine (no network): correctness, then timings. Later sections
# (runtime, end-to-end) append below the kernel section. Full results go under $OUT
# (./out if unset); a short table is printed last.
pip install -e . --no-deps --no-build-isolation
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-./out}"
export OUT
mkdir -p "$OUT/kernels"
status=0

# ---------------------------------------------------------------------------- kernels
echo "== kernel correctness (cuda-marked tests)"
python -m pytest -q -p no:cacheprovider -m cuda \
    tests/test_ops_sampling.py tests/test_ops_jackknife.py tests/test_ops_topk.py tests/test_ops_kv.py \
    > "$OUT/kernels/tests.txt" 2>&1 || status=1
tail -n 3 "$OUT/kernels/tests.txt"

echo "== kernel timings"
timeout 300 python bench/device_kernels.py --out "$OUT/kernels" > "$OUT/kernels/table.txt" 2> "$OUT/kernels/timings.log" || status=1

# ------------------------------------------------------------------------------ summary
echo
echo "== kernels (full results: $OUT/kernels)"
cat "$OUT/kernels/table.txt"
exit $status
