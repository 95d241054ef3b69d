"""Batched generation on a Hugging Face causal LM with a KV cache that a compression method controls.

How it plugs into transformers: we register an attention implementation (``kvlen``) in transformers'
``AttentionInterface`` and run the model with ``use_cache=False``. Every attention layer then hands us
the new (already rotary-embedded) keys/values of the current step; *we* keep the per-layer cache, decide
which cached tokens each KV head may see (eviction) and what values it sees (quantisation round trip),
and compute attention eagerly (scores materialised, which H2O and SnapKV need). Works for any model whose
attention goes through ``ALL_ATTENTION_FUNCTIONS`` (Llama, Mistral, Qwen2/3, Gemma, ...), on CPU or GPU.

Eviction is a per-(sequence, KV head) validity mask over the stored tokens: an evicted token is never
attended to again, which is numerically identical to removing it from a compacted cache (softmax over the
kept tokens only). Keys keep the rotary position they were written with (original positions), as the
H2O, SnapKV and kvpress reference implementations do; new tokens get their true absolute position.

Methods (faithful re-implementations; see docs/lengths.md for the paper details):

* ``none``: full cache.
* ``kivi`` (Liu et al., ICML 2024): keys quantised per channel in groups of ``group_size`` tokens, values
  per token in groups of ``group_size`` channels, asymmetric min-max with ``bits``; the last tokens stay in
  full precision exactly as in the reference code (keys: the ``L mod R`` remainder, flushed in blocks of
  ``residual_length`` R; values: the last R tokens, one token quantised as it leaves the window).
  Simulated (quantise -> dequantise), so attention sees exactly the values the real kernels would.
* ``fp8``: K and V stored as float8 e4m3 (per-tensor scale 1.0, vLLM's default ``kv_cache_dtype=fp8``).
* ``h2o`` (Zhang et al., NeurIPS 2023): accumulated attention score per cached token and KV head (summed
  over the query heads of the group and over all queries so far); keep ``budget - window`` heavy hitters
  plus the ``window`` most recent tokens, evicting one token per decode step once the budget is exceeded.
* ``streamingllm`` (Xiao et al., ICLR 2024): keep the first ``sink`` tokens plus the last ``window``.
* ``snapkv`` (Li et al., NeurIPS 2024): once, after prefill: attention of the last ``window`` prompt queries
  summed over those queries, averaged over the query heads of a KV group (as kvpress does for GQA),
  smoothed with a 1-D average pool of ``kernel_size``; keep the top ``budget - window`` prompt tokens
  per KV head plus the observation window. Generated tokens are all kept (SnapKV compresses the prompt).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from profiler.lengthkit.methods import MethodSetting

_ACTIVE: CacheState | None = None
ATTN_IMPL = "kvlen"
_REGISTERED = False


def register_attention() -> str:
    """Register the ``kvlen`` attention (and a no-op mask builder) with transformers; idempotent."""
    global _REGISTERED
    if not _REGISTERED:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface

        AttentionInterface.register(ATTN_IMPL, _kvlen_attention)
        AttentionMaskInterface.register(ATTN_IMPL, _no_mask)  # we build our own masks
        _REGISTERED = True
    return ATTN_IMPL


def _no_mask(*args, **kwargs):
    return None


def _kvlen_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    if _ACTIVE is None:
        raise RuntimeError("kvlen attention called outside profiler.lengthkit.engine.generate")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    return _ACTIVE.attend(module.layer_idx, query, key, value, scale), None


def _is_pow2(x: float) -> bool:
    return x > 0 and math.frexp(x)[0] == 0.5


# -- quantisation helpers ---------------------------------------------------------------------------

def fake_quant(x: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Asymmetric min-max quantise -> dequantise along ``dim`` (KIVI's scheme: zero point = min)."""
    mn = x.amin(dim=dim, keepdim=True)
    mx = x.amax(dim=dim, keepdim=True)
    levels = (1 << bits) - 1
    scale = (mx - mn).clamp(min=1e-8) / levels
    q = ((x - mn) / scale).round().clamp(0, levels)
    return (q * scale + mn).to(x.dtype)


