"""The request record every trace reader yields, in the kvsim trace format's field names."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class Request:
    request_id: str
    arrival_time_s: float
    prompt_tokens: int
    output_tokens: int
    #: chained hashes of the prompt's full blocks (vLLM-style prefix caching); None when unknown
    prefix_hashes: tuple[int, ...] | None = None
    #: tokens covered by one prefix hash (16 for the kvsim/vLLM format, 512 for Mooncake)
    hash_block_tokens: int = 16
    #: where the request came from, for error messages: (path, 1-based line)
    source: tuple[str, int] | None = None
    #: the request's own limit on generated tokens (OpenAI/vLLM ``max_tokens``), when the trace has it:
    #: a method that lengthens answers cannot go past it
    max_tokens: int | None = None


@dataclass(slots=True)
class InvalidRecord:
    """A trace line that could not be read, kept (with --skip-invalid) so it is counted as rejected."""

    path: str
    line: int
    field: str
    reason: str
    code: str
    arrival_time_s: float | None = None
