"""What operators see of the platform: metrics, reports, health checks and alerts.

- ``metrics.py``: the Prometheus exporter (``python -m setlist.observability.metrics``);
- ``reports.py``: performance and resource reports over the run history;
- ``health.py``: one check per dependency, with its reason;
- ``automations.py``: the alert automations, kept on the Prefect server by name;
- ``canary.py``: what the canary job proves and reports.

May import every package below it, from ``core`` up to ``ml``, ``backup``, ``billing``,
``security`` and ``gateway``; not ``stack`` or ``cli``.
"""
