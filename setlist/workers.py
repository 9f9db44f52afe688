"""Setlist's worker types (the ``prefect.collections`` entry point loads this module):

- ``setlist-process``: Prefect's process worker that takes tenant runs only with a grant
  (``setlist.grants``), for the local pool;
- ``setlist-kubernetes``: the hardened Kubernetes worker (``setlist.k8s_worker``), with
  the same gate.
"""

from __future__ import annotations

from prefect.workers.process import ProcessWorker

from setlist.grants import GrantedRunsOnly
from setlist.k8s_worker import SetlistKubernetesWorker

__all__ = ["SetlistKubernetesWorker", "SetlistProcessWorker"]


class SetlistProcessWorker(GrantedRunsOnly, ProcessWorker):
    type = "setlist-process"
    _display_name = "Setlist Process"
    _description = "Runs Setlist jobs as local processes, in the dispatcher's order."
