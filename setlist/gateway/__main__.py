"""``python -m setlist.gateway --port 8787``: the webhook gateway (how `setlist up` runs it)."""

import argparse

from setlist.gateway.app import serve

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Setlist webhook gateway")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8787)
    cli_args = parser.parse_args()
    serve(cli_args.host, cli_args.port)
