"""Method registry: every module in this package that defines a Method subclass with a ``name``.

Spec syntax, the same on the command line, in YAML and in the Python API:
``name`` or ``name:knob=value,knob=value`` (e.g. ``h2o:budget=512,window=32``).
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
import typing

from kvsim.coerce import coerce
from kvsim.errors import ConfigError, UnknownNameError
from kvsim.methods.base import LengthRatio, Method

_REGISTRY: dict[str, type[Method]] = {}


def _discover() -> dict[str, type[Method]]:
    if not _REGISTRY:
        # fill a local dict first: a module that fails to import must not leave a partial registry behind
        found: dict[str, type[Method]] = {}
        for info in pkgutil.iter_modules(__path__):
            if info.name in ("base", "impl"):
                continue
            mod = importlib.import_module(f"{__name__}.{info.name}")
            for obj in vars(mod).values():
                if isinstance(obj, type) and issubclass(obj, Method) and obj.name and obj.__module__ == mod.__name__:
                    if obj.name in found and found[obj.name] is not obj:
                        raise ImportError(f"method name {obj.name!r} defined twice: "
                                          f"{found[obj.name].__module__} and {obj.__module__}")
                    found[obj.name] = obj
        _REGISTRY.update(found)
    return _REGISTRY


def all_methods() -> dict[str, type[Method]]:
    return dict(sorted(_discover().items()))


def _coerce(cls: type[Method], knob: str, raw, spec: str):
    """A knob's value in its declared type (kvsim.coerce, the rule engine options follow too)."""
    typ = typing.get_type_hints(cls).get(knob)
    try:
        return coerce(raw, typ)
    except ValueError:
        raise ConfigError(f"method spec {spec!r}: knob {knob}={raw!r} is not a valid {typ.__name__}") from None


def make_method(name: str, **knobs) -> Method:
    """Build a method from its name and knob values (strings are converted to the knob's type)."""
    reg = _discover()
    if name not in reg:
        raise UnknownNameError("method", name, reg)
    cls = reg[name]
    allowed = {f.name for f in dataclasses.fields(cls)}
    spec = f"{name}:{','.join(f'{k}={v}' for k, v in knobs.items())}"
    for k in knobs:
        if k not in allowed:
            raise ConfigError(
                f"method {name}: unknown knob {k!r}; knobs of {name}: {', '.join(sorted(allowed)) or '(none)'}")
    method = cls(**{k: _coerce(cls, k, v, spec) for k, v in knobs.items()})
    method.validate()
    return method


def parse_method(spec: "str | dict | Method") -> Method:
    """``"h2o:budget=512,window=32"``, ``{"name": "h2o", "budget": 512}`` or a Method instance."""
    if isinstance(spec, Method):
        spec.validate()
        return spec
    if isinstance(spec, dict):
        d = dict(spec)
        if "name" not in d:
            raise ConfigError(f"method mapping {spec!r} has no 'name' key")
        return make_method(d.pop("name"), **d)
    text = str(spec).strip()
    name, _, rest = text.partition(":")
    knobs = {}
    for part in filter(None, (p.strip() for p in rest.split(","))):
        k, eq, v = part.partition("=")
        if not eq or not k.strip():
            raise ConfigError(f"method spec {text!r}: {part!r} is not knob=value")
        if k.strip() in knobs:
            raise ConfigError(f"method spec {text!r}: knob {k.strip()!r} is given twice")
        knobs[k.strip()] = v.strip()
    return make_method(name.strip(), **knobs)


def split_method_list(text: str) -> list[str]:
    """Comma-separated specs where a new spec starts at a token without '=' (``none,h2o:budget=512,window=32,fp8``
    -> ``["none", "h2o:budget=512,window=32", "fp8"]``)."""
    specs: list[str] = []
    for tok in (t.strip() for t in text.split(",")):
        if not tok:
            continue
        if "=" in tok and specs and ":" not in tok:
            specs[-1] += "," + tok
        else:
            specs.append(tok)
    if not specs:
        raise ConfigError(f"method list {text!r} names no method; e.g. none,fp8,kivi:bits=2")
    return specs


def parse_method_list(text: str) -> list[Method]:
    """Comma-separated specs (:func:`split_method_list`), each parsed."""
    return [parse_method(s) for s in split_method_list(text)]


__all__ = ["Method", "LengthRatio", "all_methods", "make_method", "parse_method", "parse_method_list", "split_method_list"]
