"""``python -m setlist.controlplane``: the Prefect server (API, UI, services) behind the gate.

The same process ``prefect server start`` runs, with the gate in front; the operator
credential comes from ``PREFECT_SERVER_API_AUTH_STRING``.

Its concurrency leases are kept on disk (under the server's ``PREFECT_HOME``), not in
its memory: every slot of a global concurrency limit is taken with a lease — a tenant's
run quota, a tenant lock — and the database counts the slot while the lease names who
holds it. Leases in memory die with the process: after a restart no holder can renew or
release its slot and the server can't repossess it, so each slot held at that moment is
held for ever (``bench/chaos.py --only server-restart-postgres``: the tenant's next
data-etl runs waited on its lock until stopped). A server whose environment names
another storage (the multi-replica shape: Redis, ``ha``) keeps it.
"""

from __future__ import annotations

import argparse
import os

LEASE_STORAGE_ENV = "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE"
DURABLE_LEASES = "prefect.server.concurrency.lease_storage.filesystem"


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    parser = argparse.ArgumentParser(prog="python -m setlist.controlplane")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=4200)
    parser.add_argument(
        "--no-services", action="store_true", help="API only; services run elsewhere"
    )
    args = parser.parse_args(argv)
    os.environ["PREFECT__SERVER_FINAL"] = "1"
    os.environ.setdefault(LEASE_STORAGE_ENV, DURABLE_LEASES)
    if args.no_services:
        os.environ["PREFECT__SERVER_WEBSERVER_ONLY"] = "1"
    uvicorn.run(
        "setlist.controlplane.server:create_app",
        factory=True,
        host=args.host,
        port=args.port,
        timeout_keep_alive=5,
        ws_ping_interval=20.0,
        ws_ping_timeout=20.0,
        log_level=os.environ.get("PREFECT_SERVER_LOGGING_LEVEL", "warning").lower(),
    )


if __name__ == "__main__":
    main()
