"""kvprof kernels: every kernel against a float64 reference, eviction kernels keep exactly the right
tokens, and the CPU grid end to end (measure, kill + resume, OOM point, fit, load in kvsim)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from profiler.kernels import ops  # noqa: E402

F64 = torch.float64


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def r(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype)


# ------------------------------------------------------------------------------------------------
# float64 references, written independently of ops (loops / explicit formulas)
# ------------------------------------------------------------------------------------------------


def ref_attention(q, k, v, mask=None):
    """q [B,Hq,Lq,D], k/v [B,Hkv,L,D]; mask [Lq,L] (True = attend). Returns out, probs (float64)."""
    q, k, v = q.to(F64), k.to(F64), v.to(F64)
    g = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(g, dim=1)
    v = v.repeat_interleave(g, dim=1)
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    p = torch.softmax(s, dim=-1)
    return p @ v, p


def lower_right(lq, lk):
    i = torch.arange(lq)[:, None] + (lk - lq)
    return torch.arange(lk)[None, :] <= i


# ------------------------------------------------------------------------------------------------
# linear layers
# ------------------------------------------------------------------------------------------------


def test_linear_mlp_norm_rotary_other():
    x, w = r(5, 16), r(24, 16)
    torch.testing.assert_close(ops.linear(x, w).to(F64), x.to(F64) @ w.to(F64).T, rtol=1e-5, atol=1e-5)
    wgu, wd = r(2 * 32, 16), r(16, 32)
    xd, gu = x.to(F64), wgu.to(F64)
    g, u = xd @ gu[:32].T, xd @ gu[32:].T
    ref = (g / (1 + torch.exp(-g)) * u) @ wd.to(F64).T
    torch.testing.assert_close(ops.mlp(x, wgu, wd).to(F64), ref, rtol=1e-5, atol=1e-4)
    wn = r(16)
    ref = xd / torch.sqrt((xd ** 2).mean(-1, keepdim=True) + 1e-5) * wn.to(F64)
    torch.testing.assert_close(ops.rms_norm(x, wn).to(F64), ref, rtol=1e-5, atol=1e-5)
    # rotary: pairs (i, i + D/2) rotated by pos * theta^(-2i/D)
    T, H, D = 4, 3, 8
    qh = r(T, H, D)
    cos, sin = ops.rope_cos_sin(torch.arange(T), D, theta=10000.0)
    out = ops.rotary(qh, cos, sin).to(F64)
    qd = qh.to(F64)
    for t in range(T):
        for i in range(D // 2):
            ang = t * 10000.0 ** (-2 * i / D)
            a, b = qd[t, :, i], qd[t, :, i + D // 2]
            torch.testing.assert_close(out[t, :, i], a * math.cos(ang) - b * math.sin(ang), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(out[t, :, i + D // 2], b * math.cos(ang) + a * math.sin(ang), rtol=1e-5, atol=1e-5)
    a_out, m_out, w2, kh = r(T, 16), r(T, 16), r(16), r(T, 1, D)
    xx = r(T, 16)
    h_in, q2, k2, h_post, y = ops.layer_other(xx, a_out, m_out, wn, w2, qh, kh, cos, sin)
    torch.testing.assert_close(h_in, ops.rms_norm(xx, wn))
    torch.testing.assert_close(q2, ops.rotary(qh, cos, sin))
    torch.testing.assert_close(h_post, ops.rms_norm(xx + a_out, w2))
    torch.testing.assert_close(y.to(F64), xx.to(F64) + a_out.to(F64) + m_out.to(F64), rtol=1e-6, atol=1e-5)


def test_moe_matches_per_token_reference():
    T, H, E, I, k = 7, 16, 4, 8, 2
    x, wr, wgu, wd = r(T, H), r(E, H), r(E, 2 * I, H), r(E, H, I)
    sgu, sd = r(2 * I, H), r(H, I)
    out = ops.moe(x, wr, wgu, wd, k, sgu, sd).to(F64)

    def mlp64(xv, gu, d):
        g, u = gu[: gu.shape[0] // 2] @ xv, gu[gu.shape[0] // 2:] @ xv
        return d @ (g / (1 + torch.exp(-g)) * u)

    for t in range(T):
        xv = x[t].to(F64)
        p = torch.softmax(wr.to(F64) @ xv, -1)
        top = sorted(range(E), key=lambda e: -p[e].item())[:k]
        wsum = sum(p[e] for e in top)
        ref = sum(p[e] / wsum * mlp64(xv, wgu[e].to(F64), wd[e].to(F64)) for e in top)
        ref = ref + mlp64(xv, sgu.to(F64), sd.to(F64))
        torch.testing.assert_close(out[t], ref, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------------
# attention
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("lq, lk", [(6, 6), (4, 11), (1, 9)])
def test_prefill_flash_and_eager(lq, lk):
    q, k, v = r(2, 6, lq, 8), r(2, 2, lk, 8), r(2, 2, lk, 8)
    mask = lower_right(lq, lk)
    ref_out, ref_p = ref_attention(q, k, v, mask)
    torch.testing.assert_close(ops.sdpa_prefill(q, k, v).to(F64), ref_out, rtol=1e-5, atol=1e-5)
    out, probs = ops.eager_attention(q, k, v, ops.causal_mask(lq, lk))
    assert torch.equal(ops.causal_mask(lq, lk), mask)
    torch.testing.assert_close(out.to(F64), ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(probs.to(F64), ref_p, rtol=1e-5, atol=1e-6)
    assert probs.dtype == torch.float32


def test_decode_contiguous_and_paged():
    B, Hq, Hkv, D, bs = 3, 8, 2, 16, 4
    q = r(B, Hq, 1, D)
    k, v = r(B, Hkv, 12, D), r(B, Hkv, 12, D)
    torch.testing.assert_close(ops.decode_attention(q, k, v).to(F64), ref_attention(q, k, v)[0], rtol=1e-5, atol=1e-5)
    # paged: 3 blocks per sequence scattered over 11 physical blocks; lengths 12, 9, 5
    kc, vc = r(11, bs, Hkv, D), r(11, bs, Hkv, D)
    table = torch.tensor([[7, 2, 9], [0, 10, 4], [5, 3, 1]])
    lens = torch.tensor([12, 9, 5])
    out = ops.paged_decode_attention(q, kc, vc, table, lens).to(F64)
    for b in range(B):
        kb = torch.cat([kc[j] for j in table[b].tolist()])[: lens[b]].permute(1, 0, 2)[None]  # [1,Hkv,L,D]
        vb = torch.cat([vc[j] for j in table[b].tolist()])[: lens[b]].permute(1, 0, 2)[None]
        torch.testing.assert_close(out[b:b + 1], ref_attention(q[b:b + 1], kb, vb)[0], rtol=1e-5, atol=1e-5)
    full = ops.paged_decode_attention(q, kc, vc, table)  # all blocks full
    kb = torch.stack([torch.cat([kc[j] for j in row.tolist()]) for row in table]).permute(0, 2, 1, 3)
    vb = torch.stack([torch.cat([vc[j] for j in row.tolist()]) for row in table]).permute(0, 2, 1, 3)
    torch.testing.assert_close(full.to(F64), ref_attention(q, kb, vb)[0], rtol=1e-5, atol=1e-5)
    # write_paged puts token n at flat slot s
    kn, vn = r(2, Hkv, D), r(2, Hkv, D)
    ops.write_paged(kc, vc, kn, vn, torch.tensor([13, 42]))
    assert torch.equal(kc[3, 1], kn[0]) and torch.equal(vc[10, 2], vn[1])


# ------------------------------------------------------------------------------------------------
# fp8
# ------------------------------------------------------------------------------------------------


def _fp8_bound(x, scale):
    y = (x.to(F64) / scale.to(F64)).abs()
    return scale.to(F64) * torch.maximum(y * 2.0 ** -4, torch.full_like(y, 2.0 ** -10)) * (1 + 1e-6) + 1e-30


@pytest.mark.parametrize("per_head", [False, True])
def test_fp8_quant_dequant_within_bound(per_head):
    x = r(64, 16, 4, 32) * torch.logspace(-4, 1, 32)  # magnitudes from subnormal to large
    scale = ops.fp8_scale(x, head_dim=-2 if per_head else None)
    assert scale.shape == ((4, 1) if per_head else ())
    xq = ops.fp8_quantize(x, scale)
    assert xq.dtype == torch.float8_e4m3fn
    deq = ops.fp8_dequantize(xq, scale, torch.float32)
    err = (deq.to(F64) - x.to(F64)).abs()
    assert (err <= _fp8_bound(x, scale)).all()
    assert err.max() > 0  # it does quantize


def test_fp8_paged_write_and_decode():
    B, Hq, Hkv, D, bs, nb = 2, 4, 2, 16, 4, 6
    kf, vf = r(nb, bs, Hkv, D), r(nb, bs, Hkv, D)
    ks, vs = ops.fp8_scale(kf, head_dim=-2), ops.fp8_scale(vf)
    kc, vc = ops.fp8_quantize(kf, ks), ops.fp8_quantize(vf, vs)
    kn, vn = r(2, Hkv, D), r(2, Hkv, D)
    ops.fp8_write_paged(kc, vc, kn, vn, torch.tensor([1, 22]), ks, vs)
    assert torch.equal(kc[0, 1].view(torch.uint8), ops.fp8_quantize(kn[:1], ks)[0].view(torch.uint8))
    assert torch.equal(vc[5, 2].view(torch.uint8), ops.fp8_quantize(vn[1:], vs)[0].view(torch.uint8))
    q = r(B, Hq, 1, D)
    table = torch.tensor([[4, 0, 2], [1, 5, 3]])
    lens = torch.tensor([12, 10])
    out = ops.paged_decode_attention_fp8(q, kc, vc, table, ks, vs, lens).to(F64)
    kd = kc.to(F64) * ks.to(F64)  # float64 attention over the dequantized cache
    vd = vc.to(F64) * vs.to(F64)
    for b in range(B):
        kb = torch.cat([kd[j] for j in table[b].tolist()])[: lens[b]].permute(1, 0, 2)[None]
        vb = torch.cat([vd[j] for j in table[b].tolist()])[: lens[b]].permute(1, 0, 2)[None]
        torch.testing.assert_close(out[b:b + 1], ref_attention(q[b:b + 1], kb, vb)[0], rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# KIVI
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pack_unpack_roundtrip(bits):
    codes = torch.randint(0, 1 << bits, (3, 5, 16), dtype=torch.uint8)
    packed = ops.pack_bits(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (3, 5, 16 * bits // 8)
    assert torch.equal(ops.unpack_bits(packed, bits), codes)
    # low bits first: first code in the lowest bits of byte 0
    assert (packed[..., 0] & ((1 << bits) - 1)).equal(codes[..., 0])


@pytest.mark.parametrize("bits, G", [(2, 32), (4, 16), (2, 8)])
def test_kivi_quant_dequant_within_bound(bits, G):
    B, H, T, D = 2, 3, 64, 32
    k = r(B, H, T, D) * torch.linspace(0.1, 5, D)  # channel-dependent ranges (outlier channels)
    v = r(B, H, T, D)
    pk, sk, mk = ops.kivi_quantize_keys(k, bits, G)
    assert pk.shape == (B, H, T, D * bits // 8) and sk.shape == (B, H, T // G, 1, D)
    kd = ops.kivi_dequantize_keys(pk, sk, mk, bits, G)
    # reference groups: per channel d, tokens [g*G, (g+1)*G)
    k64 = k.to(F64).view(B, H, T // G, G, D)
    step = (k64.amax(3, keepdim=True) - k64.amin(3, keepdim=True)) / (2 ** bits - 1)
    err = (kd.to(F64).view(B, H, T // G, G, D) - k64).abs()
    assert (err <= step / 2 * (1 + 1e-5) + 1e-6).all()
    pv, sv, mv = ops.kivi_quantize_values(v, bits, G)
    assert sv.shape == (B, H, T, D // G, 1)
    vd = ops.kivi_dequantize_values(pv, sv, mv, bits, G)
    v64 = v.to(F64).view(B, H, T, D // G, G)
    step = (v64.amax(4, keepdim=True) - v64.amin(4, keepdim=True)) / (2 ** bits - 1)
    assert ((vd.to(F64).view(B, H, T, D // G, G) - v64).abs() <= step / 2 * (1 + 1e-5) + 1e-6).all()
    # constant groups are exact
    c = torch.full((1, 1, G, D), 0.75)
    assert torch.equal(ops.kivi_dequantize_keys(*ops.kivi_quantize_keys(c, bits, G), bits, G), c)


def test_kivi_decode_attention_equals_attention_over_dequantized():
    B, Hq, Hkv, D, G, bits = 2, 8, 2, 32, 32, 2
    nq, nr = 64, 17
    k, v = r(B, Hkv, nq, D), r(B, Hkv, nq, D)
    kq, vq = ops.kivi_quantize_keys(k, bits, G), ops.kivi_quantize_values(v, bits, G)
    kr, vr = r(B, Hkv, nr, D), r(B, Hkv, nr, D)
    q = r(B, Hq, 1, D)
    out = ops.kivi_decode_attention(q, kq, vq, kr, vr, bits, G)
    kall = torch.cat((ops.kivi_dequantize_keys(*kq, bits, G).to(F64), kr.to(F64)), 2)
    vall = torch.cat((ops.kivi_dequantize_values(*vq, bits, G).to(F64), vr.to(F64)), 2)
    torch.testing.assert_close(out.to(F64), ref_attention(q, kall, vall)[0], rtol=1e-5, atol=1e-5)
    # no residual / nothing quantized yet
    empty = (r(B, Hkv, 0, D), r(B, Hkv, 0, D))
    out0 = ops.kivi_decode_attention(q, kq, vq, *empty, bits, G)
    torch.testing.assert_close(out0.to(F64), ref_attention(q, kall[:, :, :nq], vall[:, :, :nq])[0], rtol=1e-5, atol=1e-5)
    z = ops.kivi_quantize_keys(r(B, Hkv, 0, D), bits, G), ops.kivi_quantize_values(r(B, Hkv, 0, D), bits, G)
    out1 = ops.kivi_decode_attention(q, *z, kr, vr, bits, G)
    torch.testing.assert_close(out1.to(F64), ref_attention(q, kr, vr)[0], rtol=1e-5, atol=1e-5)


def test_kivi_flush_writes_the_quantized_residual():
    B, Hkv, D, G, bits, R, T = 2, 2, 32, 32, 4, 64, 192
    store_k = (torch.zeros(B, Hkv, T, D * bits // 8, dtype=torch.uint8), torch.zeros(B, Hkv, T // G, 1, D),
               torch.zeros(B, Hkv, T // G, 1, D))
    store_v = (torch.zeros(B, Hkv, T, D * bits // 8, dtype=torch.uint8), torch.zeros(B, Hkv, T, D // G, 1),
               torch.zeros(B, Hkv, T, D // G, 1))
    kr, vr = r(B, Hkv, R, D), r(B, Hkv, R, D)
    ops.kivi_flush(kr, vr, store_k, store_v, 64, bits, G)
    kd = ops.kivi_dequantize_keys(store_k[0][:, :, 64:128], store_k[1][:, :, 2:4], store_k[2][:, :, 2:4], bits, G)
    vd = ops.kivi_dequantize_values(store_v[0][:, :, 64:128], store_v[1][:, :, 64:128], store_v[2][:, :, 64:128], bits, G)
    assert torch.equal(kd, ops.kivi_dequantize_keys(*ops.kivi_quantize_keys(kr, bits, G), bits, G))
    assert torch.equal(vd, ops.kivi_dequantize_values(*ops.kivi_quantize_values(vr, bits, G), bits, G))
    assert store_k[0][:, :, :64].eq(0).all() and store_k[0][:, :, 128:].eq(0).all()


# ------------------------------------------------------------------------------------------------
# H2O
# ------------------------------------------------------------------------------------------------


def test_h2o_accumulate():
    B, Hq, Hkv, Lq, L = 2, 6, 2, 3, 10
    probs = torch.rand(B, Hq, Lq, 8)
    score = torch.rand(B, Hkv, L)
    ref = score.to(F64).clone()
    for b in range(B):
        for h in range(Hq):
            for j in range(8):
                ref[b, h // 3, j] += probs[b, h, :, j].to(F64).sum()
    torch.testing.assert_close(ops.h2o_accumulate(score, probs).to(F64), ref, rtol=1e-6, atol=1e-6)


def test_h2o_keep_indices_exact():
    B, H, L, budget, window = 2, 3, 40, 12, 4
    score = torch.rand(B, H, L)
    idx = ops.h2o_keep_indices(score, budget, window)
    for b in range(B):
        for h in range(H):
            s = score[b, h].tolist()
            heavy = sorted(sorted(range(L - window), key=lambda j: -s[j])[: budget - window])
            assert idx[b, h].tolist() == heavy + list(range(L - window, L))
    k = r(B, H, L, 5)
    kk, vv, sc, pos = ops.h2o_compress(k, k * 2, score, budget, window)
    assert torch.equal(pos, idx) and torch.equal(kk[1, 2, 3], k[1, 2, idx[1, 2, 3]])
    assert torch.equal(vv, kk * 2) and torch.equal(sc, score.gather(2, idx))


def test_h2o_decode_steps_keep_exactly_the_reference_set():
    """Run H2O decode on a cache of `budget` slots for many steps; compare the kept positions per head
    with a plain-Python H2O (accumulate, then evict the lowest-score token outside the recent window)."""
    B, Hq, Hkv, D, budget, window, steps = 2, 4, 2, 3, 8, 3, 25
    pos = torch.arange(budget).expand(B, Hkv, budget).contiguous()
    k = pos[..., None].float().expand(-1, -1, -1, D).contiguous()  # payload = position, to read back
    v = -k
    score = torch.zeros(B, Hkv, budget)
    ref = [[{p: 0.0 for p in range(budget)} for _ in range(Hkv)] for _ in range(B)]
    for step in range(steps):
        cur = budget + step
        probs = torch.rand(B, Hq, 1, budget)
        # reference: mass of each kept token (slot -> position via the kernel's pos before the update)
        for b in range(B):
            for h in range(Hkv):
                for slot in range(budget):
                    p = pos[b, h, slot].item()
                    ref[b][h][p] += probs[b, 2 * h:2 * h + 2, 0, slot].to(F64).sum().item()
                old = [p for p in ref[b][h] if p <= cur - window]
                victim = min(old, key=lambda p: ref[b][h][p])
                del ref[b][h][victim]
                ref[b][h][cur] = 0.0
        kn = torch.full((B, Hkv, 1, D), float(cur))
        ops.h2o_decode_update(k, v, score, pos, probs, kn, -kn, cur, window)
        for b in range(B):
            for h in range(Hkv):
                assert sorted(pos[b, h].tolist()) == sorted(ref[b][h])
                assert sorted(k[b, h, :, 0].long().tolist()) == sorted(ref[b][h])  # K moved with it
                assert torch.equal(v[b, h], -k[b, h])
                for slot in range(budget):
                    assert score[b, h, slot].item() == pytest.approx(ref[b][h][pos[b, h, slot].item()], abs=1e-5)


# ------------------------------------------------------------------------------------------------
# StreamingLLM
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("L", [20, 23, 31])
def test_streaming_compress_then_ring_writes(L):
    sink, window, B, H = 3, 7, 2, 2
    positions = torch.arange(L).float()
    k = positions[None, None, :, None].expand(B, H, L, 2).contiguous()
    kk, vv = ops.streaming_compress(k, -k, sink, window)
    kept = kk[0, 0, :, 0].long()
    assert sorted(kept.tolist()) == list(range(sink)) + list(range(L - window, L))
    for slot, p in enumerate(kept.tolist()):  # each token in its ring slot
        assert slot == (p if p < sink else ops.streaming_slot(torch.tensor(p), sink, window).item())
    kk, vv = kk.clone(), vv.clone()
    for t in range(L, L + 2 * window + 1):
        kn = torch.full((B, H, 1, 2), float(t))
        ops.streaming_write(kk, vv, kn, -kn, ops.streaming_slot(torch.full((B,), t), sink, window))
        for b in range(B):
            assert sorted(kk[b, 0, :, 0].long().tolist()) == list(range(sink)) + list(range(t + 1 - window, t + 1))
    assert torch.equal(vv, -kk)
    short = r(1, 1, sink + window, 2)
    assert ops.streaming_compress(short, short, sink, window)[0] is short


# ------------------------------------------------------------------------------------------------
# SnapKV
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kernel_size", [7, 4, 1])
def test_snapkv_select_exact(kernel_size):
    B, Hq, Hkv, D, L, budget, window = 2, 4, 2, 8, 50, 20, 5
    q = r(B, Hq, window, D, dtype=F64)
    k, v = r(B, Hkv, L, D, dtype=F64), r(B, Hkv, L, D, dtype=F64)
    idx = ops.snapkv_select(q, k, budget, window, kernel_size)
    _, probs = ref_attention(q, k, v, lower_right(window, L))
    n = L - window
    pad = kernel_size // 2
    for b in range(B):
        for h in range(Hkv):
            mass = [probs[b, 2 * h:2 * h + 2, :, j].sum().item() for j in range(n)]
            pooled = [sum(mass[i] for i in range(j - pad, j - pad + kernel_size) if 0 <= i < n) / kernel_size
                      for j in range(n)]
            top = sorted(sorted(range(n), key=lambda j: -pooled[j])[: budget - window])
            assert idx[b, h].tolist() == top + list(range(n, L))
    kk, vv = ops.snapkv_compress(q, k, v, budget, window, kernel_size)
    assert torch.equal(kk, ops.gather_tokens(k, idx)) and torch.equal(vv[1, 0, 4], v[1, 0, idx[1, 0, 4]])
    small = k[:, :, :budget]
    assert ops.snapkv_compress(q, small, small, budget, window, kernel_size)[0] is small


# ------------------------------------------------------------------------------------------------
# the CPU grid end to end
# ------------------------------------------------------------------------------------------------

TINY_MODEL = {"architectures": ["LlamaForCausalLM"], "hidden_size": 128, "intermediate_size": 256,
              "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32, "num_hidden_layers": 2,
              "vocab_size": 512, "torch_dtype": "bfloat16", "max_position_embeddings": 4096}
OOM_POINT = ("attention.decode.none", {"batch_size": 2, "kv_tokens": 256})


def _lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def _keys(recs):
    from profiler.kernels import point_key

    return [point_key(x["table"], x["axes"]) for x in recs if x["record"] == "point"]


def test_cpu_grid_measure_resume_oom_fit_load(tmp_path, monkeypatch):
    from kvsim.cost.profile import load_profile
    from kvsim.specs.model import load_model
    from profiler import cli
    from profiler.kernels import grid as G
    from profiler.kernels import point_key

    cfg = tmp_path / "tiny" / "config.json"
    cfg.parent.mkdir()
    cfg.write_text(json.dumps(TINY_MODEL))
    model = load_model(str(cfg))
    methods = G.parse_methods(G.all_methods())
    planned = [point_key(t, a) for t, a in G.plan(G.GRIDS["tiny"], model, methods)]
    assert len(planned) == len(set(planned)) and any(k.startswith("extra.prefill.snapkv") for k in planned)

    real_build = G.build_bench

    def build_with_oom(table, axes, ctx):
        if (table, axes) == OOM_POINT:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB (injected)")
        return real_build(table, axes, ctx)

    monkeypatch.setattr(G, "build_bench", build_with_oom)
    full = tmp_path / "full"
    raw = G.run_grid(full, model, methods, device="cpu", grid=G.GRIDS["tiny"], command="test", progress=False)
    recs = _lines(raw)
    head = recs[0]
    assert head["record"] == "header" and head["device_type"] == "cpu" and head["dtype"] == "bfloat16"
    for key in ("device", "driver", "torch", "cuda", "date", "command", "model", "methods"):
        assert key in head
    assert sorted(_keys(recs)) == sorted(planned)  # every point exactly once, the grid went on after the OOM
    by_key = {point_key(x["table"], x["axes"]): x for x in recs[1:]}
    oom = by_key[point_key(*OOM_POINT)]
    assert oom["oom"] is True and "injected" in oom["error"] and "median_s" not in oom
    assert all(x["median_s"] > 0 and x["repeats"] >= 3 for x in recs[1:] if not x["oom"])

    # kill and resume: header + 40 points + half of the next line, as a kill during a write leaves it
    part = tmp_path / "part"
    part.mkdir()
    text = raw.read_text().splitlines(keepends=True)
    kept = text[:41]
    (part / "raw.jsonl").write_text("".join(kept) + text[41][: len(text[41]) // 2])
    monkeypatch.setattr(G, "build_bench", real_build)
    calls = []

    def counting_build(table, axes, ctx):
        calls.append(point_key(table, axes))
        return real_build(table, axes, ctx)

    monkeypatch.setattr(G, "build_bench", counting_build)
    G.run_grid(part, model, methods, device="cpu", grid=G.GRIDS["tiny"], command="test resume", progress=False)
    resumed = (part / "raw.jsonl").read_text().splitlines(keepends=True)
    assert resumed[:41] == kept  # finished points untouched
    recs2 = _lines(part / "raw.jsonl")
    assert sorted(_keys(recs2)) == sorted(planned)  # nothing lost, nothing duplicated
    assert len(calls) == len(planned) - 40 and not set(calls) & set(_keys(recs[:41]))
    assert [x["record"] for x in recs2].count("session") == 1

    # the same command on a finished file measures nothing; --retry-oom re-measures the OOM point only
    before = raw.read_text()
    calls.clear()
    G.run_grid(full, model, methods, device="cpu", grid=G.GRIDS["tiny"], command="again", progress=False)
    assert raw.read_text() == before and calls == []

    # fit the file with the OOM point, load it in kvsim
    prof_path = tmp_path / "profile.json"
    assert cli.main(["fit", str(full), "--out", str(prof_path)]) == 0
    prof = load_profile(prof_path)
    assert prof.model == "tiny" and prof.hardware == "cpu" and prof.tensor_parallel_size == 1
    for k, x in by_key.items():
        t = prof.table(x["table"])
        got = t.lookup(**x["axes"])
        assert got == (None if x["oom"] else x["median_s"]), k
    assert set(prof.loo_error) <= set(prof.tables) and prof.loo_error
    flash = prof.table("attention.prefill.flash")  # measured values only: no chunk longer than its context
    assert flash.lookup(chunk_tokens=256, kv_tokens=128) is None and flash.lookup(chunk_tokens=256, kv_tokens=256)

    calls.clear()
    G.run_grid(full, model, methods, device="cpu", grid=G.GRIDS["tiny"], command="retry", retry_oom=True,
               progress=False)
    assert calls == [point_key(*OOM_POINT)]
    assert cli.main(["fit", str(full / "raw.jsonl"), "--out", str(prof_path)]) == 0
    assert load_profile(prof_path).table(OOM_POINT[0]).lookup(**OOM_POINT[1]) is not None


def test_cli_cpu_tiny_grid_and_refusals(tmp_path, capsys):
    from profiler import cli

    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(TINY_MODEL))
    out = tmp_path / "run"
    args = ["kernels", "--model", str(cfg), "--device", "cpu", "--out", str(out), "--no-progress",
            "--methods", "none,kivi:bits=4", "--tables", "linear.qkv,attention.decode"]
    assert cli.main(args) == 0
    recs = _lines(out / "raw.jsonl")
    assert {x["table"] for x in recs[1:]} == {"linear.qkv", "attention.decode.none", "attention.decode.kivi"}
    assert recs[0]["methods"]["kivi"]["bits"] == 4
    # resuming with different knobs for a measured method is refused
    bad = args[:-4] + ["--methods", "kivi:bits=2", "--tables", "attention.decode"]
    assert cli.main(bad) == 2
    assert "cannot resume" in capsys.readouterr().err
    assert cli.main(["kernels", "--model", str(cfg), "--device", "cpu", "--out", str(out), "--methods", "zip"]) == 2
    assert cli.main(["kernels", "--model", str(cfg), "--out", str(out), "--dry-run", "--grid", "tiny"]) == 0
    assert "points" in capsys.readouterr().out
    assert cli.main(["fit", str(out), "--out", str(tmp_path / "p.json")]) == 0


def test_truncated_header_starts_over(tmp_path):
    from kvsim.specs.model import ModelSpec
    from profiler.kernels import grid as G

    model = ModelSpec(name="t", num_layers=1, hidden_size=64, num_attention_heads=2, num_kv_heads=1, head_dim=32,
                      intermediate_size=128, vocab_size=100)
    (tmp_path / "raw.jsonl").write_text('{"record": "header", "form')
    G.run_grid(tmp_path, model, G.parse_methods("none"), device="cpu", grid=G.GRIDS["tiny"], tables=["linear.qkv"],
               progress=False)
    recs = _lines(tmp_path / "raw.jsonl")
    assert recs[0]["record"] == "header" and len(recs) == 1 + len(G.GRIDS["tiny"].num_tokens)


def test_int4_decode_kernels_match_a_float64_reference():
    """kvprof int4-decode's Triton kernels (bf16 and LMDeploy-style int4), run by Triton's interpreter on CPU
    (in a subprocess: Triton reads TRITON_INTERPRET when it is imported)."""
    pytest.importorskip("triton")
    import os
    import subprocess
    import sys

    code = "from profiler.kernels.int4_triton import check; print(check('cpu'))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "TRITON_INTERPRET": "1"}, cwd=Path(__file__).resolve().parents[1])
    if r.returncode != 0 and "InterpreterError" in r.stderr:
        pytest.skip(f"Triton's CPU interpreter fails here: {r.stderr.strip().splitlines()[-1]}")
    assert r.returncode == 0, r.stderr
    assert float(r.stdout.strip().splitlines()[-1]) < 1e-4
