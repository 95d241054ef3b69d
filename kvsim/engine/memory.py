"""How many KV blocks a replica gets: what vLLM's profiling run leaves for the cache.

    kv_bytes = gpu_memory_utilization x device memory - weights - activation reserve   (per GPU)

vLLM measures the reserve with a dummy forward pass of ``max_num_batched_tokens`` tokens; kvsim
estimates it as a fixed 1 GiB (CUDA graphs, NCCL and allocator slack, non-torch memory) plus the
activations of that pass: the widest per-token tensors (the gated MLP's 2 x intermediate / tp, plus
hidden and QKV) in the model dtype for every batched token, and fp32 logits for ``max_num_seqs`` rows.
With the RTX 4090 validation run (Llama-3.1-8B, 2048 batched tokens, 256 seqs) this gives 2,578
blocks against the 2,588 vLLM recorded (0.4 % fewer); ``--num-gpu-blocks-override`` pins the count
(``kvsim validate`` does, from a case's recorded ``num_gpu_blocks``).
"""

from __future__ import annotations

from kvsim.config import EngineConfig
from kvsim.methods.base import Method
from kvsim.specs.hardware import HardwareSpec
from kvsim.specs.model import ModelSpec

GIB = 1024**3
FIXED_RESERVE_BYTES = 1 * GIB


def activation_reserve_bytes(model: ModelSpec, cfg: EngineConfig) -> int:
    tp = cfg.tensor_parallel_size
    tokens = cfg.max_num_batched_tokens or (cfg.max_model_len or model.max_position_embeddings)
    inter = model.moe_intermediate_size * max(1, model.num_experts_per_tok) if model.is_moe else model.intermediate_size
    per_token = (2 * inter / tp + 2 * model.hidden_size + (model.q_size + 2 * model.kv_size) / tp) * model.dtype_bytes
    logits = (cfg.max_num_seqs or 256) * model.vocab_size / tp * 4
    return int(FIXED_RESERVE_BYTES + tokens * per_token + logits)


def kv_capacity_bytes(model: ModelSpec, hw: HardwareSpec, cfg: EngineConfig) -> int:
    weights = model.weight_bytes(cfg.tensor_parallel_size, cfg.expert_parallel_size)
    return int(cfg.gpu_memory_utilization * hw.memory_bytes - weights - reserved_bytes(model, cfg))


def reserved_bytes(model: ModelSpec, cfg: EngineConfig) -> int:
    """The activation reserve: the configured one, else kvsim's estimate."""
    return cfg.activation_reserve_bytes if cfg.activation_reserve_bytes is not None else activation_reserve_bytes(model, cfg)


def num_kv_blocks(model: ModelSpec, hw: HardwareSpec, cfg: EngineConfig, method: Method) -> int:
    if cfg.num_gpu_blocks_override is not None:
        return cfg.num_gpu_blocks_override
    cap = kv_capacity_bytes(model, hw, cfg)
    per_block = cfg.block_size * method.bytes_per_token(model, cfg.tensor_parallel_size)
    return max(0, int(cap // per_block))
