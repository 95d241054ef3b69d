"""Triton kernels and helpers of ``kvprof int4-decode`` (see profiler/kernels/int4_decode.py); imports triton."""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from profiler.kernels.step import time_step


@triton.jit
def _decode(Q, K, V, KS, KZ, VS, VZ, O, L, sm_scale,
            s_qb, s_qh, s_kb, s_kh, s_kl, s_sb, s_sh, s_ob, s_oh,
            D: tl.constexpr, BLOCK_N: tl.constexpr, QUANT: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    HALF: tl.constexpr = D // 2
    dh = tl.arange(0, HALF)
    q_lo = tl.load(Q + b * s_qb + h * s_qh + dh).to(tl.float32)
    q_hi = tl.load(Q + b * s_qb + h * s_qh + HALF + dh).to(tl.float32)
    m_i = -float("inf")
    l_i = 0.0
    acc_lo = tl.zeros([HALF], dtype=tl.float32)
    acc_hi = tl.zeros([HALF], dtype=tl.float32)
    kbase = b * s_kb + h * s_kh
    sbase = b * s_sb + h * s_sh
    for start in tl.range(0, L, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        mask = n < L
        if QUANT:
            kp = tl.load(K + kbase + n[:, None] * s_kl + dh[None, :], mask=mask[:, None], other=0)
            ks = tl.load(KS + sbase + n, mask=mask, other=0.0).to(tl.float32)
            kz = tl.load(KZ + sbase + n, mask=mask, other=0.0).to(tl.float32)
            k_lo = (kp & 0xF).to(tl.float32) * ks[:, None] + kz[:, None]
            k_hi = (kp >> 4).to(tl.float32) * ks[:, None] + kz[:, None]
        else:
            k_lo = tl.load(K + kbase + n[:, None] * s_kl + dh[None, :], mask=mask[:, None], other=0.0).to(tl.float32)
            k_hi = tl.load(K + kbase + n[:, None] * s_kl + HALF + dh[None, :], mask=mask[:, None], other=0.0).to(tl.float32)
        s = (tl.sum(k_lo * q_lo[None, :], axis=1) + tl.sum(k_hi * q_hi[None, :], axis=1)) * sm_scale
        s = tl.where(mask, s, -float("inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=0))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=0)
        if QUANT:
            vp = tl.load(V + kbase + n[:, None] * s_kl + dh[None, :], mask=mask[:, None], other=0)
            vs = tl.load(VS + sbase + n, mask=mask, other=0.0).to(tl.float32)
            vz = tl.load(VZ + sbase + n, mask=mask, other=0.0).to(tl.float32)
            v_lo = (vp & 0xF).to(tl.float32) * vs[:, None] + vz[:, None]
            v_hi = (vp >> 4).to(tl.float32) * vs[:, None] + vz[:, None]
        else:
            v_lo = tl.load(V + kbase + n[:, None] * s_kl + dh[None, :], mask=mask[:, None], other=0.0).to(tl.float32)
            v_hi = tl.load(V + kbase + n[:, None] * s_kl + HALF + dh[None, :], mask=mask[:, None], other=0.0).to(tl.float32)
        acc_lo = acc_lo * alpha + tl.sum(p[:, None] * v_lo, axis=0)
        acc_hi = acc_hi * alpha + tl.sum(p[:, None] * v_hi, axis=0)
        m_i = m_new
    o = O + b * s_ob + h * s_oh
    tl.store(o + dh, (acc_lo / l_i).to(O.dtype.element_ty))
    tl.store(o + HALF + dh, (acc_hi / l_i).to(O.dtype.element_ty))


def quantize(x: torch.Tensor):
    """[B, H, L, D] -> (codes [B, H, L, D/2] uint8: dim j low nibble, j + D/2 high; scale, zero [B, H, L] fp16)."""
    lo, hi = x.amin(-1), x.amax(-1)
    scale = ((hi - lo) / 15.0).clamp_min(1e-6)
    q = ((x - lo[..., None]) / scale[..., None]).round().clamp(0, 15).to(torch.uint8)
    half = x.shape[-1] // 2
    codes = q[..., :half] | (q[..., half:] << 4)
    return codes.contiguous(), scale.half().contiguous(), lo.half().contiguous()


def dequantize(codes, scale, zero):
    lo, hi = (codes & 0xF), (codes >> 4)
    q = torch.cat([lo, hi], dim=-1).double()
    return q * scale.double()[..., None] + zero.double()[..., None]


def decode(q, k, v, ks=None, kz=None, vs=None, vz=None, block_n: int = 64):
    """One query per (sequence, head): q [B, H, D]; k, v [B, H, L, D] (bf16) or [B, H, L, D/2] codes."""
    B, H, D = q.shape
    L = k.shape[2]
    quant = ks is not None
    o = torch.empty_like(q)
    dummy = q.new_empty(1)
    ks, kz, vs, vz = (t if quant else dummy for t in (ks, kz, vs, vz))
    sb, sh = (ks.stride(0), ks.stride(1)) if quant else (0, 0)
    _decode[(B, H)](q, k, v, ks, kz, vs, vz, o, L, 1.0 / math.sqrt(D),
                    q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2), sb, sh, o.stride(0), o.stride(1),
                    D=D, BLOCK_N=block_n, QUANT=quant)
    return o


def reference(q, k, v):
    s = torch.einsum("bhd,bhld->bhl", q.double(), k.double()) / math.sqrt(q.shape[-1])
    return torch.einsum("bhl,bhld->bhd", torch.softmax(s, -1), v.double())


def check(device: str = "cpu") -> float:
    g = torch.Generator().manual_seed(0)
    B, H, L, D = 2, 3, 70, 32
    dt = torch.float32 if device == "cpu" else torch.bfloat16
    q, k, v = (torch.randn(*s, generator=g).to(device, dt) for s in ((B, H, D), (B, H, L, D), (B, H, L, D)))
    err_fp = (decode(q, k, v, block_n=16).double() - reference(q, k, v)).abs().max().item()
    kq, vq = quantize(k.float()), quantize(v.float())
    out = decode(q, kq[0], vq[0], kq[1], kq[2], vq[1], vq[2], block_n=16).double()
    ref = reference(q, dequantize(*kq), dequantize(*vq))
    err_q = (out - ref).abs().max().item()
    tol = 1e-4 if dt == torch.float32 else 3e-2
    assert err_fp < tol and err_q < tol, (err_fp, err_q)
    return max(err_fp, err_q)


def bench(B: int, L: int, H: int, D: int, reps: int = 20) -> dict:
    dev, dt = "cuda", torch.bfloat16
    q = torch.randn(B, H, D, device=dev, dtype=dt)
    k = torch.randn(B, H, L, D, device=dev, dtype=dt)
    v = torch.randn(B, H, L, D, device=dev, dtype=dt)
    kq, vq = quantize(k.float()), quantize(v.float())
    out = {"batch_size": B, "kv_tokens": L, "heads": H, "head_dim": D}
    for name, fn in (("bf16", lambda: decode(q, k, v)),
                     ("int4", lambda: decode(q, kq[0], vq[0], kq[1], kq[2], vq[1], vq[2]))):
        ts = sorted(time_step(fn, reps))
        out[f"{name}_median_s"] = ts[len(ts) // 2]
    kv_bf16 = 2 * B * H * L * D * 2
    out["bf16_gb_s"] = kv_bf16 / out["bf16_median_s"] / 1e9
    out["int4_over_bf16"] = out["int4_median_s"] / out["bf16_median_s"]
    return out


