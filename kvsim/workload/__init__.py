from kvsim.workload.request import InvalidRecord, Request

__all__ = ["Request", "InvalidRecord"]
