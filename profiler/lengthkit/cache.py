"""The per-layer cache ``kvprof lengths`` keeps for one batch (:class:`LayerCache`) and the quantisation
round trips the methods' modules in :mod:`profiler.methods` apply to it."""

from __future__ import annotations

import torch


# -- quantisation helpers ---------------------------------------------------------------------------

def fake_quant(x: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Asymmetric min-max quantise -> dequantise along ``dim`` (KIVI's scheme: zero point = min)."""
    mn = x.amin(dim=dim, keepdim=True)
    mx = x.amax(dim=dim, keepdim=True)
    levels = (1 << bits) - 1
    scale = (mx - mn).clamp(min=1e-8) / levels
    q = ((x - mn) / scale).round().clamp(0, levels)
    return (q * scale + mn).to(x.dtype)


def quant_values_per_token(v: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """v [..., T, D]: each token's channels in groups of ``group``."""
    d = v.shape[-1]
    g = group if d % group == 0 else d
    return fake_quant(v.reshape(*v.shape[:-1], d // g, g), bits, -1).reshape(v.shape)


def quant_keys_per_channel(k: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """k [H, T, D] with T a multiple of ``group``: each channel over groups of ``group`` tokens."""
    h, t, d = k.shape
    return fake_quant(k.reshape(h, t // group, group, d), bits, 2).reshape(h, t, d)


def fp8_round_trip(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(-448.0, 448.0).to(torch.float8_e4m3fn).to(x.dtype)


# -- the cache ---------------------------------------------------------------------------------------

class LayerCache:
    """One layer's cache in preallocated buffers (capacity = longest prompt + max new tokens), so a
    decode step writes one column instead of copying the whole cache. ``k``/``v``/``valid``/``score``
    are views of the first ``t`` columns."""

    def __init__(self, kbuf, vbuf, validbuf, t, scorebuf=None, row_count=None):
        self.kbuf, self.vbuf, self.validbuf, self.t = kbuf, vbuf, validbuf, t
        #: a method's per-token score [B, Hkv, cap] (H2O: accumulated attention), zeroed for new tokens
        self.scorebuf = scorebuf
        #: a method's per-row count [B] (KIVI: real tokens whose keys are quantised)
        self.row_count = row_count

    @property
    def k(self):  # [B, Hkv, t, D], what attention sees (dequantised where the method quantises)
        return self.kbuf[:, :, : self.t]

    @property
    def v(self):
        return self.vbuf[:, :, : self.t]

    @property
    def valid(self):  # [B, Hkv, t] bool: real (not padding) and not evicted
        return self.validbuf[:, :, : self.t]

    @valid.setter
    def valid(self, value):
        self.validbuf[:, :, : self.t] = value

    @property
    def score(self):
        return None if self.scorebuf is None else self.scorebuf[:, :, : self.t]

    @score.setter
    def score(self, value):
        self.scorebuf[:, :, : self.t] = value

    def append(self, k, v):
        n = k.shape[2]
        self.kbuf[:, :, self.t:self.t + n] = k
        self.vbuf[:, :, self.t:self.t + n] = v
        self.validbuf[:, :, self.t:self.t + n] = True
        if self.scorebuf is not None:
            self.scorebuf[:, :, self.t:self.t + n] = 0.0
        self.t += n

    def select(self, rows):
        # copy only the t filled columns into fresh buffers of the same capacity: ``append`` writes every
        # column past t (k, v, valid, score) before it is read, so those may stay uninitialised
        def take(buf):
            out = buf.new_empty((len(rows),) + tuple(buf.shape[1:]))
            out[:, :, : self.t] = buf[rows, :, : self.t]
            return out

        return LayerCache(take(self.kbuf), take(self.vbuf), take(self.validbuf), self.t,
                          None if self.scorebuf is None else take(self.scorebuf),
                          None if self.row_count is None else self.row_count[rows])
