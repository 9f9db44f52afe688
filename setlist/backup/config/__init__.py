"""Back up and restore the platform's configuration (what lives in the Prefect server) as
one archive; the tenants' data is ``setlist.backup``'s other business.

- ``entries.py``: the archive's format, one model per kind of object, and the errors;
- ``export.py``: ``read_snapshot`` and ``export_config``, the server to an archive;
- ``archive.py``: the ``.tar.gz`` written and checked (``build_archive``, ``load_archive``);
- ``secrets.py``: secret values found in block data, and their encryption;
- ``importer.py``: ``import_archive`` and ``import_config``, an archive to a server;
- ``api.py``: the raw Prefect API calls export and import share.

May import ``core``, ``k8s``, ``dispatch``, ``workers``, ``tenants`` and ``etl``; not
``ml``, ``billing``, ``security`` or ``gateway`` (the same layer), nothing above them.
"""
