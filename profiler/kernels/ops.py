"""The kernels ``kvprof kernels`` times, written in plain torch so that each computes the real thing.

Layouts (GQA everywhere: ``Hq = Hkv * G``, query head ``h`` reads KV head ``h // G``):

- ``q``: ``[B, Hq, Lq, D]``; contiguous K/V: ``[B, Hkv, L, D]``;
- paged K/V cache (vLLM flash layout): ``[num_blocks, block_size, Hkv, D]`` with a block table
  ``[B, blocks_per_seq]`` of block indices;
- linear weights as ``nn.Linear`` stores them: ``[out_features, in_features]``.

Every function is checked against a float64 reference in ``tests/test_kernels.py``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

# ================================================================================================
# linear layers
# ================================================================================================


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``x @ w.T`` (QKV, O and LM head projections)."""
    return F.linear(x, w)


def mlp(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    """Gated MLP: ``down(silu(gate(x)) * up(x))`` with gate and up fused in one GEMM ``[2I, H]``."""
    gate, up = F.linear(x, w_gate_up).chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, w_down)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float = 500000.0, dtype=torch.float32):
    """cos, sin of shape ``[T, 1, D]`` for rotate-half rotary embeddings."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    freqs = positions.float()[:, None] * inv[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE on ``[T, H, D]``."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def layer_other(x, attn_out, mlp_out, w_norm1, w_norm2, q, k, cos, sin, eps: float = 1e-5):
    """The rest of one layer: input RMSNorm, rotary on q and k, residual add, post-attention RMSNorm,
    residual add. Returns (normed input, q, k, normed hidden, layer output)."""
    h_in = rms_norm(x, w_norm1, eps)
    q = rotary(q, cos, sin)
    k = rotary(k, cos, sin)
    h = x + attn_out
    h_post = rms_norm(h, w_norm2, eps)
    return h_in, q, k, h_post, h + mlp_out


def moe(x, w_router, w_gate_up, w_down, top_k: int, w_shared_gate_up=None, w_shared_down=None,
        renormalize: bool = True):
    """One MoE layer: router GEMM, softmax, top-k, tokens grouped by expert, each expert's gated MLP,
    weighted scatter-add back; plus the shared expert (dense MLP) when given.

    ``w_gate_up``: ``[E, 2I, H]``, ``w_down``: ``[E, H, I]``.
    """
    num_experts = w_gate_up.shape[0]
    probs = torch.softmax(F.linear(x, w_router).float(), dim=-1)
    top_w, top_i = probs.topk(top_k, dim=-1)
    if renormalize:
        top_w = top_w / top_w.sum(-1, keepdim=True)
    flat_e = top_i.flatten()
    order = flat_e.argsort()
    token_of = order // top_k
    counts = torch.bincount(flat_e, minlength=num_experts).tolist()
    weights = top_w.flatten()[order].to(x.dtype)[:, None]
    out = torch.zeros_like(x)
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        rows = token_of[start:start + n]
        y = mlp(x[rows], w_gate_up[e], w_down[e]) * weights[start:start + n]
        out.index_add_(0, rows, y)
        start += n
    if w_shared_gate_up is not None:
        out = out + mlp(x, w_shared_gate_up, w_shared_down)
    return out


# ================================================================================================
# attention
# ================================================================================================


def causal_mask(q_len: int, kv_len: int, device=None) -> torch.Tensor:
    """Boolean ``[q_len, kv_len]``, True where query i (the last q_len positions) may see key j."""
    return torch.ones(q_len, kv_len, dtype=torch.bool, device=device).tril(kv_len - q_len)


def sdpa_prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention of a chunk of ``Lq`` queries (the last ``Lq`` of ``L`` positions) over ``L`` keys,
    through ``scaled_dot_product_attention`` (FlashAttention on CUDA), no score matrix kept."""
    lq, lk = q.shape[-2], k.shape[-2]
    if lq == lk:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(lq, lk), enable_gqa=True)