def quant_values_per_token(v: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """v [..., T, D]: each token's channels in groups of ``group``."""
    d = v.shape[-1]
    g = group if d % group == 0 else d
    return fake_quant(v.reshape(*v.shape[:-1], d // g, g), bits, -1).reshape(v.shape)


def quant_keys_per_channel(k: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """k [H, T, D] with T a multiple of ``group``: each channel over groups of ``group`` tokens."""
    h, t, d = k.shape
    return fake_quant(k.reshape(h, t // group, group, d), bits, 2).reshape(h, t, d)


def fp8_round_trip(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(-448.0, 448.0).to(torch.float8_e4m3fn).to(x.dtype)


# -- the cache ---------------------------------------------------------------------------------------

class LayerCache:
    """One layer's cache in preallocated buffers (capacity = longest prompt + max new tokens), so a
    decode step writes one column instead of copying the whole cache. ``k``/``v``/``valid``/``score``
    are views of the first ``t`` columns."""

    def __init__(self, kbuf, vbuf, validbuf, t, scorebuf=None, kivi_qk=None):
        self.kbuf, self.vbuf, self.validbuf, self.t = kbuf, vbuf, validbuf, t
        self.scorebuf = scorebuf  # H2O accumulated attention [B, Hkv, cap]
        self.kivi_qk = kivi_qk  # KIVI: per row, how many real tokens have quantised keys

    @property
    def k(self):  # [B, Hkv, t, D], what attention sees (dequantised where the method quantises)
        return self.kbuf[:, :, : self.t]

    @property
    def v(self):
        return self.vbuf[:, :, : self.t]

    @property
    def valid(self):  # [B, Hkv, t] bool: real (not padding) and not evicted
        return self.validbuf[:, :, : self.t]

    @valid.setter
    def valid(self, value):
        self.validbuf[:, :, : self.t] = value

    @property
    def score(self):
        return None if self.scorebuf is None else self.scorebuf[:, :, : self.t]

    @score.setter
    def score(self, value):
        self.scorebuf[:, :, : self.t] = value

    def append(self, k, v):
        n = k.shape[2]
        self.kbuf[:, :, self.t:self.t + n] = k
        self.vbuf[:, :, self.t:self.t + n] = v
        self.validbuf[:, :, self.t:self.t + n] = True
        if self.scorebuf is not None:
            self.scorebuf[:, :, self.t:self.t + n] = 0.0
        self.t += n

    def select(self, rows):
        # copy only the t filled columns into fresh buffers of the same capacity: ``append`` writes every
        # column past t (k, v, valid, score) before it is read, so those may stay uninitialised
        def take(buf):
            out = buf.new_empty((len(rows),) + tuple(buf.shape[1:]))
            out[:, :, : self.t] = buf[rows, :, : self.t]
            return out

        return LayerCache(take(self.kbuf), take(self.vbuf), take(self.validbuf), self.t,
                          None if self.scorebuf is None else take(self.scorebuf),
                          None if self.kivi_qk is None else self.kivi_qk[rows])


@dataclass
class CacheState:
    """The per-layer caches of one batch (left-padded) under one method."""

    method: MethodSetting
    pad: torch.Tensor  # [B] left padding of each row
    num_layers: int
    capacity: int = 0  # columns to preallocate (prompt width + max new tokens)
    layers: list = field(default_factory=list)

    def __post_init__(self):
        self.layers = [None] * self.num_layers

    # rows finished: drop them everywhere
    def select(self, rows: torch.Tensor) -> None:
        self.pad = self.pad[rows]
        for i, lc in enumerate(self.layers):
            if lc is not None:
                self.layers[i] = lc.select(rows)

    def kept_tokens(self, layer: int = 0) -> torch.Tensor:
        """[B, Hkv] tokens each KV head of ``layer`` attends to (after the last step's eviction)."""
        return self.layers[layer].valid.sum(-1)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        m = self.method
        b, hq, nq, d = q.shape
        hkv = k.shape[1]
        g = hq // hkv
        lc = self.layers[layer]
        prefill = lc is None
        if prefill:
            t = k.shape[2]
            cap = max(self.capacity, t)
            idx = torch.arange(cap, device=k.device)
            lc = LayerCache(k.new_zeros(b, hkv, cap, d), v.new_zeros(b, hkv, cap, d),
                            (idx[None, :] >= self.pad[:, None])[:, None, :].expand(b, hkv, cap).clone(), 0,
                            torch.zeros(b, hkv, cap, device=k.device) if m.name == "h2o" else None,
                            torch.zeros(b, dtype=torch.long, device=k.device) if m.name == "kivi" else None)
            lc.kbuf[:, :, :t] = k
            lc.vbuf[:, :, :t] = v
            lc.t = t
        else:
            if lc.t + nq > lc.kbuf.shape[2]:
                raise RuntimeError("kvlen cache capacity exceeded")
            lc.append(k, v)
        t = lc.k.shape[2]

        # eager attention over the kept tokens; the new tokens' own K/V are in full precision.
        # The scale is applied to q (nq x d) rather than to the scores (nq x t): with a power-of-two scale
        # (head_dim 64 -> 1/8, as here) this is bit-identical and saves a pass over the score tensor
        qg = q.reshape(b, hkv, g * nq, d)
        if _is_pow2(scale):
            scores = torch.matmul(qg * scale, lc.k.transpose(-1, -2)).float()  # [B, Hkv, G*Q, T]
        else:
            scores = torch.matmul(qg, lc.k.transpose(-1, -2)).float() * scale
        scores = scores.view(b, hkv, g, nq, t)
        mask = lc.valid[:, :, None, None, :]
        if nq > 1:
            kidx = torch.arange(t, device=q.device)
            qpos = torch.arange(t - nq, t, device=q.device)
            mask = mask & (kidx[None, :] <= qpos[:, None])[None, None, None]
        scores.masked_fill_(~mask, torch.finfo(scores.dtype).min)
        probs = torch.softmax(scores, dim=-1)
        if prefill and m.name in ("h2o", "snapkv"):
            # a padding query (left padding, prefill only) sees no valid key, so its softmax is uniform
            # over the masked keys; zero those rows, since H2O's accumulated scores and SnapKV's
            # observation window read ``probs``. Real queries already get exact zeros on masked keys
            # (exp underflows), and a padding query's output is never read (its column stays invalid and
            # only the last, real position's logits are used), so the other methods skip this pass
            probs = probs * mask
        out = torch.matmul(probs.to(lc.v.dtype).view(b, hkv, g * nq, t), lc.v)
        out = out.view(b, hq, nq, d).transpose(1, 2).contiguous()  # [B, Q, Hq, D]

        # the method's bookkeeping after the step (what the next step will see)
        if m.name == "h2o":
            lc.score += probs.sum(dim=(2, 3))
            self._h2o_evict(lc, prefill)
        elif m.name == "streamingllm":
            self._streaming_evict(lc)
        elif m.name == "snapkv" and prefill:
            self._snapkv_compress(lc, probs)
        elif m.name == "kivi":
            self._kivi_quantise(lc, prefill, nq)
        elif m.name == "fp8":
            lc.k[:, :, t - nq:] = fp8_round_trip(lc.k[:, :, t - nq:])
            lc.v[:, :, t - nq:] = fp8_round_trip(lc.v[:, :, t - nq:])
        self.layers[layer] = lc
        return out

    # -- eviction policies -------------------------------------------------------------------------
    def _h2o_evict(self, lc: LayerCache, prefill: bool) -> None:
        budget, window = self.method.get("budget"), self.method.get("window")
        t = lc.k.shape[2]
        recent = torch.zeros(t, dtype=torch.bool, device=lc.k.device)
        recent[max(0, t - window):] = True
        kept = lc.valid.sum(-1)  # [B, Hkv]
        over = kept > budget
        if not bool(over.any()):
            return
        cand = lc.score.masked_fill(~lc.valid | recent, float("inf"))
        if prefill:  # keep the top (budget - window) heavy hitters among the older tokens, per head
            heavy = budget - window
            old = lc.valid & ~recent
            top = (-cand).topk(min(heavy, t), dim=-1).indices
            keep = torch.zeros_like(lc.valid)
            keep.scatter_(-1, top, True)
            new_valid = (keep & old) | (lc.valid & recent)
            lc.valid = torch.where(over[..., None], new_valid, lc.valid)
        else:  # one token over the budget per step: drop the lightest older token
            victim = cand.argmin(dim=-1, keepdim=True)
            drop = torch.zeros_like(lc.valid).scatter_(-1, victim, True) & over[..., None]
            lc.valid = lc.valid & ~drop

    def _streaming_evict(self, lc: LayerCache) -> None:
        sink, window = self.method.get("sink"), self.method.get("window")
        t = lc.k.shape[2]
        idx = torch.arange(t, device=lc.k.device)
        keep = (idx[None, :] < (self.pad[:, None] + sink)) | (idx[None, :] >= t - window)
        lc.valid = lc.valid & keep[:, None, :]

    def _snapkv_compress(self, lc: LayerCache, probs: torch.Tensor) -> None:
        budget, window, kernel = (self.method.get(k) for k in ("budget", "window", "kernel_size"))
        b, hkv, _, _, t = probs.shape
        real = t - self.pad  # prompt length of each row
        if t <= window or not bool((real > budget).any()):
            return
        obs = probs[:, :, :, -window:, : t - window].sum(dim=3).mean(dim=2)  # [B, Hkv, T-w]
        pooled = F.avg_pool1d(obs.reshape(b * hkv, 1, t - window), kernel_size=kernel, padding=kernel // 2,
                              stride=1, count_include_pad=True).view(b, hkv, t - window)
        pooled = pooled.masked_fill(~lc.valid[:, :, : t - window], float("-inf"))
        top = pooled.topk(min(budget - window, t - window), dim=-1).indices
        keep = torch.zeros_like(lc.valid)
        keep.scatter_(-1, top, True)
        keep[:, :, t - window:] = True
        compress = (real > budget)[:, None, None]
        lc.valid = torch.where(compress, lc.valid & keep, lc.valid)

    def _kivi_quantise(self, lc: LayerCache, prefill: bool, nq: int) -> None:
        bits, group, resid = (self.method.get(k) for k in ("bits", "group_size", "residual_length"))
        t = lc.k.shape[2]
        # values: per token once it is older than the last `resid` tokens
        if prefill:
            if t - resid > 0:
                lc.v[:, :, : t - resid] = quant_values_per_token(lc.v[:, :, : t - resid], bits, group)
        else:
            j = t - 1 - resid
            if j >= 0:
                lc.v[:, :, j:j + 1] = quant_values_per_token(lc.v[:, :, j:j + 1], bits, group)
        # keys: per channel over blocks; the full-precision tail is flushed when it reaches `resid`
        n_real = t - self.pad
        block = resid if resid > 0 else group
        target = (n_real // block) * block if prefill else torch.where(n_real - lc.kivi_qk >= block,
                                                                       lc.kivi_qk + block, lc.kivi_qk)
        for r in torch.nonzero(target > lc.kivi_qk).flatten().tolist():
            s = int(self.pad[r] + lc.kivi_qk[r])
            e = int(self.pad[r] + target[r])
            lc.k[r, :, s:e] = quant_keys_per_channel(lc.k[r, :, s:e], bits, group)
        lc.kivi_qk = target


# -- generation ---------------------------------------------------------------------------------------

@dataclass
class Sampling:
    """None temperature = greedy. Each row draws from its own generator seeded by (seed, prompt index),
    so a prompt's random stream does not depend on the batch it ran in, and the full-cache and the
    compressed run of a prompt use the same stream."""

    temperature: float | None = None
    top_p: float = 1.0
    seed: int = 0


def _choose(logits: torch.Tensor, sampling: Sampling, gens: list) -> torch.Tensor:
    if sampling.temperature is None or sampling.temperature <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / sampling.temperature, dim=-1)
    if sampling.top_p < 1.0:
        sp, si = probs.sort(dim=-1, descending=True)
        cut = sp.cumsum(-1) - sp > sampling.top_p
        sp = sp.masked_fill(cut, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, si, sp)
    out = [torch.multinomial(probs[i].cpu(), 1, generator=g) for i, g in enumerate(gens)]
    return torch.cat(out).to(logits.device)


@dataclass
class GenResult:
    tokens: list[int]
    stop: str  # "eos" or "cap"


@torch.inference_mode()
def generate(model, prompts: list[list[int]], method: MethodSetting, max_new_tokens: int | list[int],
             eos_ids: set[int], pad_id: int, sampling: Sampling | None = None,
             row_keys: list[int] | None = None, capture=None) -> list[GenResult]:
    """Generate for a batch of tokenised prompts under ``method``; returns one result per prompt.

    ``max_new_tokens``: one cap for all rows or one per row. ``capture`` (tests): called as
    ``capture(step, logits, state)`` after every forward pass.
    """
    global _ACTIVE
    sampling = sampling or Sampling()
    dev = next(model.parameters()).device
    register_attention()
    previous_impl = model.config._attn_implementation
    model.set_attn_implementation(ATTN_IMPL)
    n = len(prompts)
    caps = list(max_new_tokens) if isinstance(max_new_tokens, (list, tuple)) else [int(max_new_tokens)] * n
    max_new_tokens = max(caps)
    lens = torch.tensor([len(p) for p in prompts], device=dev)
    width = int(lens.max())
    ids = torch.full((n, width), pad_id, dtype=torch.long, device=dev)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long, device=dev)
    pad = width - lens
    pos = (torch.arange(width, device=dev)[None, :] - pad[:, None]).clamp(min=0)
    keys = row_keys if row_keys is not None else list(range(n))
    gens = []
    if sampling.temperature:
        for k in keys:
            g = torch.Generator()
            g.manual_seed(int(sampling.seed) * 1_000_003 + int(k))
            gens.append(g)

    state = CacheState(method, pad, model.config.num_hidden_layers, width + max_new_tokens + 1)
    outs: list[list[int]] = [[] for _ in range(n)]
    stops: list[str | None] = [None] * n
    rows = list(range(n))
    _ACTIVE = state
    try:
        logits = model(input_ids=ids, position_ids=pos, use_cache=False, logits_to_keep=1).logits[:, -1]
        if capture:
            capture(0, logits, state)
        n_real = lens.clone()
        for step in range(max_new_tokens):
            tok = _choose(logits, sampling, [gens[r] for r in rows] if gens else [])
            alive = []
            for j, r in enumerate(rows):
                t = int(tok[j])
                outs[r].append(t)
                if t in eos_ids:
                    stops[r] = "eos"
                elif len(outs[r]) >= caps[r]:
                    stops[r] = "cap"
                else:
                    alive.append(j)
            if not alive:
                break
            if len(alive) < len(rows):
                sel = torch.tensor(alive, device=dev)
                state.select(sel)
                tok, n_real = tok[sel], n_real[sel]
                rows = [rows[j] for j in alive]
            logits = model(input_ids=tok[:, None], position_ids=n_real[:, None], use_cache=False,
                           logits_to_keep=1).logits[:, -1]
            n_real = n_real + 1
            if capture:
                capture(step + 1, logits, state)
    finally:
        _ACTIVE = None
        model.set_attn_implementation(previous_impl)
    return [GenResult(o, s or "cap") for o, s in zip(outs, stops)]
