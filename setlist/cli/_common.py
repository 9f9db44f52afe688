"""What every command group shares: the root app, the API it talks to, and the wrapper
that turns a platform error into one red line and exit status 2."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import sys
from collections.abc import Callable, Coroutine
from typing import Annotated, Any

import typer
from rich.console import Console

from setlist.core.settings import get_settings
from setlist.core.tenancy import SetlistError

app = typer.Typer(help="Setlist: multi-tenant jobs on Prefect.", no_args_is_help=True)

console = Console(width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True)

TenantOpt = Annotated[str, typer.Option("--tenant", "-t", help="tenant id (env TENANT_ID)")]


def _api_url() -> str:
    """The API to talk to: PREFECT_API_URL if set, else the local stack's."""
    from prefect.settings import PREFECT_API_URL

    from setlist.stack import StackState, api_url

    configured = PREFECT_API_URL.value()
    if configured:
        return configured
    state = StackState.load(get_settings())
    return state.api_url if state else api_url()


def _run(coro_fn: Callable[..., Coroutine[Any, Any, Any]]) -> Callable[..., Any]:
    """Run an async command against the API, turning platform errors into exit code 2."""

    @functools.wraps(coro_fn)
    def wrapper(*args, **kwargs):
        from prefect.settings import temporary_settings

        from setlist.core.credentials import client_settings
        from setlist.stack import healthy

        url = _api_url()
        if not healthy(url):
            err.print(f"[red]error:[/] Prefect API at {url} is not reachable; start it: make up")
            raise typer.Exit(2)
        try:
            with temporary_settings(updates=client_settings(url)):
                return asyncio.run(coro_fn(*args, **kwargs))
        except SetlistError as exc:
            err.print(f"[red]error:[/] {exc}")
            raise typer.Exit(2) from None

    return wrapper


@contextlib.asynccontextmanager
async def _client():
    from prefect.client.orchestration import get_client

    async with get_client() as c:
        yield c


def _echo(msg: str) -> None:
    console.print(msg, highlight=False)


def _flow(entrypoint: str):
    """A flow of ``flows/`` to run in-process, loaded from its entrypoint (never imported:
    the platform does not depend on the code that runs on it)."""
    from setlist.core.catalog import load_flow

    return load_flow(entrypoint)
