"""Where a sweep's cells run: ``local`` worker processes (one cell at a time each, ``jobs=1`` in this
process) or a Ray cluster. An executor takes the cells to run, the function that runs one
(``run_cell(params, base_dir) -> row``, never raising) and three callbacks: ``on_done(params, row)`` as each
finishes, ``on_lost(params, why)`` for a cell whose worker died under it, and ``on_start()`` once work
begins (the progress bar starts there, after workers are forked).

A local worker that dies costs only the cell it held (recorded as lost; a new worker takes over the
rest). Workers die with the sweep: on Linux the kernel kills them when the parent dies
(``PR_SET_PDEATHSIG``), elsewhere they notice within a second; SIGTERM or Ctrl-C stops them and the sweep
cleanly (:class:`SweepStopped`), keeping every finished cell. ``kvsim plan --jobs`` uses the same worker
set-up (:func:`mp_context`, :func:`tie_to_parent`).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

from kvsim.errors import ConfigError


def mp_context(name: str | None = None):
    """The multiprocessing context for local workers: ``name`` or $KVSIM_MP_START (fork, spawn, forkserver),
    else the platform default (fork on Linux up to Python 3.13). With fork, a script that calls
    ``run_sweep`` needs no ``if __name__ == "__main__"`` guard; spawn and forkserver re-import it."""
    import multiprocessing as mp

    return mp.get_context(name or os.environ.get("KVSIM_MP_START") or None)


class SweepStopped(KeyboardInterrupt):
    """SIGTERM or SIGINT reached a running sweep: its workers are stopped, finished cells are kept."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _exit_text(code) -> str:
    if code is not None and code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def tie_to_parent(parent_pid: int | None) -> None:
    """Make this worker die with the sweep, however the sweep ends (even SIGKILL, which runs no cleanup)."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    ppid = os.getppid()
    if parent_pid is not None and ppid != parent_pid:
        os._exit(1)  # the sweep died before the line above took effect

    def watch():  # where PDEATHSIG does not exist; harmless where it does
        while True:
            time.sleep(1.0)
            if os.getppid() != ppid:
                os._exit(1)

    threading.Thread(target=watch, daemon=True, name="kvsim-parent-watch").start()


def _worker_main(conn, base_dir, parent_pid, run_cell) -> None:
    """A local worker: run the cells the parent sends over ``conn``, one at a time, until it sends None."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group; the parent decides
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the parent's handler, inherited through fork
    tie_to_parent(parent_pid)
    while True:
        try:
            params = conn.recv()
        except (EOFError, OSError):
            return
        if params is None:
            return
        conn.send(run_cell(params, base_dir))


class _Worker:
    def __init__(self, ctx, base_dir, parent_pid, run_cell):
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker_main, args=(child, base_dir, parent_pid, run_cell), daemon=True,
                                name="kvsim-sweep-worker")
        self.proc.start()
        child.close()
        self.params = None  # the cell it holds

    def stop(self, timeout_s: float = 5.0) -> None:
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(timeout_s)
            if self.proc.is_alive():
                self.proc.kill()
        self.proc.join()
        self.conn.close()


def run_local(todo, base_dir, jobs, on_done, on_start, run_cell, on_lost):
    if jobs <= 1:
        on_start()
        for params in todo:
            on_done(params, run_cell(params, base_dir))
        return
    # one pipe per worker and one cell per worker at a time, instead of a shared queue: a worker that
    # dies (SIGKILL, out of memory) can only take its own cell with it, never a lock every worker needs
    # (concurrent.futures breaks the whole pool then and fails every pending cell)
    from collections import deque
    from multiprocessing.connection import wait

    ctx = mp_context()
    # fork / spawn: the sweep is the parent; forkserver: the server is, and it dies with the sweep
    parent_pid = os.getpid() if ctx.get_start_method() in ("fork", "spawn") else None
    pending = deque(todo)
    n = min(jobs, len(todo))
    workers: list[_Worker] = []
    idle_deaths = 0  # workers that died before taking a cell: a few are kills, many a broken start

    try:
        while pending or any(w.params is not None for w in workers):
            for w in [w for w in workers if w.params is None and not w.proc.is_alive()]:
                w.stop()
                workers.remove(w)
                idle_deaths += 1
            if idle_deaths > 2 * n + 2:
                while pending:
                    params = pending.popleft()
                    on_lost(params, "workers kept dying before taking a cell")
            while pending and len(workers) < n:
                workers.append(_Worker(ctx, base_dir, parent_pid, run_cell))
            if on_start is not None:
                on_start()  # after the first workers exist: the progress bar's thread is not forked into them
                on_start = None
            for w in workers:
                if w.params is None and pending:
                    params = pending.popleft()
                    try:
                        w.conn.send(params)
                        w.params = params
                    except OSError:  # died idle: the cell never started
                        pending.appendleft(params)
            busy = [w for w in workers if w.params is not None]
            if not busy:
                continue
            wait([w.conn for w in busy] + [w.proc.sentinel for w in busy])
            for w in busy:
                row, closed = None, False
                try:
                    if w.conn.poll():
                        row = w.conn.recv()
                except (EOFError, OSError):
                    closed = True  # its end of the pipe closed: it is exiting
                params = w.params
                if row is not None:
                    w.params = None
                    on_done(params, row)
                elif closed or not w.proc.is_alive():  # died holding its cell, with no result sent
                    w.proc.join(5.0)
                    w.params = None
                    on_lost(params, f"worker {w.proc.pid} died ({_exit_text(w.proc.exitcode)})")
                    w.stop()
                    workers.remove(w)
        for w in workers:
            try:
                w.conn.send(None)
            except OSError:
                pass
        for w in workers:
            w.proc.join(5.0)
    finally:
        for w in workers:
            w.stop()


def run_ray(todo, base_dir, jobs, on_done, on_start, run_cell, on_lost, address=None):
    try:
        import ray
    except ImportError:
        raise ConfigError("--executor ray needs Ray: pip install 'kvsim[ray]'") from None
    started = False
    if not ray.is_initialized():
        kw = {"address": address} if address else {}
        if not address and jobs > 1:
            kw["num_cpus"] = jobs
        ray.init(include_dashboard=False, log_to_driver=False, **kw)
        started = True
    try:
        remote = ray.remote(num_cpus=1, max_retries=1)(run_cell)
        refs = {remote.remote(params, base_dir): params for params in todo}
        on_start()
        pending = list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            for ref in ready:
                params = refs[ref]
                try:
                    row = ray.get(ref)
                except Exception as e:  # noqa: BLE001 - run_cell never raises: the task or its worker failed
                    on_lost(params, f"ray task failed ({type(e).__name__}: {e})")
                    continue
                on_done(params, row)
    finally:
        if started:
            ray.shutdown()


class stop_on_signals:
    """Within the block, SIGTERM and SIGINT raise SweepStopped (main thread only: elsewhere Python cannot
    install handlers, and the signals keep their usual effect)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __enter__(self):
        self.old = {}
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self.old[sig] = signal.signal(sig, self._raise)
        return self

    @staticmethod
    def _raise(signum, frame):
        raise SweepStopped(signum)

    def __exit__(self, *exc):
        for sig, h in self.old.items():
            signal.signal(sig, h)