def eager_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None):
    """Attention with the score matrix materialised: ``QK^T`` GEMM, softmax (fp32), ``PV`` GEMM.

    Returns (output ``[B, Hq, Lq, D]``, probabilities ``[B, Hq, Lq, L]`` in fp32) — the probabilities
    are what H2O accumulates and SnapKV scores. ``mask``: bool ``[Lq, L]``, True = attend.
    """
    b, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    g = hq // hkv
    qg = (q * (1.0 / math.sqrt(d))).reshape(b, hkv, g * lq, d)
    scores = torch.matmul(qg, k.transpose(-1, -2)).view(b, hkv, g, lq, lk)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32)
    out = torch.matmul(probs.to(v.dtype).view(b, hkv, g * lq, lk), v)
    return out.view(b, hq, lq, d), probs.view(b, hq, lq, lk)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask=None) -> torch.Tensor:
    """One query per sequence over a contiguous cache ``[B, Hkv, L, D]`` (SDPA, GQA)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, enable_gqa=True)


def gather_paged(cache: torch.Tensor, block_table: torch.Tensor) -> torch.Tensor:
    """Paged cache ``[NB, bs, Hkv, D]`` + block table ``[B, nb]`` -> ``[B, Hkv, nb*bs, D]``."""
    b, nb = block_table.shape
    blocks = cache[block_table]  # [B, nb, bs, Hkv, D]
    return blocks.view(b, nb * cache.shape[1], cache.shape[2], cache.shape[3]).transpose(1, 2)


def _length_mask(seq_lens: torch.Tensor | None, length: int, device):
    if seq_lens is None:
        return None
    return (torch.arange(length, device=device)[None, :] < seq_lens[:, None])[:, None, None, :]


def paged_decode_attention(q, k_cache, v_cache, block_table, seq_lens=None) -> torch.Tensor:
    """Decode attention over a paged cache: gather each sequence's blocks, then SDPA.

    ``seq_lens`` ``[B]``: valid tokens per sequence (the rest of the last block is masked);
    None when every sequence fills its blocks.
    """
    k = gather_paged(k_cache, block_table)
    v = gather_paged(v_cache, block_table)
    return decode_attention(q, k, v, _length_mask(seq_lens, k.shape[2], q.device))


def write_paged(k_cache, v_cache, k_new, v_new, slot_mapping) -> None:
    """Store new tokens' K/V ``[N, Hkv, D]`` at flat slots ``block * block_size + offset``."""
    k_cache.view(-1, k_cache.shape[2], k_cache.shape[3])[slot_mapping] = k_new
    v_cache.view(-1, v_cache.shape[2], v_cache.shape[3])[slot_mapping] = v_new


# ================================================================================================
# fp8 (e4m3) KV cache, as vLLM's kv_cache_dtype=fp8: x_q = fp8(x / scale), x = x_q * scale
# ================================================================================================

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448


def fp8_scale(x: torch.Tensor, head_dim: int | None = None) -> torch.Tensor:
    """Scale so that amax maps to 448: per tensor (``head_dim=None``, shape ``[]``) or per head
    (``head_dim`` = the axis of KV heads; shape keeps that axis and the trailing ones as 1)."""
    xa = x.detach().abs().float()
    if head_dim is None:
        amax = xa.amax()
    else:
        hd = head_dim % x.dim()
        amax = xa.amax(dim=[i for i in range(x.dim()) if i != hd], keepdim=True)
        amax = amax.view(amax.shape[hd], *([1] * (x.dim() - hd - 1)))
    return (amax / FP8_MAX).clamp_min(1e-12)


def fp8_quantize(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)


def fp8_dequantize(xq: torch.Tensor, scale: torch.Tensor, dtype=torch.bfloat16) -> torch.Tensor:
    """e4m3 values are exact in bf16/fp16/fp32, so only the multiply by the scale rounds."""
    return xq.to(dtype) * scale.to(dtype)


def fp8_write_paged(k_cache8, v_cache8, k_new, v_new, slot_mapping, k_scale, v_scale) -> None:
    """Quantize new tokens ``[N, Hkv, D]`` and store them in fp8 paged caches (vLLM reshape_and_cache)."""
    kq = fp8_quantize(k_new, k_scale).view(torch.uint8)
    vq = fp8_quantize(v_new, v_scale).view(torch.uint8)
    write_paged(k_cache8.view(torch.uint8), v_cache8.view(torch.uint8), kq, vq, slot_mapping)


def paged_decode_attention_fp8(q, k_cache8, v_cache8, block_table, k_scale, v_scale, seq_lens=None):
    """Decode attention over fp8 paged caches: gather blocks, dequantize to q's dtype, SDPA.
    Scales are per tensor (``[]``) or per head (``[Hkv, 1]``, broadcast over ``[.., Hkv, D]``)."""
    b, nb = block_table.shape
    bs, hkv, d = k_cache8.shape[1:]

    def load(cache, scale):
        raw = cache.view(torch.uint8)[block_table].view(FP8)  # [B, nb, bs, Hkv, D]
        x = fp8_dequantize(raw, scale, q.dtype)
        return x.view(b, nb * bs, hkv, d).transpose(1, 2)

    k = load(k_cache8, k_scale)
    v = load(v_cache8, v_scale)
    return decode_attention(q, k, v, _length_mask(seq_lens, k.shape[2], q.device))


