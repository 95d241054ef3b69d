"""One rule for turning a value given by a person (a command-line string, a YAML scalar, a Python value)
into the type an option or knob declares; engine options (kvsim.config) and method knobs
(kvsim.methods) both use it, so ``--max-num-seqs 8``, ``max_num_seqs: 8`` and ``kivi:bits=2`` read alike."""

from __future__ import annotations

#: the name of each type in error messages
WHAT = {bool: "true/false", int: "an integer", float: "a number", str: "a string"}


def annotation_type(annotation) -> type:
    """bool, int, float or str: what a field annotation names (a type, or its string under postponed
    evaluation, e.g. ``"int | None"``)."""
    if isinstance(annotation, type):
        return annotation
    head = str(annotation).split("|")[0].strip()
    return {"bool": bool, "int": int, "float": float}.get(head, str)


def coerce(value, typ: type):
    """``value`` as ``typ``; ValueError naming what was expected (``WHAT[typ]``) when it cannot be one.
    Strings are parsed; an integral float is an int and an int a float; a bool is never a number."""
    if value is None or typ not in WHAT:
        return value
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0"):
            return value.strip().lower() in ("true", "1")
        raise ValueError(WHAT[bool])
    if typ is str:
        return str(value)
    if isinstance(value, bool):
        raise ValueError(WHAT[typ])
    if isinstance(value, str):
        try:
            value = int(value) if typ is int else float(value)
        except ValueError:
            raise ValueError(WHAT[typ]) from None
    if typ is int:
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if not isinstance(value, int):
            raise ValueError(WHAT[int])
        return value
    if not isinstance(value, (int, float)):
        raise ValueError(WHAT[float])
    return float(value)


__all__ = ["WHAT", "annotation_type", "coerce"]
