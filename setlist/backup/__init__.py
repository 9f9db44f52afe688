"""Backups: tenants' data, and the platform's configuration.

- ``snapshots.py``: snapshot, verify and prune a tenant's data;
- ``restores.py``: restore and migrate it, resumable batch by batch;
- ``graph.py``: those steps as Prefect tasks with retries;
- ``repository.py``: the encrypted, content-addressed repository of a tenant;
- ``platform.py``: where backups live, their keys, and the platform's backup;
- ``operations.py``: the steps the backup flows share (locks, prune, artifacts);
- ``results.py``: what the backup flows take and return;
- ``config/``: the platform's configuration as one archive.

May import ``core``, ``k8s``, ``dispatch``, ``workers``, ``tenants`` and ``etl``; not
``ml``, ``billing``, ``security`` or ``gateway`` (the same layer), nothing above them.
"""
