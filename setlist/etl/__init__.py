"""A tenant's listening events: raw files in, a curated table out.

- ``raw_stream.py``: the event schema, rejects, and a raw file's lines in bounded memory;
- ``raw_events.py``: raw files to valid rows or rejects;
- ``curated.py``: the curated events table, Parquet per date, published by manifest;
- ``load.py``: the incremental load behind the ``data-etl`` flow;
- ``demo.py``: sample events for the demo tenant.

May import ``core``, ``k8s``, ``dispatch``, ``workers`` and ``tenants``; nothing above
them (``security`` reads the curated table, which is why ``etl`` sits below it).
"""
