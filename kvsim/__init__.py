"""kvsim: what KV-cache compression does to serving throughput and latency.

The Python API lives in :mod:`kvsim.api`.
"""

__version__ = "0.1.0"
