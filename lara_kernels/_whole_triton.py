"""The triton backend's LARA as one sequence of Triton launches per direction under one
autograd Function (the lean host path of issue 13; ``_whole.py`` is the cpu backend's).

It computes what ``_pipeline.lara_forward(TritonPasses, ...)`` computes, with the C x D
and C x C steps as small kernels (triton_kernels/small.py) instead of torch ops, the
landmarks as one Triton launch (triton_kernels/landmarks.py) that also derives C_eff on
the device, and no host-device synchronization anywhere (no ``.item()``, no
``bool(tensor)``, no host read of masks, offsets or C_eff), so a call can be captured in a
CUDA graph. Forward, six launches ("balance": five), and no torch compute op:

1. landmarks: qt (B, H, C, D), kt (B, H_kv, C, D) and c_eff (B,);
2. proposal: mu and the samples w = mu [+ eps];
3. key pass, split partials (triton_kernels/key_pass.py, no combine launch);
4. query normalizer, split partials ("optimal" only);
5. stats: both combines (Z, kap, Lam) and the C x C steps (g, rho, log_den, bias, bh);
6. query pass.

Backward (first order, grad mode off), six launches ("mixed": seven): query pass
backward; small rows kernel (its partials summed, dZ, dkap, dLam, drho, dlog_den, dw_r);
key pass backward and query normalizer backward (``key_pass_bwd_split``: their dw
partials are summed by the columns kernel; one launch more each past C x D = 128 x 128,
e.g. the G x C = 512 key rows of GQA at G = 8, for dk, dv); small columns kernel (dw,
dmu, dqt, dkt; "mixed": plus its C x C backward kernel); landmarks backward (dq, dk with
the landmarks' part added). v's gradient is the key pass's dv.

Elements of the padded layout with no valid query or no valid key get c_eff = 0: their
landmarks are 0, the query pass writes y = 0 and gives zero gradients, and nothing
non-finite reaches a result (the pipeline instead zeroes their inputs and output with
torch ops, ``drop_inputs`` / ``_zero_dropped``).

Where it applies (:func:`applies`): proposal "segment" or "mixed", no given landmarks
(``q_landmarks`` / ``k_landmarks``), both layouts (masks or cu_seqlens), GQA, eps given
or not, either weighting; no forward-AD level open, no torch.func transform active and
not while torch.compile traces (those take the pipeline, whose Functions have the vmap
rules, forward-mode fallbacks and traceable passes). Everything else (the "attend"
proposal, given landmarks) takes the pipeline. A backward with grad mode on
(``create_graph=True``) recomputes the forward with the pipeline and returns its
differentiable vector-Jacobian product, so higher-order gradients are the pipeline's.
``ENABLED = False`` sends every call to the pipeline (for comparisons).
"""

from __future__ import annotations

import math

import torch

from . import _pipeline
from ._fused import _apply, _differentiable_vjp, _forward_ad_active

ENABLED = True


def applies(q, options) -> bool:
    """Whether ``TritonBackend.lara`` takes this path (see the module doc)."""
    return (ENABLED and options.get("proposal") in ("segment", "mixed") and options.get("q_landmarks") is None
            and options.get("k_landmarks") is None and not _forward_ad_active()
            and not torch._C._are_functorch_transforms_active() and not torch.compiler.is_compiling())


_KERNELS = None


def _kernels():
    """(key_pass, landmarks, query_pass, small), imported on first use (Triton optional)."""
    global _KERNELS
    if _KERNELS is None:
        from .triton_kernels import key_pass, landmarks, query_pass, small

        _KERNELS = key_pass, landmarks, query_pass, small
    return _KERNELS


