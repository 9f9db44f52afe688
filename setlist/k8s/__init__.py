"""Kubernetes as Setlist renders and applies it.

- ``templates.py``: the base job templates, their variables, the per-run namespace rule;
- ``tenant_kit.py``: a tenant's namespace kit (quota, limits, policies, accounts, queues);
- ``client.py``: the one Kubernetes API client (in-cluster, else kubeconfig).

May import ``core``; nothing above it.
"""
