"""Object-store faults through a fault proxy, and a scratch disk that fills up.

- ``store-faults``: a fault proxy between boto3 and moto answers a random share of the
  tenant's object-store requests with 503 ``SlowDown``, 500 ``InternalError``, a reset
  connection or a slow response. The load must end either Completed with the curated
  table a clean load gives (every partition's bytes) or Failed with its reason and the
  table as it was; then, faults over, the next run (the retry or the next trigger) gives
  the clean table.
- ``scratch-full``: the load's scratch directory (``SETLIST_SCRATCH``) is a tmpfs too
  small for the new files. The run fails with a reason that says so, the published table
  is the previous one, byte for byte; with room again, the next run loads the files.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import random
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from bench.faults import Context, onboard, reference_table, run_etl, running, table_state

FAULTS = ("slowdown", "internal", "reset", "slow")


class FaultProxy(ThreadingHTTPServer):
    """An HTTP proxy in front of one upstream (moto) that answers a share of requests
    with a fault instead of forwarding them. ``rate`` 0 forwards everything."""

    daemon_threads = True

    def __init__(self, upstream: str, seed: int):
        super().__init__(("127.0.0.1", 0), _ProxyHandler)
        host, _, port = upstream.removeprefix("http://").partition(":")
        self.upstream = (host, int(port))
        self.rate = 0.0
        self.random = random.Random(seed)
        self.lock = threading.Lock()
        self.injected = dict.fromkeys(FAULTS, 0)
        self.forwarded = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def pick(self) -> str | None:
        with self.lock:
            if self.random.random() >= self.rate:
                self.forwarded += 1
                return None
            fault = self.random.choice(FAULTS)
            self.injected[fault] += 1
            return fault


class _ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass

    def _error(self, status: int, code: str) -> None:
        body = (
            f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
            f"<Message>injected {code}</Message></Error>"
        ).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _forward(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            body = self._read_chunked()
        conn = http.client.HTTPConnection(*self.server.upstream, timeout=60)
        headers = {k: v for k, v in self.headers.items() if k.lower() != "transfer-encoding"}
        if body is not None:
            headers["Content-Length"] = str(len(body))
        conn.request(self.command, self.path, body=body, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        self.send_response(resp.status, resp.reason)
        for k, v in resp.getheaders():
            if k.lower() not in ("transfer-encoding", "content-length", "connection"):
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
        conn.close()

    def _read_chunked(self) -> bytes:
        out = b""
        while True:
            size = int(self.rfile.readline().split(b";")[0], 16)
            if size == 0:
                self.rfile.readline()
                return out
            out += self.rfile.read(size)
            self.rfile.readline()

    def _handle(self) -> None:
        fault = self.server.pick()
        if fault == "reset":
            # drop the connection mid-exchange: the client sees a reset / no response
            self.connection.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
            )
            self.close_connection = True
            self.connection.close()
            return
        if fault == "slowdown":
            self._drain()
            return self._error(503, "SlowDown")
        if fault == "internal":
            self._drain()
            return self._error(500, "InternalError")
        if fault == "slow":
            time.sleep(self.server.random.uniform(0.2, 1.0))
        self._forward()

    def _drain(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        elif self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            self._read_chunked()

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle


async def store_faults(ctx: Context, args, rng: random.Random) -> dict:
    from setlist.etl.demo import write_sample_data

    tenant = f"chaos-s3-{uuid.uuid4().hex[:6]}"
    expected = reference_table(tenant, args.events, args.files, args.seed)
    with running(FaultProxy(ctx.s3, rng.randrange(2**31))) as proxy:
        storage = await onboard(ctx.client, tenant, proxy.url)
        write_sample_data(storage, events=args.events, files=args.files, defect_share=0.01,
                          seed=args.seed)  # fmt: skip
        before = table_state(storage)
        proxy.rate = args.fault_rate
        faulted = await run_etl(tenant)
        proxy.rate = 0.0
        after_fault = table_state(storage)
        runs = [faulted]
        if faulted.is_completed():
            recovered = after_fault
        else:
            runs.append(await run_etl(tenant))  # the retry, faults over
            recovered = table_state(storage)
        injected = dict(proxy.injected)
    ok_fault = after_fault == before or after_fault == expected  # old table or the clean one
    survived = ok_fault and runs[-1].is_completed() and recovered == expected
    return {
        "name": "store-faults",
        "injected": injected,
        "fault_rate": args.fault_rate,
        "faulted_run": faulted.name,
        "faulted_reason": None if faulted.is_completed() else (faulted.message or "")[:300],
        "table_after_fault": "clean" if after_fault == expected else
        "previous" if after_fault == before else "MIXED",
        "runs": len(runs),
        "rows": recovered["rows"],
        "expected_rows": expected["rows"],
        "corrupt_partitions": recovered["corrupt"],
        "lost_runs": 0 if runs[-1].is_completed() else 1,
        "lost_or_duplicate_rows": abs(recovered["rows"] - expected["rows"]),
        "survived": survived,
    }  # fmt: skip


@contextlib.contextmanager
def tmpfs(size: str):
    path = Path(tempfile.mkdtemp(prefix="setlist-chaos-scratch-"))
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                   check=True)  # fmt: skip
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=False)
        path.rmdir()


async def scratch_full(ctx: Context, args, rng: random.Random) -> dict:
    from setlist.etl.demo import write_sample_data

    tenant = f"chaos-scratch-{uuid.uuid4().hex[:6]}"
    storage = await onboard(ctx.client, tenant, ctx.s3)
    write_sample_data(storage, events=args.events // 4, files=1, seed=args.seed, prefix="raw/a")
    first = await run_etl(tenant)
    previous = table_state(storage)
    # new files whose staging cannot fit: the scratch tmpfs gets a random small size
    write_sample_data(storage, events=args.events, files=args.files, seed=args.seed + 1,
                      prefix="raw/b")  # fmt: skip
    size_kib = rng.randrange(64, 512)
    with tmpfs(f"{size_kib}k") as scratch:
        os.environ["SETLIST_SCRATCH"] = str(scratch)
        try:
            full = await run_etl(tenant)
        finally:
            del os.environ["SETLIST_SCRATCH"]
    during = table_state(storage)
    retry = await run_etl(tenant)  # with room again: the next run loads the files
    final = table_state(storage)
    reason = (full.message or "")[:300]
    clear = "scratch" in reason.lower() and "no space" in reason.lower()
    survived = (
        first.is_completed()
        and not full.is_completed()
        and clear
        and during == previous
        and retry.is_completed()
        and final["rows"] > previous["rows"]
        and not final["corrupt"]
    )
    return {
        "name": "scratch-full",
        "scratch_kib": size_kib,
        "failed_run": full.name,
        "reason": reason,
        "table_during_failure": "previous" if during == previous else "CHANGED",
        "rows_before": previous["rows"],
        "rows_after_retry": final["rows"],
        "lost_runs": 0 if retry.is_completed() else 1,
        "lost_or_duplicate_rows": 0,
        "survived": survived,
    }
