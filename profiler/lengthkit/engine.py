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

Methods: faithful re-implementations of the papers' algorithms, one module each in :mod:`profiler.methods`
(``init_layer`` adds a method's state to a layer's cache, ``after_step`` evicts or quantises; see
docs/lengths.md for the paper details). ``eager_prefill`` methods (H2O, SnapKV) read the attention
probabilities, so padding rows are zeroed for them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from profiler.lengthkit.cache import LayerCache

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


@dataclass
class CacheState:
    """The per-layer caches of one batch (left-padded) under one method."""

    method: object  # a kvsim Method
    pad: torch.Tensor  # [B] left padding of each row
    num_layers: int
    capacity: int = 0  # columns to preallocate (prompt width + max new tokens)
    layers: list = field(default_factory=list)

    def __post_init__(self):
        from profiler.methods import support

        self.layers = [None] * self.num_layers
        self.support = support(self.method.name, "lengths")

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
        m, sup = self.method, self.support
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
                            (idx[None, :] >= self.pad[:, None])[:, None, :].expand(b, hkv, cap).clone(), 0)
            sup.init_layer(lc, m)
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
        if prefill and sup.eager_prefill:
            # a padding query (left padding, prefill only) sees no valid key, so its softmax is uniform
            # over the masked keys; zero those rows, since a method that reads the probabilities (H2O's
            # accumulated scores, SnapKV's observation window) would count them. Real queries already get
            # exact zeros on masked keys (exp underflows), and a padding query's output is never read (its
            # column stays invalid and only the last, real position's logits are used), so the other
            # methods skip this pass
            probs = probs * mask
        out = torch.matmul(probs.to(lc.v.dtype).view(b, hkv, g * nq, t), lc.v)
        out = out.view(b, hq, nq, d).transpose(1, 2).contiguous()  # [B, Q, Hq, D]
        # the method's bookkeeping after the step (what the next step will see)
        sup.after_step(self, lc, m, probs, prefill, nq)
        self.layers[layer] = lc
        return out


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
def generate(model, prompts: list[list[int]], method, max_new_tokens: int | list[int],
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
