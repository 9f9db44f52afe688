"""The platform's foundation: its rules, settings and the services every package uses.

- ``tenancy.py``: the pure domain rules (tenants, bands, tiers, quotas, names);
- ``settings.py``: runtime settings from the environment, and ``REPO_ROOT``;
- ``storage.py``: tenant-scoped object storage over a local directory or S3;
- ``catalog.py``: the deployable job types, from ``deployments/prefect.yaml``;
- ``audit.py``: the audit trail as Prefect events;
- ``tracing.py``: OpenTelemetry export (here so ``tenants`` and ``gateway`` can trace);
- ``reach.py``: a first call that waits out an API briefly away;
- ``process_usage.py``: a run's CPU and memory over its whole process tree.

The bottom layer, under ``job_guard``: imports no other Setlist package (``blocks``
only), so anything may import it.
"""
