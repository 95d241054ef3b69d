"""Reader (and shared writer) of the kvsim profile file, schema version 1 (docs/profile-schema.md).

A profile holds measured kernel times as regular grids. ``Table.lookup`` interpolates linearly in
(log axis, log time) and returns None outside the grid or next to a null point, so the caller falls
back to the roofline. An axis may start at 0 (a history of no cached tokens); between 0 and its next
value the axis weight is linear instead of logarithmic. No torch, no numpy on the lookup path: it runs
~1e5-1e6 times per replay, so everything it needs (log axes, log values, strides) is precomputed into
plain lists at load.
"""

from __future__ import annotations

import json
import math
import os
from bisect import bisect_right
from itertools import product
from pathlib import Path

from kvsim.errors import ConfigError

SCHEMA = "kvsim-profile"
SCHEMA_VERSION = 1
SUPPORTED_VERSIONS = (1,)

_log = math.log
_exp = math.exp


def interp_loglog(x: float, x0: float, t0: float, x1: float, t1: float) -> float:
    """Between two points (x0, t0) and (x1, t1): linear in (log x, log t), the rule between grid points
    everywhere (profile lookups, kvprof's leave-one-out check, the importers' resampling)."""
    if x0 == x1:
        return t0
    w = (_log(x) - _log(x0)) / (_log(x1) - _log(x0))
    return math.exp(_log(t0) + w * (_log(t1) - _log(t0)))


def _is_num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _weight(lx, xs, i, x) -> float:
    """Where x lies between grid values i and i + 1: in log axis, or linearly above a leading 0."""
    lo = lx[i]
    if lo is None:
        return x / xs[i + 1]
    return (_log(x) - lo) / (lx[i + 1] - lo)


class Table:
    """One regular grid of times (seconds). ``axes`` ordered name -> strictly increasing values, positive
    after an optional leading 0."""

    __slots__ = ("name", "axis_names", "axes", "_ndim", "_x", "_lx", "_v", "_lv", "_strides", "_n0", "_n1")

    def __init__(self, name: str, axes: dict, time_s):
        self.name = name
        self.axis_names = tuple(axes)
        self.axes = {k: [float(x) for x in v] for k, v in axes.items()}
        self._ndim = len(self.axis_names)
        self._x = [self.axes[k] for k in self.axis_names]
        self._lx = [[_log(x) if x > 0 else None for x in xs] for xs in self._x]
        flat: list = []

        def walk(node, depth):
            if depth == self._ndim:
                flat.append(None if node is None else float(node))
            else:
                for child in node:
                    walk(child, depth + 1)

        walk(time_s, 0)
        self._v = flat
        self._lv = [None if v is None else _log(v) for v in flat]
        strides, s = [], 1
        for xs in reversed(self._x):
            strides.append(s)
            s *= len(xs)
        self._strides = tuple(reversed(strides))
        self._n0 = self.axis_names[0]
        self._n1 = self.axis_names[1] if self._ndim > 1 else None

    # -- lookups ----------------------------------------------------------------------------
    def lookup(self, **axes) -> float | None:
        """Time in seconds at these axis values, or None (outside the grid / next to a null point)."""
        if len(axes) != self._ndim:
            raise TypeError(f"table {self.name}: lookup needs exactly the axes {list(self.axis_names)}, got {list(axes)}")
        try:
            if self._ndim == 1:
                return self._lookup1(axes[self._n0])
            if self._ndim == 2:
                return self._lookup2(axes[self._n0], axes[self._n1])
            return self._lookupn([axes[k] for k in self.axis_names])
        except KeyError:
            raise TypeError(f"table {self.name}: lookup needs exactly the axes {list(self.axis_names)}, got {list(axes)}") from None

    def lookup_at(self, *values: float) -> float | None:
        """Positional form of ``lookup`` (values in axis order); a little faster on the hot path."""
        if self._ndim == 1:
            return self._lookup1(*values)
        if self._ndim == 2:
            return self._lookup2(*values)
        return self._lookupn(list(values))

    def _lookup1(self, x) -> float | None:
        xs = self._x[0]
        if not (xs[0] <= x <= xs[-1]):
            return None
        i = bisect_right(xs, x) - 1
        v = self._v
        if xs[i] == x:
            return v[i]
        if v[i] is None or v[i + 1] is None:
            return None
        lv = self._lv
        w = _weight(self._lx[0], xs, i, x)
        return _exp(lv[i] + w * (lv[i + 1] - lv[i]))

    def _lookup2(self, x, y) -> float | None:
        xs, ys = self._x
        if not (xs[0] <= x <= xs[-1]) or not (ys[0] <= y <= ys[-1]):
            return None
        i = bisect_right(xs, x) - 1
        j = bisect_right(ys, y) - 1
        n1 = len(ys)
        v, lv = self._v, self._lv
        k = i * n1 + j
        if xs[i] == x:
            if ys[j] == y:
                return v[k]
            if v[k] is None or v[k + 1] is None:
                return None
            wj = _weight(self._lx[1], ys, j, y)
            return _exp(lv[k] + wj * (lv[k + 1] - lv[k]))
        wi = _weight(self._lx[0], xs, i, x)
        if ys[j] == y:
            if v[k] is None or v[k + n1] is None:
                return None
            return _exp(lv[k] + wi * (lv[k + n1] - lv[k]))
        a, b, c, d = lv[k], lv[k + 1], lv[k + n1], lv[k + n1 + 1]
        if a is None or b is None or c is None or d is None:
            return None
        wj = _weight(self._lx[1], ys, j, y)
        lo = a + wj * (b - a)
        hi = c + wj * (d - c)
        return _exp(lo + wi * (hi - lo))

    def _lookupn(self, values) -> float | None:
        base, corners = 0, []
        for d, x in enumerate(values):
            xs = self._x[d]
            if not (xs[0] <= x <= xs[-1]):
                return None
            i = bisect_right(xs, x) - 1
            base += i * self._strides[d]
            if xs[i] == x:
                corners.append(((0, 1.0),))
            else:
                w = _weight(self._lx[d], xs, i, x)
                corners.append(((0, 1.0 - w), (self._strides[d], w)))
        if all(len(c) == 1 for c in corners):
            return self._v[base]
        acc = 0.0
        for combo in product(*corners):
            off, weight = base, 1.0
            for step, w in combo:
                off += step
                weight *= w
            lvv = self._lv[off]
            if lvv is None:
                return None
            acc += weight * lvv
        return _exp(acc)

    # -- grid access --------------------------------------------------------------------------
    def value_at(self, *indices: int) -> float | None:
        """The stored value at grid indices (one per axis); None where the grid has null."""
        return self._v[sum(i * s for i, s in zip(indices, self._strides))]

    def to_dict(self) -> dict:
        def build(d, off):
            n = len(self._x[d])
            if d == self._ndim - 1:
                return [self._v[off + i] for i in range(n)]
            return [build(d + 1, off + i * self._strides[d]) for i in range(n)]

        return {"axes": {k: [int(x) if x.is_integer() else x for x in self.axes[k]] for k in self.axis_names},
                "time_s": build(0, 0)}

    def __repr__(self) -> str:
        dims = "x".join(str(len(x)) for x in self._x)
        return f"Table({self.name!r}, axes={list(self.axis_names)}, {dims})"


