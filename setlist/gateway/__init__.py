"""The webhook gateway (``python -m setlist.gateway``): signed webhooks in, Prefect events
(or a tenant's stream events) out.

- ``app.py``: the ASGI app, one request from body to spooled event, and ``serve``;
- ``signatures.py``: Standard Webhooks', Setlist's and GitHub's HMAC signatures;
- ``sources.py``: the webhook source blocks and the tenants, cached; ``save_source`` and
  ``allow_tenants``;
- ``cache.py``: the bounded TTL cache behind them (stale-while-refresh, single flight);
- ``mapping.py``: strict JSON, and a payload to a validated event of one tenant, by the
  source's typed mapping (values, never template text);
- ``dedupe.py``: which deliveries are the same one, from what was signed;
- ``ratelimit.py``: a token bucket per (source, tenant), bounded;
- ``spool.py`` and ``forwarder.py``: the on-disk spool, and its sender to Prefect;
- ``streaming.py``: a ``deliver=stream`` source's events into the tenant's broker stream.

May import ``core``, ``brokers``, ``k8s``, ``dispatch``, ``workers``, ``tenants``, ``etl``
and ``stream``; not ``ml``, ``backup``, ``billing`` or ``security`` (the same layer),
nothing above them.
"""
