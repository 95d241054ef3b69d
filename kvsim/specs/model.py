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
    #: attention window in tokens when the checkpoint uses sliding-window attention in every layer
    #: (Mistral-7B-v0.1: 4096); 0 = full attention. Informational: read from config.json, not yet used.
    sliding_window: int = 0

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

    @property
    def active_params(self) -> int:
        """Parameters one token passes through: for a mixture of experts, the top-k routed experts plus the
        shared experts and the router instead of every expert; equal to ``num_params`` for a dense model.
        Embedding and LM head are counted, as model cards do (Qwen3-30B-A3B: "3.3B activated")."""
        if not self.is_moe:
            return self.num_params
        mlp = (self.num_experts_per_tok + self.num_shared_experts) * self.expert_params + self.hidden_size * self.num_experts
        return self.num_layers * (self.attn_params + mlp) + self.embedding_params

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
        """Read the numbers that matter from a Hugging Face ``config.json`` dict.

        Dense models read ``intermediate_size``. Mixtures of experts: the expert count is
        ``num_local_experts`` (Mixtral) or ``num_experts`` (Qwen2/3-MoE); the width of one routed expert is
        ``moe_intermediate_size`` when present (Qwen) and otherwise ``intermediate_size`` (Mixtral, whose
        ``intermediate_size`` is the expert width). A shared expert is counted only where the config has
        ``num_shared_experts`` or a non-zero ``shared_expert_intermediate_size`` (Qwen2-MoE); Qwen3-MoE and
        Mixtral have none. ``head_dim`` is taken as written when present (Qwen3: 128, which differs from
        hidden_size / heads), else hidden_size // heads.
        """
        if not isinstance(cfg, dict):
            raise ConfigError(f"{source}: config.json must hold a JSON object, got {type(cfg).__name__}")

        def need(*keys):
            for k in keys:
                if k in cfg and cfg[k] is not None:
                    return cfg[k]
            raise ConfigError(f"{source}: config.json has none of the keys {list(keys)}")

        def positive(key: str, value) -> int:
            try:
                v = int(value)
            except (TypeError, ValueError):
                raise ConfigError(f"{source}: {key} = {value!r} is not an integer") from None
            if v <= 0 or v != value:
                raise ConfigError(f"{source}: {key} = {value!r} must be a positive integer")
            return v

        def optional(key: str, default: int = 0) -> int:
            """A count that may be absent, null or 0 (then ``default``); anything else a positive integer."""
            value = cfg.get(key)
            if value is None or (value == 0 and not isinstance(value, bool)):
                return default
            if isinstance(value, bool):
                raise ConfigError(f"{source}: {key} = {value!r} is not an integer")
            return positive(key, value)

        hidden = positive("hidden_size", need("hidden_size", "n_embd", "d_model"))
        heads = positive("num_attention_heads", need("num_attention_heads", "n_head"))
        kv_heads = positive("num_key_value_heads", cfg.get("num_key_value_heads") or heads)
        if kv_heads > heads or heads % kv_heads:
            raise ConfigError(f"{source}: num_attention_heads ({heads}) is not a multiple of num_key_value_heads ({kv_heads})")
        if cfg.get("head_dim"):
            head_dim = positive("head_dim", cfg["head_dim"])
        elif hidden % heads:
            raise ConfigError(f"{source}: no head_dim, and hidden_size ({hidden}) is not a multiple of num_attention_heads ({heads})")
        else:
            head_dim = hidden // heads
        num_experts = optional("num_local_experts") or optional("num_experts")
        dtype = str(cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16").removeprefix("torch.")
        if dtype not in DTYPE_BYTES:
            raise ConfigError(f"{source}: torch_dtype {dtype!r} not one of {sorted(DTYPE_BYTES)}")
        if num_experts:
            moe_inter = positive("moe_intermediate_size", cfg.get("moe_intermediate_size") or need("intermediate_size"))
            top_k = positive("num_experts_per_tok", need("num_experts_per_tok"))
            if top_k > num_experts:
                raise ConfigError(f"{source}: num_experts_per_tok ({top_k}) exceeds the number of experts ({num_experts})")
            inter = optional("intermediate_size", moe_inter)
            shared = optional("num_shared_experts") or (1 if optional("shared_expert_intermediate_size") else 0)
        else:
            moe_inter, top_k, shared = 0, 0, 0
            inter = positive("intermediate_size", need("intermediate_size", "n_inner"))
        # Qwen2/3 configs carry a sliding_window value with use_sliding_window: false (then it is unused)
        window = optional("sliding_window") if cfg.get("use_sliding_window", True) else 0
        return cls(
            name=name,
            num_layers=positive("num_hidden_layers", need("num_hidden_layers", "n_layer")),
            hidden_size=hidden,
            num_attention_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            intermediate_size=inter,
            vocab_size=positive("vocab_size", need("vocab_size")),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            dtype=dtype,
            max_position_embeddings=optional("max_position_embeddings", 4096),
            num_experts=num_experts,
            num_experts_per_tok=top_k,
            moe_intermediate_size=moe_inter,
            num_shared_experts=shared,
            sliding_window=window,
        )


#: the Hugging Face repository each shipped config.json comes from (provenance: specs/data/README.md)
UPSTREAM = {
    "llama-2-7b": "meta-llama/Llama-2-7b-hf",
    "llama-2-13b": "meta-llama/Llama-2-13b-hf",
    "llama-2-70b": "meta-llama/Llama-2-70b-hf",
    "codellama-34b": "codellama/CodeLlama-34b-hf",
    "llama-3-8b": "meta-llama/Meta-Llama-3-8B",
    "llama-3.1-8b": "meta-llama/Llama-3.1-8B",
    "llama-3.1-70b": "meta-llama/Llama-3.1-70B",
    "mistral-7b-v0.1": "mistralai/Mistral-7B-v0.1",
    "mixtral-8x7b": "mistralai/Mixtral-8x7B-v0.1",
    "qwen2.5-7b": "Qwen/Qwen2.5-7B",
    "qwen3-32b": "Qwen/Qwen3-32B",
    "qwen3-30b-a3b": "Qwen/Qwen3-30B-A3B-Instruct-2507",
    "smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct",
}
#: shipped configs assembled rather than copied (specs/data/README.md says from what)
RECONSTRUCTED = {"llama-3.1-70b", "qwen3-30b-a3b"}
#: Hugging Face ids (lower case) -> shipped short name: the upstream repository and the variants with the
#: same architecture (Instruct / base; the fields that differ, e.g. eos_token_id, do not enter kvsim)
HF_MODELS = {
    **{hf.lower(): name for name, hf in UPSTREAM.items()},
    "meta-llama/llama-3.1-8b-instruct": "llama-3.1-8b",
    "meta-llama/meta-llama-3.1-8b": "llama-3.1-8b",
    "meta-llama/meta-llama-3.1-8b-instruct": "llama-3.1-8b",
    "meta-llama/llama-3.1-70b-instruct": "llama-3.1-70b",
    "meta-llama/meta-llama-3.1-70b": "llama-3.1-70b",
    "meta-llama/meta-llama-3-8b-instruct": "llama-3-8b",
    "meta-llama/llama-2-7b-chat-hf": "llama-2-7b",
    "meta-llama/llama-2-13b-chat-hf": "llama-2-13b",
    "qwen/qwen3-30b-a3b": "qwen3-30b-a3b",
    "qwen/qwen2.5-7b-instruct": "qwen2.5-7b",
    "mistralai/mixtral-8x7b-instruct-v0.1": "mixtral-8x7b",
    "huggingfacetb/smollm2-135m": "smollm2-135m",
}
#: vLLM's ``--dtype`` values -> the weight dtype kvsim models ("auto": the checkpoint's torch_dtype)
DTYPES = {"auto": None, "bfloat16": "bfloat16", "float16": "float16", "half": "float16"}


def _data_dir():
    return resources.files("kvsim.specs").joinpath("data/models")


def hf_model_name(name: str) -> str | None:
    """The shipped short name for a Hugging Face id (case-insensitive), else None."""
    return HF_MODELS.get(str(name).strip().lower())


def apply_dtype(model: ModelSpec, dtype: str | None, source: str = "dtype") -> ModelSpec:
    """The model with vLLM's ``--dtype`` applied (weights and, with kv_cache_dtype auto, the KV cache).

    kvsim's cost model covers 16-bit weights (tensor-core fp16/bf16 peaks, 2-byte traffic), so
    ``float32`` is refused rather than run as something else."""
    if dtype is None:
        return model
    key = str(dtype).strip().lower()
    if key not in DTYPES:
        why = ("kvsim models 16-bit weights only (its GPU figures are fp16/bf16 tensor-core peaks)"
               if key in ("float32", "float") else "unknown dtype")
        raise ConfigError(f"{source}: dtype {dtype!r}: {why}; use one of {', '.join(DTYPES)}")
    want = DTYPES[key]
    if want is None or want == model.dtype:
        return model
    if model.dtype_bytes != 2:
        raise ConfigError(f"{source}: dtype {dtype!r}: the checkpoint of {model.name} is {model.dtype}")
    import dataclasses

    return dataclasses.replace(model, dtype=want)


def known_models() -> list[str]:
    return sorted(p.name[:-5] for p in _data_dir().iterdir() if p.name.endswith(".json"))


def load_model(name_or_path: str) -> ModelSpec:
    """A shipped short name (``llama-3.1-8b``), a Hugging Face id of a shipped model
    (``meta-llama/Llama-3.1-8B-Instruct``, see ``HF_MODELS``) or a path to any Hugging Face config.json."""
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
        # ".../Llama-3.1-8B/config.json" is named after its folder, "my-model.json" after the file
        name = p.parent.name if p.name == "config.json" and p.parent.name else p.stem
        return ModelSpec.from_hf_config(cfg, name=name, source=str(p))
    key = str(name_or_path).strip().lower()
    key = HF_MODELS.get(key, key)
    if key not in known_models():
        raise UnknownNameError("model", str(name_or_path), known_models(),
                               "or a Hugging Face id of one (`kvsim models` lists them), or a path to a config.json")
    f = _data_dir().joinpath(f"{key}.json")
    return ModelSpec.from_hf_config(json.loads(f.read_text()), name=key, source=str(f))
