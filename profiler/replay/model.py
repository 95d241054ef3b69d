"""A Llama-architecture decoder in plain torch, weights drawn at random from its config.

Step time does not depend on weight values, so no checkpoint is downloaded: every matrix is drawn from
``N(0, 0.02^2)`` (the configs' ``initializer_range``), norms are ones. The layer is the Llama one:
embedding, per layer RMSNorm -> fused QKV GEMM -> RoPE (with Llama-3 frequency scaling when the config
has it) -> GQA attention (supplied by the caller: the KV cache lives outside the model) -> O GEMM ->
residual -> RMSNorm -> gated MLP (fused gate/up GEMM, SiLU, down GEMM) -> residual; final RMSNorm and
LM head on the rows that sample. The building blocks are ``profiler.kernels.ops`` (linear, mlp,
rms_norm, rotary), the same kernels ``kvprof kernels`` times.

``reference_forward`` is the same model over a plain contiguous cache of one sequence (what the tests
compare the paged engine against).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from profiler.kernels import ops

#: the tiny Llama of the CPU path (CI): 2 layers, hidden 128, 4 query / 2 KV heads of 32, vocab 256.
#: head_dim 32 so KIVI's default group_size=32 divides it.
TINY_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "vocab_size": 256,
    "max_position_embeddings": 16384,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "torch_dtype": "float32",
    "tie_word_embeddings": False,
}

INIT_STD = 0.02


@dataclass(frozen=True)
class LlamaConfig:
    name: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rope_theta: float = 500000.0
    rms_norm_eps: float = 1e-5
    rope_scaling: dict | None = None
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 4096
    #: the config.json as read (written next to a replay's outputs for the tiny model)
    raw: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_hf(cls, cfg: dict, name: str) -> "LlamaConfig":
        if cfg.get("num_local_experts") or cfg.get("num_experts"):
            raise ValueError(f"model {name}: mixture-of-experts configs are not supported by kvprof replay "
                             "(dense Llama-architecture decoders only)")
        heads = int(cfg["num_attention_heads"])
        return cls(
            name=name,
            num_layers=int(cfg["num_hidden_layers"]),
            hidden_size=int(cfg["hidden_size"]),
            num_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or cfg["hidden_size"] // heads),
            intermediate_size=int(cfg["intermediate_size"]),
            vocab_size=int(cfg["vocab_size"]),
            rope_theta=float(cfg.get("rope_theta", 10000.0)),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
            rope_scaling=cfg.get("rope_scaling"),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            max_position_embeddings=int(cfg.get("max_position_embeddings") or 4096),
            raw=dict(cfg),
        )


def load_config(model: str | None, tiny: bool = False) -> tuple[LlamaConfig, "object"]:
    """(LlamaConfig, kvsim ModelSpec) for a kvsim short name, a config.json path, or the tiny model."""
    from kvsim.specs.model import ModelSpec, _data_dir, load_model

    if tiny:
        return LlamaConfig.from_hf(TINY_CONFIG, "tiny-llama"), ModelSpec.from_hf_config(TINY_CONFIG, name="tiny-llama")
    spec = load_model(model)
    p = Path(model)
    if p.suffix == ".json" or p.exists():
        raw = json.loads((p / "config.json" if p.is_dir() else p).read_text())
    else:
        raw = json.loads(_data_dir().joinpath(f"{spec.name}.json").read_text())
    return LlamaConfig.from_hf(raw, spec.name), spec


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None, device=None) -> torch.Tensor:
    """Inverse RoPE frequencies, with Llama-3's piecewise scaling when ``rope_scaling.rope_type == 'llama3'``
    (Hugging Face ``_compute_llama3_parameters``)."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim))
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type"))
    if kind == "llama3":
        factor = float(scaling["factor"])
        lo, hi = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv
        inv_l = torch.where(wavelen > old / lo, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * inv_l / factor + smooth * inv_l
        medium = (wavelen >= old / hi) & (wavelen <= old / lo)
        inv = torch.where(medium, smoothed, inv_l)
    return inv.float()


class Llama:
    """Weights and the forward pass. ``attend(layer, q, k, v) -> out`` is the caller's attention:
    ``q`` ``[T, Hq, D]``, ``k``/``v`` ``[T, Hkv, D]`` (RoPE applied), returns ``[T, Hq, D]``."""

    def __init__(self, cfg: LlamaConfig, device="cpu", dtype=torch.float32, seed: int = 0):
        self.cfg = cfg
        self.device = torch.device(device)
        self.dtype = dtype
        g = torch.Generator(device=self.device).manual_seed(seed)
        H, D, I = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
        q, kv = cfg.num_heads * D, cfg.num_kv_heads * D

        def w(*shape):
            t = torch.empty(*shape, device=self.device, dtype=dtype)
            t.normal_(0.0, INIT_STD, generator=g)
            return t

        def ones(n):
            return torch.ones(n, device=self.device, dtype=dtype)

        self.embed = w(cfg.vocab_size, H)
        self.layers = [dict(ln1=ones(H), wqkv=w(q + 2 * kv, H), wo=w(H, q), ln2=ones(H),
                            w_gate_up=w(2 * I, H), w_down=w(H, I)) for _ in range(cfg.num_layers)]
        self.norm = ones(H)
        self.lm_head = self.embed if cfg.tie_word_embeddings else w(cfg.vocab_size, H)
        self.inv_freq = rope_inv_freq(D, cfg.rope_theta, cfg.rope_scaling, self.device)

    @property
    def weight_bytes(self) -> int:
        n = self.embed.numel() + self.norm.numel() + (0 if self.cfg.tie_word_embeddings else self.lm_head.numel())
        n += sum(t.numel() for layer in self.layers for t in layer.values())
        return n * self.embed.element_size()

    def rope(self, positions: torch.Tensor):
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]
        return emb.cos().to(self.dtype), emb.sin().to(self.dtype)

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, attend, sample_rows: torch.Tensor | None = None):
        """Logits (fp32) of ``sample_rows`` (all rows when None) for the flattened batch ``tokens`` ``[T]``."""
        cfg = self.cfg
        T = tokens.shape[0]
        D, hq, hkv = cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
        eps = cfg.rms_norm_eps
        cos, sin = self.rope(positions)
        x = self.embed[tokens]
        for li, L in enumerate(self.layers):
            h = ops.rms_norm(x, L["ln1"], eps)
            qkv = ops.linear(h, L["wqkv"])
            q, k, v = qkv.split((hq * D, hkv * D, hkv * D), dim=-1)
            q = ops.rotary(q.view(T, hq, D), cos, sin)
            k = ops.rotary(k.view(T, hkv, D), cos, sin)
            o = attend(li, q, k, v.reshape(T, hkv, D))
            x = x + ops.linear(o.reshape(T, hq * D), L["wo"])
            x = x + ops.mlp(ops.rms_norm(x, L["ln2"], eps), L["w_gate_up"], L["w_down"])
        if sample_rows is not None:
            x = x[sample_rows]
        return ops.linear(ops.rms_norm(x, self.norm, eps), self.lm_head).float()

    @torch.inference_mode()
    def reference_forward(self, tokens: torch.Tensor, past=None, eager: bool = False):
        """One sequence over a plain contiguous cache: ``past`` is a list of per-layer (K, V)
        ``[1, Hkv, L, D]`` or None. Returns (logits ``[T, V]`` fp32, new past)."""
        start = 0 if past is None else past[0][0].shape[2]
        positions = torch.arange(start, start + tokens.shape[0], device=self.device)
        new_past = []

        def attend(li, q, k, v):
            kk, vv = k.transpose(0, 1)[None], v.transpose(0, 1)[None]
            if past is not None:
                kk = torch.cat((past[li][0], kk), dim=2)
                vv = torch.cat((past[li][1], vv), dim=2)
            new_past.append((kk, vv))
            qq = q.transpose(0, 1)[None]
            if eager:
                out, _ = ops.eager_attention(qq, kk, vv, ops.causal_mask(qq.shape[2], kk.shape[2], q.device))
            else:
                out = ops.sdpa_prefill(qq, kk, vv)
            return out[0].transpose(0, 1)

        logits = self.forward(tokens, positions, attend)
        return logits, new_past
