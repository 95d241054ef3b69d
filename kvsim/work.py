"""Work = what one kernel (or one method hook) costs on one GPU; the roofline turns it into time.

``flops`` run on the tensor cores (GEMM-like), ``bytes`` move through DRAM, ``alu_ops`` run on the
CUDA cores (dequantisation, bit unpacking, compares: the non-tensor FP32 rate of the GPU bounds them),
and ``host_s`` is host time the step waits for (a launch path with a device-to-host sync in it), which
no GPU overlaps. The GPU parts overlap each other (time = the largest); ``host_s`` adds.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Work:
    flops: float = 0.0
    bytes: float = 0.0
    alu_ops: float = 0.0
    host_s: float = 0.0

    def __add__(self, other: "Work") -> "Work":
        return Work(self.flops + other.flops, self.bytes + other.bytes, self.alu_ops + other.alu_ops,
                    self.host_s + other.host_s)

    def scale(self, k: float) -> "Work":
        return Work(self.flops * k, self.bytes * k, self.alu_ops * k, self.host_s * k)

    @property
    def empty(self) -> bool:
        return not (self.flops or self.bytes or self.alu_ops or self.host_s)


ZERO = Work()
