"""GPU <-> host copy speed (the CPU KV tier's link): pinned host memory, one direction at a time, block-sized and
larger copies. Needs a CUDA GPU and torch; prints one JSON object, asserts nothing.

    python benchmarks/host_link_copy.py

For each size: the median time of 20 copies (CUDA events) host to device and device to host, and the rate; then a
least-squares fit ``t = latency + bytes / bandwidth`` over the sizes, the two figures a link entry in
kvsim/specs/data/links.yaml carries (docs/disaggregation.md compares them with pcie-gen5-x16's line rate).
"""

from __future__ import annotations

import json
import platform
import statistics


def main() -> int:
    import torch

    if not torch.cuda.is_available():
        print(json.dumps({"error": "no CUDA device"}))
        return 0
    sizes = [2 << 20, 8 << 20, 32 << 20, 128 << 20, 512 << 20, 1 << 30]
    out = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "kernel": platform.release(), "sizes": []}
    fits = {}
    for name in ("h2d", "d2h"):
        pts = []
        for n in sizes:
            host = torch.empty(n, dtype=torch.uint8, pin_memory=True)
            dev = torch.empty(n, dtype=torch.uint8, device="cuda")
            src, dst = (host, dev) if name == "h2d" else (dev, host)
            for _ in range(3):
                dst.copy_(src, non_blocking=True)
            torch.cuda.synchronize()
            times = []
            for _ in range(20):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                dst.copy_(src, non_blocking=True)
                b.record()
                b.synchronize()
                times.append(a.elapsed_time(b) / 1e3)
            t = statistics.median(times)
            pts.append((n, t))
            out["sizes"].append({"dir": name, "bytes": n, "median_s": t, "gb_s": n / t / 1e9})
            del host, dev
        mx = sum(p[0] for p in pts) / len(pts)
        my = sum(p[1] for p in pts) / len(pts)
        slope = sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x, _ in pts)
        fits[name] = {"bandwidth_gb_s": 1 / slope / 1e9, "latency_us": (my - slope * mx) * 1e6}
    out["fit"] = fits
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