class Profile:
    """A loaded profile. ``table(name)`` gives a Table or None (absent: use the roofline)."""

    def __init__(self, data: dict, path: str = "<profile>"):
        self.path = str(path)
        self.data = data
        self.name: str = data["name"]
        self.model: str = data["model"]
        self.hardware: str = data["hardware"]
        self.tensor_parallel_size: int = int(data["tensor_parallel_size"])
        self.dtype: str | None = data.get("dtype")
        self.step_overhead_s: float = float(data.get("step_overhead_s", 0.0))
        self.provenance: dict = dict(data.get("provenance") or {})
        self.lengths: dict = dict(data.get("lengths") or {})
        self.loo_error: dict = dict(data.get("loo_error") or {})
        #: {"decode": alpha, "mixed": alpha}: where a batch of unequal decode contexts lies between the
        #: uniform batch at the mean and at the largest context (docs/profile-schema.md)
        self.decode_skew_alpha: dict = {k: float(v) for k, v in (data.get("decode_skew_alpha") or {}).items()}
        self.tables: dict[str, Table] = {n: Table(n, t["axes"], t["time_s"]) for n, t in data["tables"].items()}

    def table(self, name: str) -> Table | None:
        return self.tables.get(name)

    def lookup(self, table: str, **axes) -> float | None:
        """``table(name).lookup(**axes)``, None when the table is absent."""
        t = self.tables.get(table)
        return None if t is None else t.lookup(**axes)

    def __repr__(self) -> str:
        return f"Profile({self.name!r}, model={self.model!r}, hardware={self.hardware!r}, tp={self.tensor_parallel_size}, {len(self.tables)} tables)"


# -- validation ---------------------------------------------------------------------------------
def _check_table(name: str, t, where: str) -> None:
    def fail(why):
        raise ConfigError(f"{where}: table {name!r}: {why}")

    if not isinstance(t, dict):
        fail("must be a mapping with 'axes' and 'time_s'")
    axes = t.get("axes")
    if not isinstance(axes, dict) or not axes:
        fail("'axes' must be a non-empty mapping axis name -> list of values")
    shape = []
    for ax, xs in axes.items():
        if not isinstance(xs, list) or not xs:
            fail(f"axis {ax!r} must be a non-empty list")
        for i, x in enumerate(xs):
            # only the first value may be 0 (interpolated linearly up to the next one)
            if not _is_num(x) or not math.isfinite(x) or x < 0 or (x == 0 and i > 0):
                fail(f"axis {ax!r}: value {x!r} is not a finite positive number (0 only as the first value)")
        if any(b <= a for a, b in zip(xs, xs[1:])):
            fail(f"axis {ax!r}: values must be strictly increasing, got {xs}")
        shape.append(len(xs))
    if "time_s" not in t:
        fail("missing 'time_s'")

    def walk(node, depth, at):
        if depth == len(shape):
            if node is not None and (not _is_num(node) or not math.isfinite(node) or node <= 0):
                fail(f"time_s{at}: {node!r} is not a finite positive number or null")
            return
        if not isinstance(node, list) or len(node) != shape[depth]:
            got = len(node) if isinstance(node, list) else type(node).__name__
            fail(f"time_s{at}: expected a list of {shape[depth]} (axis {list(axes)[depth]!r}), got {got}")
        for i, child in enumerate(node):
            walk(child, depth + 1, f"{at}[{i}]")

    walk(t["time_s"], 0, "")