def _sizes(q, k, v, cu_q, max_q, max_k, num_samples):
    """(B, H, H_kv, N, M, C, D, Dv) with C = min(num_samples, N, M) (the rows that can be
    active; N, M the longest lengths in the packed layout)."""
    if cu_q is not None:
        B, N, M = cu_q.shape[0] - 1, int(max_q), int(max_k)
        H, Hkv = q.shape[1], k.shape[1]
    else:
        B, H, N = q.shape[0], q.shape[1], q.shape[2]
        Hkv, M = k.shape[1], k.shape[2]
    return B, H, Hkv, N, M, min(int(num_samples), N, M), q.shape[-1], v.shape[-1]


def _forward(q, k, v, eps, qpm, kpm, cu_q, cu_k, max_q, max_k, num_samples, mixed, optimal, beta, ss):
    """(y, state): the six launches; state = (qt, kt, mu, w, c_eff, Z, kap, lam, log_den,
    bias, bh, kmix, lse), the C-sized float32 results the backward reads (lam, bh None
    for "balance", kmix, lse None for "segment")."""
    key_pass, landmarks, query_pass, small = _kernels()
    B, H, Hkv, N, M, C, D, Dv = _sizes(q, k, v, cu_q, max_q, max_k, num_samples)
    G = H // Hkv
    if eps is not None and eps.shape[2] != C:
        eps = eps[:, :, :C]
    qt, kt, c_eff = landmarks.landmarks_fwd(q, k, qpm, kpm, C, ss, cu_q, cu_k, max_q, max_k)        # 1
    mu, w, kmix, lse = small.proposal_fwd(qt, kt, eps, c_eff, mixed)                                # 2
    kpart, SK = key_pass.key_pass_split(w.view(B, Hkv, G * C, D), k, v, kpm, ss, True, cu_k, max_k)   # 3
    npart, SN = (key_pass.key_pass_split(qt, q, None, qpm, ss, False, cu_q, max_q)                  # 4
                 if optimal else (None, 0))
    Z, kap, lam, rho, log_den, bias, bh = small.stats_fwd(kpart, SK, npart, SN, w, mu, c_eff, Dv, optimal)  # 5
    y = query_pass.query_pass_fwd(q, w, bias, kap, c_eff, qpm, ss, qt if optimal else None, lam, bh, beta,  # 6
                                  cu_q, max_q)
    return y, (qt, kt, mu, w, c_eff, Z, kap, lam, log_den, bias, bh, kmix, lse)


def lara(q, k, v, eps, *, num_samples, proposal, weighting, beta, scale, key_padding_mask=None,
         query_padding_mask=None, q_landmarks=None, k_landmarks=None, cu_seqlens_q=None, cu_seqlens_k=None,
         max_seqlen_q=None, max_seqlen_k=None):
    """``_pipeline.lara_forward(TritonPasses, ...)`` by the lean path (same arguments;
    ``q_landmarks``, ``k_landmarks`` must be None and ``proposal`` "segment" or "mixed")."""
    assert q_landmarks is None and k_landmarks is None and proposal in ("segment", "mixed"), proposal
    args = (q, k, v, eps, query_padding_mask, key_padding_mask, cu_seqlens_q, cu_seqlens_k,
            0 if max_seqlen_q is None else int(max_seqlen_q), 0 if max_seqlen_k is None else int(max_seqlen_k),
            int(num_samples), proposal == "mixed", weighting == "optimal", float(beta), math.sqrt(scale))
    if not torch.is_grad_enabled() or not (q.requires_grad or k.requires_grad or v.requires_grad):
        return _forward(*args)[0]
    return _apply(_WholeTriton, *args)


def _pipeline_forward(q, k, v, eps, qpm, kpm, cu_q, cu_k, max_q, max_k, num_samples, mixed, optimal, beta, ss):
    """The same call through the pipeline (the double-backward fallback)."""
    from ._triton_backend import TritonPasses

    packed = {} if cu_q is None else dict(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max_q,
                                          max_seqlen_k=max_k)
    return _pipeline.lara_forward(
        TritonPasses, q, k, v, eps, num_samples=num_samples, proposal="mixed" if mixed else "segment",
        weighting="optimal" if optimal else "balance", beta=beta, scale=ss * ss, key_padding_mask=kpm,
        query_padding_mask=qpm, **packed)


