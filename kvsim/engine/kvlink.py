"""KV transfers over links: ports that carry one transfer at a time, and what they carried when.

A *port* is one end of an instance's link in one direction (a prefill instance's send side, a decode
instance's receive side, a GPU's host-to-device or device-to-host PCIe direction), as many lanes wide as the
instance has GPUs. A transfer holds every port it crosses from its start until its last byte left, and is
served in the order transfers are asked for (first come, first served; no preemption, no sharing): a transfer
asked for at ``t`` starts at ``max(t, every port free)``, its bytes take ``bytes / rate``, and its data is there
``latency`` after the last byte. All of it is a pure function of the request order and the times, so runs are
deterministic and a replica gets the same answers whether its decode steps were fast-forwarded or not (the
times at which transfers are asked for are step boundaries either way).

``LinkLog`` keeps the bytes each port group carried and their busy time, per ``interval_s`` bin (the
``links.csv`` of a replay, and its utilisation plot).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from kvsim.specs.links import LinkSpec


class LinkLog:
    """Busy seconds and bytes per port group per time bin; totals."""

    def __init__(self, interval_s: float = 1.0):
        self.interval_s = interval_s if interval_s > 0 else 1.0
        #: group -> {bin index: [busy port-seconds, bytes]}
        self.bins: dict[str, dict[int, list]] = {}
        #: group -> number of ports (lanes) in it, for utilisation
        self.ports: dict[str, int] = {}
        self.bytes: dict[str, float] = {}
        self.busy_s: dict[str, float] = {}
        self.transfers: dict[str, int] = {}

    def add_port(self, group: str, lanes: int) -> None:
        self.ports[group] = self.ports.get(group, 0) + lanes
        self.bins.setdefault(group, {})
        self.bytes.setdefault(group, 0.0)
        self.busy_s.setdefault(group, 0.0)
        self.transfers.setdefault(group, 0)

    def record(self, group: str, start: float, end: float, num_bytes: float, lanes: int) -> None:
        """``lanes`` ports of ``group`` busy over [start, end) carrying ``num_bytes`` (spread evenly in time)."""
        self.bytes[group] += num_bytes
        self.transfers[group] += 1
        dur = end - start
        self.busy_s[group] += dur * lanes
        if not (dur > 0) or not math.isfinite(end):
            b = self.bins[group].setdefault(int(start // self.interval_s), [0.0, 0.0])
            b[1] += num_bytes
            return
        bins = self.bins[group]
        w = self.interval_s
        i, last = int(start // w), int(end // w)
        while i <= last:
            lo, hi = max(start, i * w), min(end, (i + 1) * w)
            if hi > lo:
                b = bins.setdefault(i, [0.0, 0.0])
                b[0] += (hi - lo) * lanes
                b[1] += num_bytes * (hi - lo) / dur
            i += 1

    def rows(self):
        """(time_s, group, utilization, bytes) per bin, in time order: utilisation = busy port-seconds over
        (ports x bin width)."""
        out = []
        for g, bins in self.bins.items():
            cap = self.ports[g] * self.interval_s
            for i in sorted(bins):
                busy, b = bins[i]
                out.append((i * self.interval_s, g, busy / cap if cap else 0.0, b))
        out.sort(key=lambda r: (r[0], r[1]))
        return out

    def write_csv(self, path) -> None:
        import csv

        with open(path, "w", newline="") as f:
            w = csv.writer(f, lineterminator="\n")
            w.writerow(["time_s", "link", "utilization", "bytes"])
            for t, g, u, b in self.rows():
                w.writerow([repr(round(t, 9)), g, repr(round(u, 9)), repr(round(b, 3))])

    def utilization(self, group: str, span_s: float) -> float | None:
        """Mean busy fraction of the group's ports over ``span_s`` seconds."""
        lanes = self.ports.get(group, 0)
        if not lanes or not (span_s > 0):
            return None
        return self.busy_s[group] / (lanes * span_s)


@dataclass
class Port:
    """One direction of an instance's link: ``lanes`` GPUs' worth of ``link``."""

    group: str
    link: LinkSpec
    lanes: int = 1
    free_s: float = 0.0
    log: LinkLog | None = field(default=None, repr=False)

    def __post_init__(self):
        if self.log is not None:
            self.log.add_port(self.group, self.lanes)


@dataclass(slots=True)
class Booking:
    start_s: float
    #: the last byte has left (the ports are free again)
    sent_s: float
    #: the data is usable at the far end (``sent_s`` + latency)
    ready_s: float
    bytes: float


def book(ports: list[Port], t: float, num_bytes: float, link: LinkSpec, lanes: int, not_before=None) -> Booking:
    """Reserve ``ports`` for a transfer of ``num_bytes`` asked for at ``t`` over ``lanes`` of ``link``.

    ``not_before(start)`` (optional) gives the earliest time the last byte can leave once the transfer may start
    at ``start``, for a transfer whose data is still being produced (layer-wise); default ``start + bytes/rate``."""
    start = t
    for p in ports:
        if p.free_s > start:
            start = p.free_s
    rate = link.bandwidth_bytes_per_s * lanes
    wire = 0.0 if (num_bytes <= 0 or math.isinf(rate)) else num_bytes / rate
    sent = start + wire if not_before is None else max(start + wire, not_before(start))
    for p in ports:
        p.free_s = sent
        if p.log is not None:
            p.log.record(p.group, start, sent, num_bytes, p.lanes)
    ready = sent + (link.latency_s if num_bytes > 0 else 0.0)
    return Booking(start, sent, ready, num_bytes)


def layerwise_last_byte(step_start_s: float, step_s: float, num_layers: int, num_bytes: float, rate: float):
    """``not_before`` for a layer-wise push: layer ``l`` of the last prefill step (start ``s``, length ``T``)
    is computed at ``s + (l+1) T / N``, and its ``bytes / N`` can leave from then on, one layer after another.
    Once the transfer may start at ``a``, the last byte leaves at
    ``max over l of (max(a, s + (l+1) T/N) + (N - l) bytes / (N rate))``: the link either keeps up with the
    layers (the last layer's share is all that is left after the step) or the step's first layer starts a
    transfer the link cannot finish any sooner."""
    n = max(1, int(num_layers))
    per = 0.0 if math.isinf(rate) else num_bytes / (n * rate)
    dt = step_s / n

    def f(a: float) -> float:
        # piecewise linear in l: the maximum is at an end or where the layer time crosses a
        best = -math.inf
        k = int((a - step_start_s) / dt) - 1 if dt > 0 else n - 1
        for l in {0, n - 1, min(n - 1, max(0, k)), min(n - 1, max(0, k + 1))}:
            v = max(a, step_start_s + (l + 1) * dt) + (n - l) * per
            if v > best:
                best = v
        return best

    return f


__all__ = ["LinkLog", "Port", "Booking", "book", "layerwise_last_byte"]
