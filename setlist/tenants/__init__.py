"""Tenants and their jobs through the Prefect API.

- ``onboarding.py``: create, update and offboard a tenant (profile, limit, queues,
  deployments, Kubernetes kit);
- ``runtime.py``: what every flow does first (prove its tenant, get its handles);
- ``submit.py``: submit, list, follow and cancel jobs.

May import ``core``, ``k8s``, ``dispatch`` and ``workers``; nothing above them.
"""
