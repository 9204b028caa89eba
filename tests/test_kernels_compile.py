"""Every Triton kernel compiles for a Hopper GPU (sm_90), without one.

The CPU suite runs the kernels under TRITON_INTERPRET=1, which accepts some code a real
compile rejects (e.g. a global annotated ``X: tl.constexpr = ...`` instead of
``X = tl.constexpr(...)``). This compiles each kernel ahead of time with Triton's CUDA
backend and bundled ptxas, in a subprocess without TRITON_INTERPRET.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent(
    """
    import triton, triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from powerfast.kernels import jackknife, kv_cache, paged_attention, sampling, topk

    def compile_(fn, types, consts, num_warps):
        sig = {a: "constexpr" if a in consts else types.get(a, "i32") for a in fn.arg_names}
        triton.compile(ASTSource(fn, sig, consts), target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})

    for sample, row_params in ((True, False), (False, False), (True, True)):
        compile_(sampling._sample_logprob_kernel,
                 dict(logits_ptr="*bf16", tokens_in_ptr="*i64", tokens_out_ptr="*i64", base_logprobs_ptr="*fp32",
                      tempered_logprobs_ptr="*fp32", log_power_sums_ptr="*fp32", offsets_ptr="*i64", active_ptr="*i1", logliks_ptr="*fp32",
                      temperatures_ptr="*fp64", eos_ids_ptr="*i64", inv_temperature="fp32", seed="i64", stride_logits_row="i64"),
                 dict(SAMPLE=sample, TEMPERED=True, HAS_OFFSETS=True, HAS_ACTIVE=True, HAS_EOS=not row_params,
                      HAS_LOGLIKS=True, ROW_PARAMS=row_params, BLOCK_V=4096, PHILOX_ROUNDS=10), 8)
    compile_(topk._topk_logprobs_kernel, dict(logits_ptr="*bf16", token_ids_ptr="*i64", logprobs_ptr="*fp32"),
             dict(K=5, BLOCK_K=8, BLOCK_V=4096), 8)
    for dt, tdt in (("fp32", tl.float32), ("fp64", tl.float64)):
        compile_(jackknife._power_estimate_kernel,
                 {**{n: "*" + dt for n in ("candidate_logprobs_ptr", "rollout_scores_ptr", "probs_ptr", "p_hat_ptr", "log_zeta_ptr")},
                  **{n: "fp32" for n in ("alpha_hi", "alpha_lo", "alpha_minus_one_hi", "alpha_minus_one_lo")}},
                 dict(JACKKNIFE=True, DTYPE=tdt, BLOCK_K=8, BLOCK_M=16), 4)
    compile_(kv_cache._write_kv_kernel,
             dict(key_cache_ptr="*bf16", value_cache_ptr="*bf16", key_ptr="*bf16", value_ptr="*bf16", slot_mapping_ptr="*i64"),
             dict(BLOCK_HD=256), 4)
    compile_(kv_cache._copy_pages_kernel,
             dict(key_cache_ptr="*bf16", value_cache_ptr="*bf16", src_pages_ptr="*i64", dst_pages_ptr="*i64"),
             dict(BLOCK=4096), 4)
    for lse in (True, False):
        compile_(paged_attention._paged_attention_kernel,
                 dict(Q="*bf16", K_cache="*bf16", V_cache="*bf16", Page_tables="*i32", Query_seq_index="*i64",
                      Query_positions="*i64", Out="*fp32" if lse else "*bf16", Lse="*fp32", scale_log2="fp32",
                      softcap_log2="fp32"),
                 dict(GROUP_SIZE=6, BLOCK_G=16, HEAD_DIM=128, BLOCK_D=128, PAGE_SIZE=16, BLOCK_N=64,
                      NATIVE_DOT=True, WRITE_LSE=lse, SOFTCAP=lse, SLIDING=not lse), 4)
    compile_(paged_attention._merge_splits_kernel, dict(Partial_out="*fp32", Lse="*fp32", Out="*bf16"),
             dict(HEAD_DIM=128, BLOCK_D=128, BLOCK_S=32), 4)
    print("compiled")
    """
)


@pytest.mark.slow
def test_kernels_compile_for_sm90():
    import triton

    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists():
        pytest.skip("this Triton build has no bundled ptxas")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    result = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and "compiled" in result.stdout, result.stderr[-4000:]