def validate_profile(data: dict, path: str = "<profile>") -> None:
    """Raise ConfigError (naming ``path`` and the offending key/table) unless ``data`` is a valid v1 profile."""
    where = str(path)
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: a profile must be a JSON object, got {type(data).__name__}")
    schema = data.get("schema")
    if schema != SCHEMA:
        raise ConfigError(f"{where}: not a kvsim profile: 'schema' is {schema!r}, expected {SCHEMA!r}")
    version = data.get("schema_version")
    if not (isinstance(version, int) and not isinstance(version, bool)) or version not in SUPPORTED_VERSIONS:
        raise ConfigError(
            f"{where}: profile schema_version {version!r} is not supported by this kvsim "
            f"(supported: {', '.join(map(str, SUPPORTED_VERSIONS))}); re-create the profile with a matching "
            f"kvprof, or use a kvsim that reads version {version!r}")
    for key in ("name", "model", "hardware"):
        if not isinstance(data.get(key), str) or not data[key]:
            raise ConfigError(f"{where}: '{key}' must be a non-empty string, got {data.get(key)!r}")
    tp = data.get("tensor_parallel_size")
    if not isinstance(tp, int) or isinstance(tp, bool) or tp < 1:
        raise ConfigError(f"{where}: 'tensor_parallel_size' must be an integer >= 1, got {tp!r}")
    so = data.get("step_overhead_s", 0.0)
    if not _is_num(so) or not math.isfinite(so) or so < 0:
        raise ConfigError(f"{where}: 'step_overhead_s' must be a number >= 0, got {so!r}")
    tables = data.get("tables")
    if not isinstance(tables, dict):
        raise ConfigError(f"{where}: 'tables' must be a mapping table name -> table")
    for name, t in tables.items():
        _check_table(name, t, where)
    lengths = data.get("lengths", {})
    if not isinstance(lengths, dict):
        raise ConfigError(f"{where}: 'lengths' must be a mapping method spec -> entry")
    for spec, entry in lengths.items():
        ratios = entry.get("ratios") if isinstance(entry, dict) else None
        if not isinstance(ratios, list) or not all(_is_num(r) and math.isfinite(r) and r > 0 for r in ratios):
            raise ConfigError(f"{where}: lengths[{spec!r}]: 'ratios' must be a list of positive numbers")
    skew = data.get("decode_skew_alpha", {})
    if not isinstance(skew, dict):
        raise ConfigError(f"{where}: 'decode_skew_alpha' must be a mapping, got {type(skew).__name__}")
    for k, v in skew.items():
        if k not in ("decode", "mixed"):
            raise ConfigError(f"{where}: decode_skew_alpha: unknown key {k!r} (known: decode, mixed)")
        if not _is_num(v) or not math.isfinite(v):
            raise ConfigError(f"{where}: decode_skew_alpha[{k!r}]: {v!r} is not a finite number")
    for key in ("provenance", "loo_error"):
        if key in data and not isinstance(data[key], dict):
            raise ConfigError(f"{where}: '{key}' must be a mapping")


def load_profile(path) -> Profile:
    """Read, validate and index a profile file. Errors name the file (and table / key)."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ConfigError(f"profile {str(p)!r}: cannot read: {e.strerror or e}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{p}:{e.lineno}: not valid JSON: {e.msg}") from None
    validate_profile(data, str(p))
    return Profile(data, str(p))


# -- writing --------------------------------------------------------------------------------------
def _dump(obj, indent: int = 0) -> str:
    """JSON with one line per innermost list (tables stay readable and diffable)."""
    pad, pad1 = " " * indent, " " * (indent + 2)
    if isinstance(obj, dict):
        if not obj:
            return "{}"
        items = [f"{pad1}{json.dumps(str(k))}: {_dump(v, indent + 2)}" for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(obj, (list, tuple)):
        if all(not isinstance(x, (dict, list, tuple)) for x in obj):
            return "[" + ", ".join(json.dumps(x) for x in obj) + "]"
        return "[\n" + ",\n".join(pad1 + _dump(x, indent + 2) for x in obj) + "\n" + pad + "]"
    return json.dumps(obj)


def write_profile(path, data: dict) -> Path:
    """Validate ``data`` as a v1 profile and write it atomically to ``path`` (parents created)."""
    p = Path(path)
    data = {"schema": SCHEMA, "schema_version": SCHEMA_VERSION, **data} if "schema" not in data else data
    validate_profile(data, str(p))
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(_dump(data) + "\n")
    os.replace(tmp, p)
    return p


__all__ = ["SCHEMA", "SCHEMA_VERSION", "Profile", "Table", "load_profile", "validate_profile", "write_profile"]
