"""Scaling factors, leave-one-out and jackknife of the power-distribution estimate, in
one launch (one program per decision row).

Per row, with the (K, M) tile of rollout scores ``l`` in registers (a rollout's log weight
divided by alpha - 1: its base log-likelihood when drawn from p; ``powerfast.ops.jackknife``):

    w[k, r]          = (alpha - 1) * (l[k, r] - max l)        (-inf where l = -inf)
    log zeta[k]      = logsumexp_r w[k, r] - log M             (+ (alpha - 1) * max l on output)
    p_hat            = softmax_k(alpha * (c[k] - max c) + log zeta[k])
    log zeta^(-s)[k] = logsumexp_{r != s} w[k, r] - log(M - 1) (a (K, M, M) masked tile:
                       each leave-one-out sum is formed from the other terms, never by
                       subtraction, so a rollout dominating by any margin is exact)
    p_jk             = M * p_hat - (M - 1) / M * sum_s softmax_k(alpha * c + log zeta^(-s))

clamped at 0 and renormalised, falling back to p_hat when everything clamps (the
contract of ``powerfast.ops.jackknife.torch_power_estimates``). Shifting by the row maxima before
multiplying by alpha keeps the weights' rounding error proportional to their spread, not
to the scores' size (down to -2000 and beyond).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit(do_not_specialize=["num_candidates", "num_rollouts"])
def _power_estimate_kernel(
    # data ptrs
    candidate_logprobs_ptr,  # (B, K)
    rollout_scores_ptr,  # (B, K, M)
    probs_ptr,  # (B, K) out, contiguous
    p_hat_ptr,  # (B, K) out, contiguous
    log_zeta_ptr,  # (B, K) out, contiguous
    # scalars
    alpha_hi,  # alpha = alpha_hi + alpha_lo (fp32 pair: exact for fp64 compute)
    alpha_lo,
    alpha_minus_one_hi,
    alpha_minus_one_lo,
    # shapes
    num_candidates,
    num_rollouts,
    # strides
    stride_cand_b,
    stride_cand_k,
    stride_roll_b,
    stride_roll_k,
    stride_roll_m,
    # switches
    JACKKNIFE: tl.constexpr,
    DTYPE: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    ks = tl.arange(0, BLOCK_K)
    ms = tl.arange(0, BLOCK_M)
    k_valid = ks < num_candidates
    m_valid = ms < num_rollouts
    neg_inf = -float("inf")

    zero = tl.zeros([], dtype=DTYPE)
    alpha = (zero + alpha_hi) + alpha_lo
    alpha_minus_one = (zero + alpha_minus_one_hi) + alpha_minus_one_lo
    num_rollouts_f = zero + num_rollouts

    cand = tl.load(
        candidate_logprobs_ptr + row * stride_cand_b + ks * stride_cand_k, mask=k_valid, other=neg_inf
    ).to(DTYPE)
    tile_mask = k_valid[:, None] & m_valid[None, :]
    scores = tl.load(
        rollout_scores_ptr + row * stride_roll_b + ks[:, None] * stride_roll_k + ms[None, :] * stride_roll_m,
        mask=tile_mask,
        other=neg_inf,
    ).to(DTYPE)

    # weights, shifted by the row's largest score
    score_max = tl.max(tl.max(scores, axis=1), axis=0)
    score_shift = tl.where(score_max == neg_inf, 0.0, score_max)
    weights = tl.where(scores == neg_inf, neg_inf, alpha_minus_one * (scores - score_shift))

    # log zeta (shifted): logsumexp over rollouts - log M
    weight_max = tl.max(weights, axis=1)
    weight_ref = tl.where(weight_max == neg_inf, 0.0, weight_max)
    weight_sum = tl.sum(tl.exp(weights - weight_ref[:, None]), axis=1)
    log_zeta = weight_ref + tl.log(weight_sum) - tl.log(num_rollouts_f)

    # p_hat = softmax_k(alpha * c + log zeta), shifted by the row's largest candidate log-prob
    cand_max = tl.max(cand, axis=0)
    cand_shift = tl.where(cand_max == neg_inf, 0.0, cand_max)
    scaled = tl.where(cand == neg_inf, neg_inf, alpha * (cand - cand_shift))
    log_u = scaled + log_zeta
    u_max = tl.max(log_u, axis=0)
    u_ref = tl.where(u_max == neg_inf, 0.0, u_max)
    u = tl.exp(log_u - u_ref)
    u_total = tl.sum(u, axis=0)
    p_hat = u / tl.where(u_max == neg_inf, 1.0, u_total)

    if JACKKNIFE:
        # leave-one-out log-sum-exp over r != s, from the other terms: (K, S, R) tile
        rs = ms
        keep = (rs[None, :] != ms[:, None])[None, :, :]  # (1, S, R)
        loo_weights = tl.where(keep, weights[:, None, :], neg_inf)  # (K, S, R)
        loo_max = tl.max(loo_weights, axis=2)  # (K, S)
        loo_ref = tl.where(loo_max == neg_inf, 0.0, loo_max)
        loo_sum = tl.sum(tl.exp(loo_weights - loo_ref[:, :, None]), axis=2)
        loo_log_zeta = loo_ref + tl.log(loo_sum) - tl.log(tl.maximum(num_rollouts_f - 1.0, 1.0))
        # p_hat^(-s): softmax over candidates (axis 0) of each column s
        loo_log_u = scaled[:, None] + loo_log_zeta  # (K, S)
        column_max = tl.max(loo_log_u, axis=0)  # (S,)
        column_empty = column_max == neg_inf
        column_ref = tl.where(column_empty, 0.0, column_max)
        loo_u = tl.exp(loo_log_u - column_ref[None, :])
        column_total = tl.where(column_empty, 1.0, tl.sum(loo_u, axis=0))
        loo_probs = loo_u / column_total[None, :]
        # an uninformative replicate (every candidate lost its last finite rollout) is p_hat
        loo_probs = tl.where(column_empty[None, :], p_hat[:, None], loo_probs)
        loo_probs = tl.where(m_valid[None, :], loo_probs, 0.0)
        loo_total = tl.sum(loo_probs, axis=1)  # (K,)
        p_jk = num_rollouts_f * p_hat - (num_rollouts_f - 1.0) / num_rollouts_f * loo_total
        p_jk = tl.maximum(p_jk, 0.0)
        p_jk = tl.where(k_valid, p_jk, 0.0)
        jk_total = tl.sum(p_jk, axis=0)
        all_clamped = jk_total <= 0
        probs = tl.where(all_clamped, p_hat, p_jk / tl.where(all_clamped, 1.0, jk_total))
    else:
        probs = p_hat

    out = row * num_candidates + ks
    tl.store(probs_ptr + out, probs, mask=k_valid)
    tl.store(p_hat_ptr + out, p_hat, mask=k_valid)
    tl.store(log_zeta_ptr + out, log_zeta + alpha_minus_one * score_shift, mask=k_valid)


def _fp32_pair(value: float) -> tuple[float, float]:
    """value = hi + lo with hi, lo exactly representable in fp32 (to rebuild fp64 in-kernel)."""
    hi = float(torch.tensor(value, dtype=torch.float32))
    return hi, float(torch.tensor(value - hi, dtype=torch.float32))


def power_estimates(
    candidate_logprobs: torch.Tensor,
    rollout_scores: torch.Tensor,
    alpha: float,
    jackknife: bool = True,
):
    """Launcher (arguments checked by ``powerfast.ops.jackknife``).

    candidate_logprobs: (..., K); rollout_scores: (..., K, M); alpha > 0
    returns (probs, p_hat, log_zeta), each (..., K), in the promoted input dtype when it is
    float32 / float64 (float32 otherwise); computed in float64 iff an input is float64.
    """
    batch_shape = candidate_logprobs.shape[:-1]
    num_candidates, num_rollouts = rollout_scores.shape[-2:]
    cand = candidate_logprobs.reshape(-1, num_candidates)
    rollouts = rollout_scores.reshape(-1, num_candidates, num_rollouts)
    num_rows = cand.shape[0]
    out_dtype = torch.promote_types(candidate_logprobs.dtype, rollout_scores.dtype)
    compute_dtype = torch.float64 if out_dtype == torch.float64 else torch.float32
    device = rollout_scores.device
    probs = torch.empty(num_rows, num_candidates, dtype=compute_dtype, device=device)
    p_hat = torch.empty_like(probs)
    log_zeta = torch.empty_like(probs)
    if num_rows > 0:
        block_k = triton.next_power_of_2(num_candidates)
        block_m = triton.next_power_of_2(num_rollouts)
        alpha_hi, alpha_lo = _fp32_pair(alpha)
        am1_hi, am1_lo = _fp32_pair(alpha - 1.0)
        _power_estimate_kernel[(num_rows,)](
            # data ptrs
            cand,
            rollouts,
            probs,
            p_hat,
            log_zeta,
            # scalars
            alpha_hi,
            alpha_lo,
            am1_hi,
            am1_lo,
            # shapes
            num_candidates,
            num_rollouts,
            # strides
            cand.stride(0),
            cand.stride(1),
            rollouts.stride(0),
            rollouts.stride(1),
            rollouts.stride(2),
            # switches
            JACKKNIFE=bool(jackknife),
            DTYPE=tl.float64 if compute_dtype == torch.float64 else tl.float32,
            BLOCK_K=block_k,
            BLOCK_M=block_m,
            num_warps=4 if block_k * block_m * block_m >= 4096 else 1,
        )
    if out_dtype not in (torch.float32, torch.float64):
        out_dtype = torch.float32
    results = tuple(t.to(out_dtype).reshape(*batch_shape, num_candidates) for t in (probs, p_hat, log_zeta))
    return results
