"""What a run's whole process tree used: CPU seconds and peak memory, children included.

A run is more than its flow's process: data-etl stages files in a pool of worker
processes (through a fork server, so they are not even the flow's direct children),
ML training may start its own. ``getrusage`` of the flow process sees none of them,
so ``report resources`` used to size data-etl's tier from a fraction of its use.

``TreeUsage`` samples the tree every ``interval_s`` from a daemon thread: the peak of
the summed RSS of every live process, and each process's last seen CPU time (a process
that exits between two samples loses at most one interval of CPU; its RSS was counted
while it lived). ``stop()`` takes one last sample and returns the figures.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass

import psutil

INTERVAL_S = 0.5


@dataclass(frozen=True)
class Usage:
    cpu_s: float
    max_rss_mib: float
    processes: int  # how many distinct processes the tree had, the root included


class TreeUsage:
    def __init__(self, pid: int | None = None, interval_s: float = INTERVAL_S):
        self._root = psutil.Process(pid or os.getpid())
        self._interval = interval_s
        self._cpu: dict[tuple[int, float], float] = {}  # (pid, create time) → CPU s
        self._peak_rss = 0
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="setlist-usage", daemon=True)

    def start(self) -> TreeUsage:
        self.sample()
        self._thread.start()
        return self

    def sample(self) -> None:
        try:
            procs = [self._root, *self._root.children(recursive=True)]
        except psutil.Error:
            return
        rss = 0
        seen: dict[tuple[int, float], float] = {}
        for proc in procs:
            try:
                with proc.oneshot():
                    times = proc.cpu_times()
                    seen[(proc.pid, proc.create_time())] = times.user + times.system
                    rss += proc.memory_info().rss
            except psutil.Error:  # exited meanwhile: its last sample stands
                continue
        with self._lock:
            self._cpu.update(seen)
            self._peak_rss = max(self._peak_rss, rss)

    def _loop(self) -> None:
        while not self._done.wait(self._interval):
            self.sample()

    def stop(self) -> Usage:
        self._done.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        self.sample()
        with self._lock:
            return Usage(
                cpu_s=round(sum(self._cpu.values()), 3),
                max_rss_mib=round(self._peak_rss / 2**20, 1),
                processes=len(self._cpu),
            )
