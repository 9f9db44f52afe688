"""The ``setlist`` command: argument handling and presentation only.

Every command resolves to one function of the platform packages; errors the platform
raises (``SetlistError``) are printed as one clear line and exit with status 2. One
module per command group, as in ``prefect/cli/``; ``_common`` holds the root app and the
few helpers they share. Commands import their platform modules inside the function, so
``setlist --help`` starts without loading Prefect's server or pyarrow.

The top layer: may import every ``setlist`` package, never ``flows`` (a command that runs
a flow in-process loads it from its entrypoint, as a worker does).
"""

from __future__ import annotations

import os

# The order commands are listed in ``setlist --help``.
# isort: off
from setlist.cli import stack, tenants, jobs, reports, models, billing  # noqa: F401
from setlist.cli import events, security, config, backup  # noqa: F401
from setlist.cli import stream, cluster, monitor, bench  # noqa: F401

# isort: on
from setlist.cli._common import app

__all__ = ["app", "main"]


def main() -> None:  # pragma: no cover - console entry
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    app()
