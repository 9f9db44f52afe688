"""The webhook gateway (``python -m setlist.gateway``): signed webhooks in, Prefect events out.

- ``app.py``: the ASGI app, one request from body to spooled event, and ``serve``;
- ``signatures.py``: GitHub's and Setlist's HMAC signatures, signed and checked;
- ``sources.py``: the webhook source blocks and the tenants, cached, and ``save_source``;
- ``cache.py``: the TTL cache behind them (stale-while-refresh, single flight);
- ``mapping.py``: a payload to a validated event of one tenant, by the source's template;
- ``ratelimit.py``: a token bucket per source;
- ``spool.py`` and ``forwarder.py``: the on-disk spool, and its sender to Prefect.

May import ``core``, ``k8s``, ``dispatch``, ``workers``, ``tenants`` and ``etl``; not
``ml``, ``backup``, ``billing`` or ``security`` (the same layer), nothing above them.
"""
