"""Setlist's worker types; the ``prefect.collections`` entry point loads this package.

- ``setlist-process`` (``process.py``): Prefect's process worker that takes tenant runs
  only with the dispatcher's grant, for the local pool;
- ``setlist-kubernetes`` (``kubernetes.py``): the hardened Kubernetes worker with the
  same gate, and ``render_job``, the dry-run render through the same configuration;
- ``audited.py``: the ``setlist.job.started`` entry both record for each run they take.

May import ``core``, ``k8s`` and ``dispatch``; nothing above them.
"""

from setlist.workers.kubernetes import SetlistKubernetesWorker
from setlist.workers.process import SetlistProcessWorker

__all__ = ["SetlistKubernetesWorker", "SetlistProcessWorker"]