# ================================================================================================
# KIVI (Liu et al., ICML 2024): keys per channel, values per token, asymmetric min/max, packed bits
# ================================================================================================


def pack_bits(q: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes (< 2**bits) along the last axis -> bytes, ``8 // bits`` codes per byte, low bits first."""
    per = 8 // bits
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=q.device)
    # the shifted codes occupy disjoint bits, so their sum is their bitwise or
    return (q.view(*q.shape[:-1], q.shape[-1] // per, per) << shifts).sum(-1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int) -> torch.Tensor:
    per = 8 // bits
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
    codes = (packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return codes.view(*packed.shape[:-1], packed.shape[-1] * per)


def _quant_minmax(x: torch.Tensor, dim: int, bits: int):
    """Asymmetric quantization with min/max over ``dim``: codes uint8, scale and minimum (x's dtype)."""
    xf = x.float()
    mn = xf.amin(dim=dim, keepdim=True)
    mx = xf.amax(dim=dim, keepdim=True)
    scale = (mx - mn) / ((1 << bits) - 1)
    scale_s, mn_s = scale.to(x.dtype), mn.to(x.dtype)
    safe = torch.where(scale_s > 0, scale_s, torch.ones_like(scale_s)).float()
    codes = ((xf - mn_s.float()) / safe).round_().clamp_(0, (1 << bits) - 1).to(torch.uint8)
    return codes, scale_s, mn_s


def kivi_quantize_keys(k: torch.Tensor, bits: int, group_size: int):
    """Keys ``[.., T, D]`` (T a multiple of group_size): per-channel groups of ``group_size`` tokens.
    Returns (packed ``[.., T, D*bits/8]`` uint8, scale ``[.., T/G, 1, D]``, min ``[.., T/G, 1, D]``)."""
    *lead, t, d = k.shape
    codes, scale, mn = _quant_minmax(k.reshape(*lead, t // group_size, group_size, d), -2, bits)
    return pack_bits(codes.view(*lead, t, d), bits), scale, mn


def kivi_dequantize_keys(packed, scale, mn, bits: int, group_size: int, dtype=None) -> torch.Tensor:
    *lead, t, _ = packed.shape
    codes = unpack_bits(packed, bits)
    d = codes.shape[-1]
    dtype = dtype or scale.dtype
    x = codes.view(*lead, t // group_size, group_size, d).to(dtype) * scale.to(dtype) + mn.to(dtype)
    return x.view(*lead, t, d)


def kivi_quantize_values(v: torch.Tensor, bits: int, group_size: int):
    """Values ``[.., T, D]``: per-token groups of ``group_size`` channels.
    Returns (packed ``[.., T, D*bits/8]``, scale ``[.., T, D/G, 1]``, min ``[.., T, D/G, 1]``)."""
    *lead, t, d = v.shape
    codes, scale, mn = _quant_minmax(v.reshape(*lead, t, d // group_size, group_size), -1, bits)
    return pack_bits(codes.view(*lead, t, d), bits), scale, mn


def kivi_dequantize_values(packed, scale, mn, bits: int, group_size: int, dtype=None) -> torch.Tensor:
    *lead, t, _ = packed.shape
    codes = unpack_bits(packed, bits)
    d = codes.shape[-1]
    dtype = dtype or scale.dtype
    x = codes.view(*lead, t, d // group_size, group_size).to(dtype) * scale.to(dtype) + mn.to(dtype)
    return x.view(*lead, t, d)


def kivi_decode_attention(q, kq, vq, k_res, v_res, bits: int, group_size: int) -> torch.Tensor:
    """Decode attention over a KIVI cache: ``kq``/``vq`` are (packed, scale, min) of the quantized
    tokens, ``k_res``/``v_res`` ``[B, Hkv, R, D]`` the full-precision residual (the newest tokens).
    Scores over both parts share one softmax; the output is P_q V_q + P_r V_r (as KIVI's kernel)."""
    b, hq, _, d = q.shape
    hkv = k_res.shape[1]
    g = hq // hkv
    kd = kivi_dequantize_keys(*kq, bits, group_size, dtype=q.dtype)
    vd = kivi_dequantize_values(*vq, bits, group_size, dtype=q.dtype)
    qg = (q * (1.0 / math.sqrt(d))).reshape(b, hkv, g, d)
    scores = torch.cat((torch.matmul(qg, kd.transpose(-1, -2)), torch.matmul(qg, k_res.transpose(-1, -2))), dim=-1)
    p = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    nq = kd.shape[2]
    out = torch.matmul(p[..., :nq], vd) + torch.matmul(p[..., nq:], v_res)
    return out.view(b, hq, 1, d)


def kivi_flush(k_res, v_res, store_k, store_v, offset: int, bits: int, group_size: int) -> None:
    """Quantize a full residual ``[B, Hkv, R, D]`` and write it into the quantized store at token
    ``offset``. ``store_k`` = (packed ``[B,Hkv,T,D*b/8]``, scale ``[B,Hkv,T/G,1,D]``, min), ``store_v`` =
    (packed, scale ``[B,Hkv,T,D/G,1]``, min)."""
    r = k_res.shape[2]
    pk, sk, mk = kivi_quantize_keys(k_res, bits, group_size)
    pv, sv, mv = kivi_quantize_values(v_res, bits, group_size)
    g0, g1 = offset // group_size, (offset + r) // group_size
    store_k[0][:, :, offset:offset + r].copy_(pk)
    store_k[1][:, :, g0:g1].copy_(sk)
    store_k[2][:, :, g0:g1].copy_(mk)
    store_v[0][:, :, offset:offset + r].copy_(pv)
    store_v[1][:, :, offset:offset + r].copy_(sv)
    store_v[2][:, :, offset:offset + r].copy_(mv)


# ================================================================================================
# H2O (Zhang et al., NeurIPS 2023): accumulated attention mass, keep heavy hitters + recent window
# ================================================================================================


def h2o_accumulate(score: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """Add the attention mass each key received (summed over the query heads of its KV head and over
    queries) to the running ``score`` ``[B, Hkv, L]`` (fp32), in place. ``probs``: ``[B, Hq, Lq, L']``
    with ``L' <= L`` (keys beyond L' receive nothing)."""
    b, hq, lq, lk = probs.shape
    hkv = score.shape[1]
    score[..., :lk] += probs.view(b, hkv, hq // hkv, lq, lk).sum(dim=(2, 3))
    return score


def h2o_evict_slot(score: torch.Tensor, pos: torch.Tensor, cur_pos, window: int) -> torch.Tensor:
    """Slot ``[B, Hkv]`` to evict: the lowest accumulated score among tokens outside the recent window
    (positions ``> cur_pos - window`` are protected). ``pos``: position held in each slot ``[B,Hkv,L]``."""
    protected = pos > (cur_pos - window)
    return score.masked_fill(protected, float("inf")).argmin(dim=-1)


def h2o_replace(k_cache, v_cache, score, pos, slot, k_new, v_new, new_pos) -> None:
    """Put the new token (``[B, Hkv, 1, D]``, position ``new_pos``: an int or ``[B, 1, 1]``) into ``slot``;
    its score starts at 0."""
    d = k_cache.shape[-1]
    idx = slot[:, :, None, None].expand(-1, -1, 1, d)
    k_cache.scatter_(2, idx, k_new)
    v_cache.scatter_(2, idx, v_new)
    score.scatter_(2, slot[:, :, None], 0.0)
    at = slot[:, :, None]
    if torch.is_tensor(new_pos):
        pos.scatter_(2, at, new_pos.to(pos.dtype).expand_as(at).contiguous())
    else:
        pos.scatter_(2, at, new_pos)


def h2o_decode_update(k_cache, v_cache, score, pos, probs_prev, k_new, v_new, cur_pos: int, window: int) -> None:
    """One decode step of H2O's own work on a full cache: accumulate the previous step's attention mass,
    evict the lightest non-recent token and write the new token in its slot."""
    h2o_accumulate(score, probs_prev)
    slot = h2o_evict_slot(score, pos, cur_pos, window)
    h2o_replace(k_cache, v_cache, score, pos, slot, k_new, v_new, cur_pos)


def h2o_keep_indices(score: torch.Tensor, budget: int, window: int) -> torch.Tensor:
    """Positions to keep ``[B, Hkv, budget]`` (sorted): the ``budget - window`` highest scores among the
    older tokens plus the ``window`` most recent. ``score``: ``[B, Hkv, L]`` with ``L > budget``."""
    b, h, length = score.shape
    heavy = score[..., :length - window].topk(budget - window, dim=-1).indices.sort(dim=-1).values
    recent = torch.arange(length - window, length, device=score.device).expand(b, h, window)
    return torch.cat((heavy, recent), dim=-1)


def gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``x`` ``[B, Hkv, L, D]``, ``idx`` ``[B, Hkv, K]`` -> ``[B, Hkv, K, D]`` (per-head compaction)."""
    return x.gather(2, idx[..., None].expand(-1, -1, -1, x.shape[-1]))


def h2o_compress(k, v, score, budget: int, window: int):
    """End-of-prefill compaction: keep heavy hitters + recent window. Returns (k, v, score, positions)."""
    idx = h2o_keep_indices(score, budget, window)
    return gather_tokens(k, idx), gather_tokens(v, idx), score.gather(2, idx), idx


# ================================================================================================
# StreamingLLM (Xiao et al., ICLR 2024): attention sinks + a ring buffer of the recent window
# ================================================================================================


def streaming_slot(positions: torch.Tensor, sink: int, window: int) -> torch.Tensor:
    """Ring-buffer slot of the token at absolute position t (``t >= sink``): ``sink + (t - sink) % window``."""
    return sink + (positions - sink) % window


def streaming_keep_indices(length: int, sink: int, window: int, device=None) -> torch.Tensor:
    """Source positions for slots ``0 .. sink+window-1`` after prefilling ``length > sink+window`` tokens:
    the sinks, then the last ``window`` tokens, each in its ring slot (so later writes evict the oldest)."""
    slots = torch.arange(sink, sink + window, device=device)
    start = length - window
    recent = start + (slots - start) % window  # token t sits in slot sink + (t - sink) % window
    return torch.cat((torch.arange(sink, device=device), recent))


def streaming_compress(k, v, sink: int, window: int):
    """Keep the sinks and the recent window of ``[B, Hkv, L, D]`` (nothing to do when L <= sink+window)."""
    length = k.shape[2]
    if length <= sink + window:
        return k, v
    idx = streaming_keep_indices(length, sink, window, k.device)
    return k.index_select(2, idx), v.index_select(2, idx)


def streaming_write(k_cache, v_cache, k_new, v_new, slots) -> None:
    """Write each sequence's new token ``[B, Hkv, 1, D]`` into its ring slot ``slots`` ``[B]``
    (overwriting — evicting — the oldest token of the window)."""
    b = torch.arange(k_cache.shape[0], device=k_cache.device)
    k_cache[b, :, slots] = k_new[:, :, 0]
    v_cache[b, :, slots] = v_new[:, :, 0]


# ================================================================================================
# SnapKV (Li et al., NeurIPS 2024): observation-window scores, 1-D pooling, top-k per KV head
# ================================================================================================


def snapkv_select(q_win: torch.Tensor, k: torch.Tensor, budget: int, window: int, kernel_size: int) -> torch.Tensor:
    """Positions to keep ``[B, Hkv, budget]``: the last ``window`` queries ``q_win`` ``[B, Hq, window, D]``
    attend (causally) over all L keys; the probability mass on the prefix ``L - window`` keys is summed over
    window queries and the query heads of each KV head, average-pooled (``kernel_size``, stride 1, same
    length), and its top ``budget - window`` positions are kept (sorted) with the window itself."""
    b, hq, w, d = q_win.shape
    hkv, length = k.shape[1], k.shape[2]
    g = hq // hkv
    qg = (q_win * (1.0 / math.sqrt(d))).reshape(b, hkv, g * w, d)
    scores = torch.matmul(qg, k.transpose(-1, -2)).view(b, hkv, g, w, length)
    scores = scores.masked_fill(~causal_mask(w, length, k.device), float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32)
    mass = probs[..., :length - window].sum(dim=(2, 3))  # [B, Hkv, L - window]
    pooled = F.avg_pool1d(mass, kernel_size, stride=1, padding=kernel_size // 2)[..., :length - window]
    top = pooled.topk(budget - window, dim=-1).indices.sort(dim=-1).values
    recent = torch.arange(length - window, length, device=k.device).expand(b, hkv, window)
    return torch.cat((top, recent), dim=-1)


def snapkv_compress(q_win, k, v, budget: int, window: int, kernel_size: int):
    """SnapKV at the end of prefill; unchanged when the prompt already fits the budget."""
    if k.shape[2] <= budget:
        return k, v
    idx = snapkv_select(q_win, k, budget, window, kernel_size)
    return gather_tokens(k, idx), gather_tokens(v, idx)
