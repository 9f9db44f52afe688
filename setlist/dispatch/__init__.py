"""Who runs when: tenant queues and limits, the dispatcher that grants runs, and the grant.

- ``queues.py``: the pools, one queue per (tenant, band), the tenant's concurrency limit;
- ``locks.py``: ``tenant_lock``, one holder at a time per (tenant, dataset);
- ``status.py``: ``queue_status``, waiting and busy runs and fair-share standing;
- ``plan.py``: ``plan_grants``, the whole fairness policy as one pure function;
- ``state.py``: the dispatcher's view of the API (queues, runs, tenant terms);
- ``leadership.py``: one leading replica, and whether any leads (``dispatcher_active``);
- ``dispatcher.py``: the control loop (``python -m setlist.dispatch``);
- ``grants.py``: the grant tags, and the gate Setlist's workers apply;
- ``_api.py``: raw Prefect API calls the dispatcher's modules share.

May import ``core`` and ``k8s``; nothing above them.
"""
