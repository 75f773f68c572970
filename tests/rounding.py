"""The roundings of the Triton kernels, emulated in torch on CPU (issue 13).

``RoundingKernels`` is a kernel set (the four functions of ``lara_kernels._fused``) that
computes each pass as triton_kernels/ does on a GPU, rounding at the same points:

- the operands of every product are in the input dtype: k, v, q, dy as given, and the
  float32 operands formed in the kernels rounded to it (round to nearest even): ss w and
  ss qt (the scale folded into the C rows), the probabilities p and S, dkap, kap, and the
  gradients of the logits dl, dt;
- products are exact and accumulated in float32 (``float32 @ float32`` of the rounded
  operands: products of two half numbers are exact in float32), everything else (exp,
  log, sums, the softmax, the MIS weights) in float32;
- outputs (y, dq, dk, dv) are stored in the input dtype; C-sized results in float32.

The only differences from a GPU run are the summation order and the block-wise online
softmax (the kernel rescales p by running maxima, the emulation by the row maximum):
both change errors at the level of float32 roundoff, far below the half-dtype roundings
that this emulation is for. Its error against float64 is therefore the error the kernels
must show on a GPU; the GPU tests allow ``K_EMULATION`` times it (tests/test_triton.py).

``emulation_backend()`` runs the shared pipeline (``_pipeline``, with ``FusedPasses``
autograd) on these kernels for CPU tensors, so a whole lara_attention call, forward and
backward, has an emulated counterpart on the same inputs and random samples.
"""

from __future__ import annotations

import torch

from lara_kernels import _pipeline, dispatch
from lara_kernels._fused import FusedPasses

ALPHA_FLOOR = 1e-8
NAME = "triton-rounding-emulation"


def _padded_only(cu_seqlens):
    """The emulation covers the padded layout; packed batches are emulated per sequence
    (a packed call equals the padded calls on each sequence, tests/test_triton_varlen.py)."""
    if cu_seqlens is not None:
        raise NotImplementedError("the rounding emulation takes the padded layout only")


def rnd(x: torch.Tensor, dt: torch.dtype) -> torch.Tensor:
    """x as a product operand of dtype dt, held in float32."""
    x = x.to(torch.float32)
    return x if dt == torch.float32 else x.to(dt).to(torch.float32)


def mm(a: torch.Tensor, b: torch.Tensor, dt: torch.dtype) -> torch.Tensor:
    """a @ b with operands rounded to dt, float32 accumulation."""
    return rnd(a, dt) @ rnd(b, dt)


def _keep_rows(x, padding):
    """x (B, H, L, D) as float32 with padded rows zero (the kernels never read them)."""
    x = x.to(torch.float32)
    if padding is None:
        return x, None
    valid = ~padding[:, None, :]                                        # (B, 1, L)
    return x.masked_fill(~valid[..., None], 0.0), valid


