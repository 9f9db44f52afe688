"""Webhook gateway benchmark: a burst of signed webhooks → flow runs, against posting the
same events straight to Prefect's events API.

    .venv/bin/python bench/gateway.py [--webhooks 200] [--concurrency 32] [--tenants 8]
                                      [--paced 40] [--rate 2] [--database embedded]

Starts a local Prefect test server, onboards tenants (each gets the data-etl deployment
and its ``setlist.tenant.data.arrived`` trigger), runs the gateway in its own process on
loopback and sends ``X-Setlist-Signature`` signed webhooks round-robin over the tenants:

- a burst of ``--webhooks`` at ``--concurrency`` in flight: sent, accepted,
  accepted_per_s, runs_created, lost (accepted without a run; must be 0), and the burst's
  latency (burst_p50_ms, burst_p95_ms);
- ``--paced`` webhooks at ``--rate`` per second, a rate Prefect's automations keep up
  with: p50_ms, p95_ms.

Latency is webhook sent → flow run created (the run's server-side ``created``), pairing
each tenant's webhooks in send order with its runs in creation order. The baseline sends
the same events, the same way, straight to ``/api/events`` (other tenants):
direct_p50_ms, direct_p95_ms (paced), direct_burst_p95_ms, direct_runs_created,
direct_lost. The last line is one JSON object.

The server runs on a fresh embedded PostgreSQL, the stack's default (``bench/servers.py``);
``--database sqlite`` runs the same on SQLite, where Prefect's own writers collide now
and then, the server answers 503 and its automation retries 2 s later, which is the
tail of both paths there; ``--database postgresql`` on another PostgreSQL server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SECRET = "bench-signing-secret-0123456789"


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 1)


async def _setup(tenants: list[str]) -> None:
    from prefect.client.orchestration import get_client

    from setlist.gateway import sources
    from setlist.tenants.onboarding import TenantSpec, create_tenant

    async with get_client() as client:
        for t in tenants:
            await create_tenant(client, TenantSpec(tenant_id=t))
    from blocks.webhook import SignatureScheme

    # X-Setlist-Signature as before (so runs compare), speaking for the bench's tenants.
    await sources.save_source(
        "bench",
        SECRET,
        scheme=SignatureScheme.setlist,
        allowed_tenants=tenants,
        rate_limit_per_s=100_000,
        burst=100_000,
    )


async def _burst(requests: list[tuple[str, bytes]], concurrency: int, send) -> list[tuple]:
    """Send every (tenant, body) request; → (tenant, sent_at, status)."""
    queue: asyncio.Queue = asyncio.Queue()
    for item in requests:
        queue.put_nowait(item)
    results: list[tuple] = []

    async def worker():
        while not queue.empty():
            tenant, body = queue.get_nowait()
            sent_at = time.time()
            status = await send(tenant, body)
            results.append((tenant, sent_at, status))

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return results


async def _paced(requests: list[tuple[str, bytes]], rate: float, send) -> list[tuple]:
    """One request every 1/rate seconds (each on its own task)."""
    results: list[tuple] = []

    async def one(tenant, body):
        sent_at = time.time()
        results.append((tenant, sent_at, await send(tenant, body)))

    tasks = []
    for tenant, body in requests:
        tasks.append(asyncio.create_task(one(tenant, body)))
        await asyncio.sleep(1 / rate)
    await asyncio.gather(*tasks)
    return results


async def _runs_by_tenant(client, tenants: list[str]) -> dict[str, list[tuple[str, float]]]:
    """(run id, created) of each tenant's runs. Runs are told apart by id: the runs one
    transaction creates share their creation time to the microsecond."""
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

    created: dict[str, list[tuple[str, float]]] = defaultdict(list)
    offset = 0
    while True:
        page = await client.read_flow_runs(
            deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=tenants)),
            limit=200,
            offset=offset,
        )
        for run in page:
            created[run.parameters["tenant_id"]].append((str(run.id), run.created.timestamp()))
        if len(page) < 200:
            return created
        offset += 200


def _ids(runs: dict[str, list[tuple[str, float]]]) -> set[str]:
    return {rid for listed in runs.values() for rid, _ in listed}


def _new_runs(runs: dict[str, list[tuple[str, float]]], before: set[str]) -> dict[str, list[float]]:
    """Creation times, by tenant, of the runs not in ``before``."""
    return {t: [c for rid, c in v if rid not in before] for t, v in runs.items()}


async def _wait_runs(client, tenants: list[str], expected: int, stall: float = 30):
    """Until ``expected`` runs exist, or none came for ``stall`` seconds."""
    seen, last_progress = -1, time.monotonic()
    while True:
        created = await _runs_by_tenant(client, tenants)
        count = sum(map(len, created.values()))
        if count >= expected:
            return created
        if count != seen:
            seen, last_progress = count, time.monotonic()
        elif time.monotonic() - last_progress > stall:
            return created
        await asyncio.sleep(0.5)


def _latencies(sends: list[tuple], created: dict[str, list[float]]) -> list[float]:
    by_tenant: dict[str, list[float]] = defaultdict(list)
    for tenant, sent_at, _ in sends:
        by_tenant[tenant].append(sent_at)
    out = []
    for tenant, sent in by_tenant.items():
        for s, c in zip(sorted(sent), sorted(created.get(tenant, [])), strict=False):
            out.append((c - s) * 1000)
    return out


class _Connections:
    """Keep-alive HTTP/1.1 connections to one server, at most ``size`` open: a lean load
    generator. httpx spends ~3.5 ms of CPU a request here, CPU the gateway and the
    Prefect server under test would lose on a 2-core machine."""

    def __init__(self, url: str, size: int):
        from urllib.parse import urlsplit

        parts = urlsplit(url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.base = parts.path.rstrip("/")
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self.slots = asyncio.Semaphore(size)

    async def post(self, path: str, body: bytes, headers: dict[str, str]) -> int:
        head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        request = (
            f"POST {self.base}{path} HTTP/1.1\r\nhost: {self.host}:{self.port}\r\n"
            f"content-length: {len(body)}\r\n{head}\r\n"
        ).encode() + body
        async with self.slots:
            while self.idle:  # the server closes connections idle for a few seconds
                reader, writer = self.idle.pop()
                writer.write(request)
                status_line = await reader.readline()
                if status_line:
                    return await self._finish(reader, writer, status_line)
                writer.close()
            reader, writer = await asyncio.open_connection(self.host, self.port)
            writer.write(request)
            return await self._finish(reader, writer, await reader.readline())

    async def _finish(self, reader, writer, status_line: bytes) -> int:
        status = int(status_line.split()[1])
        length, keep = 0, True
        while (line := await reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            if name.lower() == "content-length":
                length = int(value)
            elif name.lower() == "connection" and value.strip().lower() == "close":
                keep = False
        await reader.readexactly(length)
        if keep:
            self.idle.append((reader, writer))
        else:
            writer.close()
        return status

    def close(self) -> None:
        for _, writer in self.idle:
            writer.close()


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (Linux /proc)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


async def _settle(pids: list[int], busy: float = 0.15, most_s: float = 120.0) -> float:
    """Wait until the Prefect server is done with what came before (its automations
    work through the burst's events, and their own, long after the runs exist): until
    its CPU use over a second is under ``busy``. → seconds waited. The paced phases
    measure latency at a steady rate, not the tail of the previous phase."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < most_s:
        before = sum(_cpu_s(p) for p in pids)
        await asyncio.sleep(1.0)
        if sum(_cpu_s(p) for p in pids) - before < busy:
            break
    return round(time.monotonic() - t0, 1)


async def _bench(
    args, gateway_url: str, hooks: list[str], direct: list[str], gateway_pid: int
) -> dict:
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    from setlist.gateway.signatures import sign_setlist

    api = PREFECT_API_URL.value()

    def data_body(tenant: str) -> bytes:
        return json.dumps(
            {"tenant_id": tenant, "files": [f"raw/{uuid.uuid4().hex}.jsonl"]}
        ).encode()

    to_gateway = _Connections(gateway_url, args.concurrency)
    to_prefect = _Connections(api, args.concurrency)
    async with get_client() as client:

        async def send_webhook(tenant: str, body: bytes) -> int:
            headers = {
                "content-type": "application/json",
                "x-setlist-signature": sign_setlist(SECRET, body),
                "x-setlist-delivery": uuid.uuid4().hex,
            }
            return await to_gateway.post("/hooks/bench", body, headers)

        async def send_direct(tenant: str, body: bytes) -> int:
            event = {
                "id": str(uuid.uuid4()),
                "occurred": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "event": "setlist.tenant.data.arrived",
                "resource": {
                    "prefect.resource.id": f"setlist.tenant.{tenant}",
                    "setlist.tenant": tenant,
                },
                "payload": json.loads(body),
            }
            body = json.dumps([event]).encode()
            return await to_prefect.post("/events", body, {"content-type": "application/json"})

        # Warm-up: one of each path per tenant (the gateway's source and tenant caches,
        # connections), not counted.
        for hook, other in zip(hooks, direct, strict=True):
            await send_webhook(hook, data_body(hook))
            await send_direct(other, data_body(other))
        await _wait_runs(client, hooks + direct, 2 * len(hooks))
        warm = await _runs_by_tenant(client, hooks + direct)

        def plan(tenants: list[str], n: int) -> list[tuple[str, bytes]]:
            return [
                (tenants[i % len(tenants)], data_body(tenants[i % len(tenants)])) for i in range(n)
            ]

        cpu: dict[str, float] = {}

        async def measure(tenants, sender, ok_codes, n, rate=None, cpu0=None):
            """Send n requests (burst or paced); → sends, seconds, accepted, runs, latencies.
            With ``cpu0`` (gateway, client, server CPU seconds and the time), also records
            each one's CPU seconds over the sending."""
            before = _ids(await _runs_by_tenant(client, tenants)) | _ids(warm)
            t0 = time.time()
            sends = (
                await _paced(plan(tenants, n), rate, sender)
                if rate
                else await _burst(plan(tenants, n), args.concurrency, sender)
            )
            seconds = time.time() - t0
            if cpu0 is not None:
                cpu["gateway_cpu_ms_per_webhook"] = round(
                    (_cpu_s(gateway_pid) - cpu0[0]) * 1000 / max(n, 1), 2
                )
                cpu["client_cpu_ms_per_webhook"] = round(
                    (_cpu_s(os.getpid()) - cpu0[1]) * 1000 / max(n, 1), 2
                )
                cpu["server_cpu_s_in_burst"] = round(
                    sum(_cpu_s(p) for p in server_pids) - cpu0[2], 2
                )
                cpu["burst_s"] = round(time.time() - cpu0[3], 2)
            ok = [x for x in sends if x[2] in ok_codes]
            created = await _wait_runs(client, tenants, len(before) + len(ok))
            new = _new_runs(created, before)
            return sends, seconds, len(ok), sum(map(len, new.values())), _latencies(ok, new)

        # Where the burst's CPU goes: the gateway, this client, the Prefect server.
        server_pids = [p for p in _children(os.getpid()) if p != gateway_pid]
        cpu0 = (
            _cpu_s(gateway_pid),
            _cpu_s(os.getpid()),
            sum(_cpu_s(p) for p in server_pids),
            time.time(),
        )
        sends, seconds, accepted, runs_created, burst_lat = await measure(
            hooks, send_webhook, {202}, args.webhooks, cpu0=cpu0
        )
        _, _, dok, druns, dburst_lat = await measure(direct, send_direct, {200, 204}, args.webhooks)
        settled = [await _settle(server_pids)]
        _, _, paced_ok, paced_runs, latencies = await measure(
            hooks, send_webhook, {202}, args.paced, rate=args.rate
        )
        settled.append(await _settle(server_pids))
        _, _, _, _, dlat = await measure(
            direct, send_direct, {200, 204}, args.paced, rate=args.rate
        )

    to_gateway.close()
    to_prefect.close()
    return {
        "sent": len(sends),
        "accepted": accepted,
        "accepted_per_s": round(accepted / seconds, 1),
        "runs_created": runs_created,
        "lost": accepted - runs_created,
        "p50_ms": _pct(latencies, 0.50),
        "p95_ms": _pct(latencies, 0.95),
        "direct_p50_ms": _pct(dlat, 0.50),
        "direct_p95_ms": _pct(dlat, 0.95),
        "paced_rate_per_s": args.rate,
        "paced_sent": args.paced,
        "paced_lost": paced_ok - paced_runs,
        "burst_p50_ms": _pct(burst_lat, 0.50),
        "burst_p95_ms": _pct(burst_lat, 0.95),
        "direct_burst_p95_ms": _pct(dburst_lat, 0.95),
        "direct_runs_created": druns,
        "direct_lost": dok - druns,
        **cpu,
        "settle_s": settled,
    }


def main() -> None:
    from servers import DATABASES, free_port, prefect_server

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--webhooks", type=int, default=200, help="size of the burst")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--tenants", type=int, default=8)
    parser.add_argument("--paced", type=int, default=40, help="webhooks sent at --rate")
    parser.add_argument("--rate", type=float, default=2.0, help="paced webhooks per second")
    parser.add_argument(
        "--database",
        choices=DATABASES,
        default="embedded",
        help="the Prefect server's database: embedded PostgreSQL (the stack's default), "
        "sqlite, or postgresql (a fresh database at SETLIST_BENCH_PG_URL)",
    )
    args = parser.parse_args()

    home = Path(tempfile.mkdtemp(prefix="setlist-bench-gw-"))
    os.environ["SETLIST_HOME"] = str(home)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    import anyio

    from setlist import stack

    run_id = uuid.uuid4().hex[:4]
    hooks = [f"bench-hook-{run_id}-{i}" for i in range(args.tenants)]
    direct = [f"bench-direct-{run_id}-{i}" for i in range(args.tenants)]
    with prefect_server(args.database) as api:
        anyio.run(stack.bootstrap_platform, home / "storage")
        anyio.run(_setup, hooks + direct)
        port = free_port()
        env = {**os.environ, "PREFECT_API_URL": api, "SETLIST_HOME": str(home)}
        gw = subprocess.Popen(
            [
                sys.executable,
                "-c",
                f"from setlist.gateway.app import serve; serve(port={port})",
            ],
            env=env,
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=open(home / "gateway.log", "wb"),  # noqa: SIM115
        )
        try:
            import httpx

            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 60
            while True:
                try:
                    if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline or gw.poll() is not None:
                    raise SystemExit(f"gateway did not start; see {home / 'gateway.log'}")
                time.sleep(0.2)
            result = anyio.run(_bench, args, url, hooks, direct, gw.pid)
        finally:
            gw.terminate()
            gw.wait(timeout=15)
    print(f"gateway log: {home / 'gateway.log'}", file=sys.stderr)
    print(json.dumps({"database": args.database, **result}))


if __name__ == "__main__":
    main()
