from kvsim.workload.readers import FORMATS, detect_format, read_trace, write_trace
from kvsim.workload.request import InvalidRecord, Request
from kvsim.workload.stats import format_stats, trace_stats
from kvsim.workload.synthetic import (FixedLengths, LengthStats, QuantileLengths, UniformLengths, rescale_arrivals,
                                      synthetic_requests)

__all__ = ["Request", "InvalidRecord", "read_trace", "write_trace", "detect_format", "FORMATS", "synthetic_requests",
           "FixedLengths", "UniformLengths", "LengthStats", "QuantileLengths", "rescale_arrivals", "trace_stats",
           "format_stats"]
