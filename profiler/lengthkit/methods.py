"""Method settings measured by ``kvprof lengths``: parsing and canonical spec strings.

Knob names, order and defaults match kvsim's method specs (``Method.spec_string()``), so the keys of the
profile's ``lengths`` section are exactly what ``kvsim replay --method ...`` looks up.
"""

from __future__ import annotations

from dataclasses import dataclass

#: method name -> ordered (knob, default) pairs; the same order and defaults as kvsim's Method classes
KNOBS: dict[str, tuple[tuple[str, int], ...]] = {
    "none": (),
    "fp8": (),
    "kivi": (("bits", 2), ("group_size", 32), ("residual_length", 128)),
    "h2o": (("budget", 256), ("window", 32)),
    "streamingllm": (("sink", 4), ("window", 252)),
    "snapkv": (("budget", 256), ("window", 32), ("kernel_size", 7)),
}

#: the default ``--methods`` list, chosen for SmolLM2 + 200 AlpacaEval prompts at the 256-token cap (chat
#: prompts 35-425 tokens, median 51; answers up to 256): KIVI-2/4 and fp8 at their only settings; H2O and
#: StreamingLLM at kvsim's default budget 256 (which the context passes on most long answers, so kvsim's
#: default knobs get a measured distribution) and at 128 (evicting through most of the answer); SnapKV at 48,
#: which 110 of the 200 prompts exceed. SnapKV at its default 256 is left out: only 3 prompts exceed it, so it
#: would measure "no change" (and kvsim ignores a setting that never compressed anything)
DEFAULT_METHODS = (
    "none",
    "kivi:bits=2",
    "kivi:bits=4",
    "fp8",
    "h2o:budget=256,window=32",
    "streamingllm:sink=4,window=252",
    "h2o:budget=128,window=32",
    "streamingllm:sink=4,window=124",
    "snapkv:budget=48,window=16,kernel_size=7",
)


@dataclass(frozen=True)
class MethodSetting:
    name: str
    knobs: tuple[tuple[str, int], ...]

    def get(self, knob: str) -> int:
        return dict(self.knobs)[knob]

    @property
    def spec(self) -> str:
        """Canonical ``name:knob=value,...`` with every knob in kvsim's declaration order."""
        if not self.knobs:
            return self.name
        return self.name + ":" + ",".join(f"{k}={v}" for k, v in self.knobs)


def parse_method(text: str) -> MethodSetting:
    """``h2o:budget=64`` -> MethodSetting with all knobs (defaults filled in), validated."""
    text = text.strip()
    name, _, rest = text.partition(":")
    name = name.strip().lower()
    if name not in KNOBS:
        raise ValueError(f"unknown method {name!r} in {text!r}; known: {', '.join(KNOBS)}")
    values = dict(KNOBS[name])
    for part in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, val = part.partition("=")
        key = key.strip()
        if not eq or key not in values:
            raise ValueError(f"method {name}: unknown knob {key!r} in {text!r}; knobs: {', '.join(values) or 'none'}")
        try:
            values[key] = int(val)
        except ValueError:
            raise ValueError(f"method {name}: knob {key}={val!r} is not an integer") from None
    m = MethodSetting(name, tuple((k, values[k]) for k, _ in KNOBS[name]))
    _validate(m)
    return m


def _validate(m: MethodSetting) -> None:
    k = dict(m.knobs)
    if m.name == "kivi":
        if k["bits"] not in (1, 2, 3, 4, 8):
            raise ValueError(f"method kivi: knob bits={k['bits']}: must be 1, 2, 3, 4 or 8")
        if k["group_size"] <= 0 or k["residual_length"] < 0 or k["residual_length"] % k["group_size"]:
            raise ValueError("method kivi: residual_length must be a non-negative multiple of group_size")
    elif m.name in ("h2o", "snapkv"):
        if not 0 < k["window"] < k["budget"]:
            raise ValueError(f"method {m.name}: need 0 < window < budget, got window={k['window']} budget={k['budget']}")
        if m.name == "snapkv" and (k["kernel_size"] < 1 or k["kernel_size"] % 2 == 0):
            raise ValueError("method snapkv: kernel_size must be odd and >= 1")
    elif m.name == "streamingllm" and (k["sink"] < 0 or k["window"] < 1):
        raise ValueError("method streamingllm: need sink >= 0 and window >= 1")


def parse_methods(text: str) -> list[MethodSetting]:
    """Comma-separated list where a knob belongs to the preceding method: ``none,h2o:budget=64,window=16,fp8``."""
    items: list[str] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        head = part.split(":", 1)[0].split("=", 1)[0].strip().lower()
        if "=" in part and ":" not in part and head not in KNOBS and items:
            items[-1] += "," + part  # a further knob of the previous method
        else:
            items.append(part)
    out, seen = [], set()
    for item in items:
        m = parse_method(item)
        if m.spec not in seen:
            seen.add(m.spec)
            out.append(m)
    if not any(m.name == "none" for m in out):
        out.insert(0, parse_method("none"))  # the full cache is the reference for every ratio
    else:  # the reference runs first so agreement can be computed as soon as a batch is done
        out.sort(key=lambda m: m.name != "none")
    return out


def exact_context(m: MethodSetting, prompt_len: int) -> int | None:
    """Largest context length C such that every query whose context (prompt + generated so far, itself
    included) is at most C sees exactly the full cache under ``m``; None when ``m`` never changes anything.

    Every method here compresses *after* a step's attention (prefill attention is always full), so the
    query of context C still sees the full cache and the compressed cache only shows from context C+1 on.
    ``kvprof lengths`` uses it to reuse the full-cache answer: its first ``C - prompt_len`` tokens are
    teacher-forced (or the whole answer copied when it ends within C), which is exact, not an estimate.
    """
    name = m.name
    if name == "none":
        return None
    if name == "fp8":
        return prompt_len
    if name == "kivi":
        return max(prompt_len, m.get("residual_length"))
    if name == "h2o":
        return max(prompt_len, m.get("budget"))
    if name == "streamingllm":
        return max(prompt_len, m.get("sink") + m.get("window"))
    if name == "snapkv":
        return None if prompt_len <= m.get("budget") else prompt_len
    raise ValueError(f"unknown method {name}")
