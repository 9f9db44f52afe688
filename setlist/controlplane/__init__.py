"""The control plane's enforcement point: Prefect's server behind Setlist's own gate.

Open-source Prefect has one credential for everything. Setlist runs Prefect's app
inside an ASGI gate (``gate``) that admits two kinds of callers: the operator
credential, passed through untouched, and a tenant job's run token
(``setlist.core.runtokens``), which may do only what a flow run of its tenant needs
(``policy``). ``server`` builds the app and ``python -m setlist.controlplane`` serves it;
``postgres`` runs the local stack's embedded PostgreSQL, its default database,
``ha`` holds Prefect's multi-replica shape (replicas without services, one services
process, Redis, the migration step), ``local`` a gated server, or that shape, for
tests and benchmarks, and ``balancer`` one address in front of the local replicas.

Imports: ``setlist.core`` and ``setlist.dispatch`` (grant tag names) only.
"""
