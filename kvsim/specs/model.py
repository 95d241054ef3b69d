"""Model shape read from a Hugging Face ``config.json``.

Only the numbers that set cost and memory are kept. Shipped configs live in ``specs/data/models/<short
name>.json`` (the upstream config.json files, unchanged); ``load_model`` takes a short name or a path.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from kvsim.errors import ConfigError, UnknownNameError

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "fp8": 1, "float8": 1, "float8_e4m3fn": 1}


@dataclass(frozen=True)
class ModelSpec:
    name: str
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool = False
    dtype: str = "bfloat16"
    max_position_embeddings: int = 4096
    #: mixture of experts: 0 experts means a dense MLP
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    num_shared_experts: int = 0

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]

    # -- parameter counts (per layer unless named otherwise) -----------------------------------
    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def attn_params(self) -> int:
        """QKV and O projections of one layer (biases ignored: < 0.1 % of the bytes)."""
        return self.hidden_size * (self.q_size + 2 * self.kv_size) + self.q_size * self.hidden_size

    @property
    def mlp_params_dense(self) -> int:
        """Gated MLP of one layer (gate, up, down) for a dense model."""
        return 3 * self.hidden_size * self.intermediate_size

    @property
    def expert_params(self) -> int:
        """One routed expert (gate, up, down)."""
        return 3 * self.hidden_size * self.moe_intermediate_size

    @property
    def mlp_params_total(self) -> int:
        if not self.is_moe:
            return self.mlp_params_dense
        shared = self.num_shared_experts * self.expert_params
        router = self.hidden_size * self.num_experts
        return self.num_experts * self.expert_params + shared + router

    @property
    def embedding_params(self) -> int:
        """Input embedding plus LM head (counted once when tied)."""
        return self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)

    @property
    def num_params(self) -> int:
        return self.num_layers * (self.attn_params + self.mlp_params_total) + self.embedding_params

    def weight_bytes(self, tensor_parallel_size: int = 1, expert_parallel_size: int = 1) -> int:
        """Weight bytes held by one GPU. Experts split across EP ranks, the rest across TP ranks."""
        per_layer_dense = self.attn_params + (0 if self.is_moe else self.mlp_params_dense)
        experts = self.num_experts * self.expert_params if self.is_moe else 0
        shared = (self.num_shared_experts * self.expert_params + self.hidden_size * self.num_experts) if self.is_moe else 0
        per_gpu = self.num_layers * (
            (per_layer_dense + shared) / tensor_parallel_size + experts / (tensor_parallel_size * expert_parallel_size)
        ) + self.embedding_params / tensor_parallel_size
        return int(per_gpu * self.dtype_bytes)

    def kv_bytes_per_token(self, kv_dtype_bytes: float | None = None, tensor_parallel_size: int = 1) -> float:
        """K and V of every layer for one token, on one GPU (KV heads split across TP ranks, never below one)."""
        b = self.dtype_bytes if kv_dtype_bytes is None else kv_dtype_bytes
        heads = max(1, self.num_kv_heads // tensor_parallel_size) if tensor_parallel_size > 1 else self.num_kv_heads
        return 2 * self.num_layers * heads * self.head_dim * b

    @classmethod
    def from_hf_config(cls, cfg: dict, name: str = "custom", source: str = "<config>") -> "ModelSpec":
        def need(*keys):
            for k in keys:
                if k in cfg and cfg[k] is not None:
                    return cfg[k]
            raise ConfigError(f"{source}: config.json has none of the keys {list(keys)}")

        hidden = int(need("hidden_size", "n_embd", "d_model"))
        heads = int(need("num_attention_heads", "n_head"))
        kv_heads = int(cfg.get("num_key_value_heads") or heads)
        head_dim = int(cfg.get("head_dim") or hidden // heads)
        num_experts = int(cfg.get("num_local_experts") or cfg.get("num_experts") or 0)
        dtype = str(cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16")
        if dtype not in DTYPE_BYTES:
            raise ConfigError(f"{source}: torch_dtype {dtype!r} not one of {sorted(DTYPE_BYTES)}")
        moe_inter = int(cfg.get("moe_intermediate_size") or (need("intermediate_size") if num_experts else 0))
        return cls(
            name=name,
            num_layers=int(need("num_hidden_layers", "n_layer")),
            hidden_size=hidden,
            num_attention_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            intermediate_size=int(need("intermediate_size", "n_inner") if not num_experts else cfg.get("intermediate_size") or moe_inter),
            vocab_size=int(need("vocab_size")),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            dtype=dtype,
            max_position_embeddings=int(cfg.get("max_position_embeddings") or 4096),
            num_experts=num_experts,
            num_experts_per_tok=int(cfg.get("num_experts_per_tok") or 0),
            moe_intermediate_size=moe_inter if num_experts else 0,
            num_shared_experts=int(cfg.get("num_shared_experts") or (1 if cfg.get("shared_expert_intermediate_size") else 0)),
        )


def _data_dir():
    return resources.files("kvsim.specs").joinpath("data/models")


def known_models() -> list[str]:
    return sorted(p.name[:-5] for p in _data_dir().iterdir() if p.name.endswith(".json"))


def load_model(name_or_path: str) -> ModelSpec:
    """A shipped short name (``llama-3.1-8b``) or a path to any Hugging Face config.json."""
    p = Path(name_or_path)
    if p.suffix == ".json" or p.exists():
        if p.is_dir():
            p = p / "config.json"
        if not p.exists():
            raise ConfigError(f"model config {str(p)!r} does not exist")
        try:
            cfg = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{p}:{e.lineno}: not valid JSON: {e.msg}") from None
        return ModelSpec.from_hf_config(cfg, name=p.parent.name or p.stem, source=str(p))
    f = _data_dir().joinpath(f"{name_or_path}.json")
    if not f.is_file():
        raise UnknownNameError("model", name_or_path, known_models())
    return ModelSpec.from_hf_config(json.loads(f.read_text()), name=name_or_path, source=str(f))
