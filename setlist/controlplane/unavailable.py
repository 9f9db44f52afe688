"""Which failed calls are the database being away (a restart, a failover), so that the
control plane answers them 503 — retried by every Prefect client with back-off — and
never 500, which none retries."""

from __future__ import annotations


def _leaves(exc: BaseException) -> list[BaseException]:
    """``exc``'s own exceptions: those it groups (Starlette's middleware wraps what an
    endpoint raises in an ``ExceptionGroup``), each with the chain it was raised from."""
    out, todo, seen = [], [exc], set()
    while todo:
        e = todo.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, BaseExceptionGroup):
            todo.extend(e.exceptions)
        else:
            out.append(e)
        if e.__cause__ is not None:
            todo.append(e.__cause__)
    return out


def database_unreachable(exc: BaseException) -> BaseException | None:
    """What makes ``exc`` a call that failed because the database can't be reached
    now (a refused or dropped connection, a database starting or stopping), if it is
    one: a call the client may make again.

    Prefect's server answers those 503, which its clients retry with back-off, only
    when the driver's error arrives alone; a refused connection arrives as a bare
    ``ConnectionRefusedError``, often inside Starlette's ``ExceptionGroup``, and was
    answered 500, which no client retries: in a PostgreSQL restart a job's last state,
    or the worker's report of a job that never started, was lost for good
    (``bench/chaos.py --only postgres-restart``: runs left Submitting or Running)."""
    from prefect.server.api.server import is_client_retryable_exception

    for e in _leaves(exc):
        if isinstance(e, ConnectionError) or (
            isinstance(e, Exception) and is_client_retryable_exception(e)
        ):
            return e
    return None