class _WholeTriton(torch.autograd.Function):
    """y = the lean forward; saves q, k, v, eps, the masks, offsets and the C-sized state."""

    @staticmethod
    def forward(ctx, q, k, v, eps, qpm, kpm, cu_q, cu_k, max_q, max_k, num_samples, mixed, optimal, beta, ss):
        y, state = _forward(q, k, v, eps, qpm, kpm, cu_q, cu_k, max_q, max_k, num_samples, mixed, optimal, beta,
                            ss)
        ctx.save_for_backward(q, k, v, eps, qpm, kpm, cu_q, cu_k, *state)
        ctx.config = (max_q, max_k, num_samples, mixed, optimal, beta, ss)
        return y

    @staticmethod
    def backward(ctx, dy):
        q, k, v, eps, qpm, kpm, cu_q, cu_k, *state = ctx.saved_tensors
        max_q, max_k, num_samples, mixed, optimal, beta, ss = ctx.config
        needs = ctx.needs_input_grad
        if torch.is_grad_enabled():   # create_graph=True: a differentiable backward, through the pipeline
            def run(q_, k_, v_):
                return _pipeline_forward(q_, k_, v_, eps, qpm, kpm, cu_q, cu_k, max_q, max_k, num_samples, mixed,
                                         optimal, beta, ss)

            dq, dk, dv = _differentiable_vjp(run, (q, k, v), needs[:3], (dy,))
        else:
            dq, dk, dv = _backward(dy, q, k, v, qpm, kpm, cu_q, cu_k, max_q, max_k, mixed, optimal, beta, ss,
                                   state)
        return (dq, dk, dv) + (None,) * 12


def _backward(dy, q, k, v, qpm, kpm, cu_q, cu_k, max_q, max_k, mixed, optimal, beta, ss, state):
    """(dq, dk, dv): six launches ("mixed": seven; "balance": one fewer)."""
    key_pass, landmarks, query_pass, small = _kernels()
    qt, kt, mu, w, c_eff, Z, kap, lam, log_den, bias, bh, kmix, lse = state
    B, H, C, D = w.shape
    Hkv, Dv = kt.shape[1], kap.shape[-1]
    G = H // Hkv
    if dy.dtype != q.dtype:
        dy = dy.to(q.dtype)
    dq_a, qpart, SQ = query_pass.query_pass_bwd_split(q, w, bias, kap, c_eff, qpm, ss, qt if optimal else None, lam,
                                                      bh, beta, dy, cu_q, max_q)
    dZ, dkap, dlam, drho, dld, dwr, dqtq = small.rows_bwd(qpart, SQ, w, mu, bh, log_den, c_eff, Dv, optimal)
    kdw, SK, dk_a, dv = key_pass.key_pass_bwd_split(w.view(B, Hkv, G * C, D), k, v, kpm, ss, True, Z, kap, dZ, dkap,
                                                    cu_k, max_k)
    ndqt, SN, dq_b = None, 0, None
    if optimal:
        ndqt, SN, dq_b, _ = key_pass.key_pass_bwd_split(qt, q, None, qpm, ss, False, lam, None, dlam, None, cu_q,
                                                        max_q)
    dqt, dmus = small.cols_bwd(w, mu, log_den, drho, dld, c_eff, dwr, kdw, SK, dqtq, ndqt, SN, Hkv, optimal)
    dkt = small.mixed_bwd(kt, dmus, kmix, lse, c_eff) if mixed else dmus
    dq, dk = landmarks.landmarks_bwd(dq_a, dq_b, dk_a, dqt, dkt, c_eff, q, k, qpm, kpm, ss, cu_q, cu_k, max_q,
                                     max_k)
    return dq, dk, dv
