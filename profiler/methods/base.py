"""What kvprof's code for one compression method declares and implements; each method's module in
:mod:`profiler.methods` subclasses :class:`MethodSupport`. The method itself (its knobs, their defaults and
validation, its implementations) is kvsim's (:mod:`kvsim.methods`): the profiler parses every spec with
kvsim's registry and only declares here which of those settings its torch code runs."""

from __future__ import annotations

from typing import ClassVar


class MethodSupport:
    #: the kvsim method (its name in kvsim.methods)
    name: ClassVar[str] = ""
    #: the kvsim implementation (``impl`` knob) whose algorithm the torch code computes; None for a method
    #: without implementations. kvsim uses a profile's method tables only for specs with this impl
    impl: ClassVar[str | None] = None
    #: the kvprof tools that run it: "kernels", "replay", "lengths" (default: all three)
    tools: ClassVar[tuple[str, ...]] = ("kernels", "replay", "lengths")
    #: knob -> the values the torch code runs, where narrower than kvsim's own validation
    knob_values: ClassVar[dict[str, tuple]] = {}
    #: what else the code needs of the knobs, in words (checked by :meth:`check`)
    knob_rules: ClassVar[tuple[str, ...]] = ()
    #: its prefill reads the attention probabilities (score matrix materialised): kvprof kernels times the
    #: eager prefill table for it, kvprof lengths zeroes the padding rows of the probabilities
    eager_prefill: ClassVar[bool] = False

    def check(self, m) -> str | None:
        """Why the torch code cannot run this setting of the method (None: it can)."""
        for knob, values in self.knob_values.items():
            if getattr(m, knob) not in values:
                return f"knob {knob}={getattr(m, knob)!r}: its torch code runs {', '.join(map(str, values))}"
        return None

    # -- kvprof kernels (c: profiler.kernels.bench.Ctx, m: the kvsim Method; None: no such table) -----------
    def prefill_extra(self, c, m, C: int, KV: int):
        """The method's own work on a prefill chunk of ``C`` tokens over ``KV`` cached ones."""
        return None

    def decode_attention(self, c, m, B: int, KV: int):
        """Decode attention of ``B`` sequences of ``KV`` kept tokens (default: the plain paged cache)."""
        return c.paged_decode(B, KV)

    def decode_extra(self, c, m, B: int, KV: int):
        """The method's own work in a decode step (writing, quantising, evicting)."""
        return None

    # -- kvprof replay ------------------------------------------------------------------------------------
    #: the physical cache (a profiler.replay.kvstore.KVStore subclass)
    store: ClassVar[type | None] = None

    # -- kvprof lengths (profiler.lengthkit.engine.CacheState calls these) ------------------------------------
    def exact_context(self, m, prompt_len: int) -> int | None:
        """Largest context C such that every query whose context is at most C sees exactly the full cache
        under ``m`` (None: it never changes anything). Every method here compresses *after* a step's
        attention, so the query of context C still sees the full cache."""
        return None

    def init_layer(self, lc, m) -> None:
        """A layer's cache was just created (profiler.lengthkit.cache.LayerCache): add the method's state."""

    def after_step(self, state, lc, m, probs, prefill: bool, num_queries: int) -> None:
        """The method's bookkeeping after a step's attention (what the next step will see)."""


__all__ = ["MethodSupport"]
