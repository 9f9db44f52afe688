"""Setlist: a multi-tenant job platform on Prefect 3 and Kubernetes.

One sub-package per domain, imports running one way (cli → stack → observability → the job
domains → etl → tenants → workers → dispatch → k8s → core); the layers are an
import-linter contract in pyproject.toml. The flows in ``flows/`` run on top of it.
"""
