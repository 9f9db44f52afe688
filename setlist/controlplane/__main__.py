"""``python -m setlist.controlplane``: the Prefect server (API, UI, services) behind the gate.

The same process ``prefect server start`` runs, with the gate in front; the operator
credential comes from ``PREFECT_SERVER_API_AUTH_STRING``.
"""

from __future__ import annotations

import argparse
import os


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