class RoundingKernels:
    """The kernel set of triton_kernels/ with the GPU's roundings (module docstring)."""

    @staticmethod
    def _key_logits(w, k, padding, ss, subtract_norm):
        dt = k.dtype
        kf, valid = _keep_rows(k, padding)
        a = rnd(w.float() * ss, dt)
        logit = mm(a, kf.transpose(-1, -2), dt)                          # (B, H, C, M)
        if subtract_norm:
            logit = logit - (0.5 * ss * ss) * (kf * kf).sum(-1)[..., None, :]
        if valid is not None:
            logit = logit.masked_fill(~valid[:, :, None, :], float("-inf"))
        return a, kf, logit, valid

    @classmethod
    def key_pass_fwd(cls, w, k, v, padding, ss, subtract_norm, cu_seqlens=None, max_seqlen=0):
        _padded_only(cu_seqlens)
        dt = k.dtype
        _, _, logit, _ = cls._key_logits(w, k, padding, ss, subtract_norm)
        mx = logit.amax(-1, keepdim=True)
        mx = torch.where(torch.isinf(mx), torch.zeros_like(mx), mx)
        p = torch.exp(logit - mx)
        l_ = p.sum(-1)
        Z = mx[..., 0] + torch.log(l_)
        if v is None:
            return Z, None
        vf, _ = _keep_rows(v, padding)
        return Z, mm(p, vf, dt) / l_[..., None]

    @classmethod
    def key_pass_bwd(cls, w, k, v, padding, ss, subtract_norm, Z, kap, dZ, dkap, cu_seqlens=None, max_seqlen=0):
        _padded_only(cu_seqlens)
        dt = k.dtype
        a, kf, logit, _ = cls._key_logits(w, k, padding, ss, subtract_norm)
        sm = torch.exp(logit - Z.float()[..., None])                     # 0 at padded keys
        e = torch.zeros_like(Z, dtype=torch.float32) if dZ is None else dZ.float()
        dv = None
        if v is not None:
            vf, _ = _keep_rows(v, padding)
            dkap = torch.zeros_like(kap, dtype=torch.float32) if dkap is None else dkap.float()
            e = e - (dkap * kap.float()).sum(-1)
            dv = mm(sm.transpose(-1, -2), dkap, dt).to(v.dtype)
            dl = sm * (mm(dkap, vf.transpose(-1, -2), dt) + e[..., None])
        else:
            dl = sm * e[..., None]
        dk = mm(dl.transpose(-1, -2), a, dt)
        if subtract_norm:
            dk = dk - (ss * ss) * dl.sum(-2)[..., None] * kf
        dw = ss * mm(dl, kf, dt)
        return dw, dk.to(k.dtype), dv

    @staticmethod
    def _query_probs(q, w, bias, kap, c_eff, padding, ss, qt, lam, bh, beta):
        dt = q.dtype
        qf, valid = _keep_rows(q, padding)
        C = w.shape[2]
        act = (torch.arange(C, device=q.device)[None, :] < c_eff.to(q.device)[:, None])[:, None, None, :]
        keep = act if valid is None else act & valid[..., None]        # (B, 1|H, N|1, C)
        a = rnd(w.float() * ss, dt)
        logit = mm(qf, a.transpose(-1, -2), dt) + bias.float()[..., None, :]
        extra = None
        if qt is not None:
            at = rnd(qt.float() * ss, dt)
            r = torch.exp(mm(qf, at.transpose(-1, -2), dt) - lam.float()[..., None, :])
            ce = c_eff.to(q.device).float()[:, None, None, None]
            r_mean = r.masked_fill(~act, 0.0).sum(-1, keepdim=True) / ce
            alpha = bh.float()[..., None, :] + beta * (r - r_mean)
            logit = logit + torch.log(torch.clamp(alpha, min=ALPHA_FLOOR))
            extra = (at, r, alpha, ce)
        logit = logit.masked_fill(~act, float("-inf"))
        p = torch.softmax(logit, -1)
        if valid is not None:
            p = p.masked_fill(~valid[..., None], 0.0)
        return qf, valid, act, keep, a, p, extra

    @classmethod
    def query_pass_fwd(cls, q, w, bias, kap, c_eff, padding, ss, qt=None, lam=None, bh=None, beta=0.0,
                       cu_seqlens=None, max_seqlen=0):
        _padded_only(cu_seqlens)
        _, _, _, _, _, p, _ = cls._query_probs(q, w, bias, kap, c_eff, padding, ss, qt, lam, bh, beta)
        return mm(p, kap.float(), q.dtype).to(q.dtype)

    @classmethod
    def query_pass_bwd(cls, q, w, bias, kap, c_eff, padding, ss, qt, lam, bh, beta, dy, cu_seqlens=None,
                       max_seqlen=0):
        _padded_only(cu_seqlens)
        dt = q.dtype
        qf, valid, act, keep, a, p, extra = cls._query_probs(q, w, bias, kap, c_eff, padding, ss, qt, lam, bh, beta)
        dyf, _ = _keep_rows(dy, padding)
        dp = mm(dyf, kap.float().transpose(-1, -2), dt)
        delta = (p * dp).sum(-1, keepdim=True)
        dl = torch.where(keep, p * (dp - delta), torch.zeros_like(p))
        dkap = mm(p.transpose(-1, -2), dyf, dt)
        dq = mm(dl, a, dt)
        dw = ss * mm(dl.transpose(-1, -2), qf, dt)
        dbias = dl.sum(-2)
        dqt = dlam = dbh = None
        if extra is not None:
            at, r, alpha, ce = extra
            ok = keep & (alpha > ALPHA_FLOOR)
            dal = torch.where(ok, dl / torch.where(ok, alpha, torch.ones_like(alpha)), torch.zeros_like(dl))
            dbh = dal.sum(-2)
            dal_mean = dal.sum(-1, keepdim=True) / ce
            dt_ = torch.where(keep, beta * (dal - dal_mean) * r, torch.zeros_like(r))
            dlam = -dt_.sum(-2)
            dq = dq + mm(dt_, at, dt)
            dqt = ss * mm(dt_.transpose(-1, -2), qf, dt)
        if valid is not None:
            dq = dq.masked_fill(~valid[..., None], 0.0)
        return dq.to(q.dtype), dw, dbias, dkap, dqt, dlam, dbh


class EmulationBackend(dispatch.Backend):
    """The shared pipeline on ``RoundingKernels``, for CPU tensors (tests only)."""

    name = NAME
    description = "the Triton kernels' roundings emulated in torch (tests only)"
    devices = ("cpu",)
    dtypes = (torch.float32, torch.float16, torch.bfloat16)

    def __init__(self):
        self._passes = FusedPasses(RoundingKernels())

    def lara(self, q, k, v, eps, **options):
        return _pipeline.lara_forward(self._passes, q, k, v, eps, **options)

    def rfa(self, q, k, v, w, **options):
        return _pipeline.rfa_forward(self._passes, q, k, v, w, **options)


def emulation_backend() -> EmulationBackend:
    """The backend, for ``monkeypatch.setitem(dispatch._REGISTRY, NAME, ...)`` in a test
    (registered only for that test)."""
    return EmulationBackend()
