"""Alerts routed by severity: each to its own block, delivered by the server's own
automation services to real sinks standing in for PagerDuty and Slack (HTTP) and the
digest's mailbox (SMTP)."""

from __future__ import annotations

import asyncio
import contextlib
import email
import json
import socket
import threading
import time
import uuid
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from prefect.exceptions import ObjectNotFound

from setlist.core.tenancy import Priority
from setlist.observability import automations
from setlist.observability.automations import (
    ALERT_BLOCK,
    ALERT_TAG,
    ROUTES_VARIABLE,
    Routes,
    Severity,
    alert_automations,
)

CRITICAL, WARNING, DIGEST = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()


def _block_of(auto) -> uuid.UUID:
    (action,) = auto.actions
    return action.block_document_id


def _severity(auto) -> Severity:
    (tag,) = [t for t in auto.tags if t.startswith("setlist:severity:")]
    return Severity(tag.removeprefix("setlist:severity:"))


def test_each_alert_has_one_severity_and_goes_to_its_block():
    by_name = {a.name: a for a in alert_automations(CRITICAL, WARNING)}
    critical = {
        "setlist: run crashed",
        "setlist: critical run pending over SLA",
        "setlist: high run pending over SLA",
        "setlist: critical security finding",
    }
    warning = {
        "setlist: run failed",
        "setlist: normal run pending over SLA",
        "setlist: low run pending over SLA",
        "setlist: batch run pending over SLA",
    }
    assert set(by_name) == critical | warning
    for name in critical:
        assert _severity(by_name[name]) == Severity.critical
        assert _block_of(by_name[name]) == CRITICAL
    for name in warning:
        assert _severity(by_name[name]) == Severity.warning
        assert _block_of(by_name[name]) == WARNING
    assert all(ALERT_TAG in a.tags for a in by_name.values())
    assert by_name["setlist: run crashed"].trigger.expect == {"prefect.flow-run.Crashed"}
    assert by_name["setlist: run failed"].trigger.expect == {"prefect.flow-run.Failed"}
    assert by_name["setlist: run crashed"].actions[0].subject.startswith("[critical] ")


def test_the_digest_counts_each_alert_and_lists_each_warning_once():
    from datetime import timedelta

    from setlist.observability.digest import Fired, render

    since = datetime(2026, 12, 5, 9, tzinfo=UTC)
    fired = [
        Fired(since + timedelta(minutes=1), "setlist: run failed", "data-etl-acme-20261205-090100"),
        Fired(since + timedelta(minutes=2), "setlist: normal run pending over SLA", "ml-x"),
        Fired(since + timedelta(minutes=3), "setlist: run failed", "billing-report-b-20261205"),
    ]
    subject, body = render(fired, since, since + timedelta(hours=1))
    assert subject == "[warning] Setlist digest: 3 warnings, 2026-12-05 09:00–10:00 UTC"
    lines = body.splitlines()
    assert lines[2] == "run failed (2)" and "normal run pending over SLA (1)" in lines
    assert "  09:01:00  data-etl-acme-20261205-090100" in lines
    assert sum("billing-report-b-20261205" in line for line in lines) == 1


def test_no_alert_automation_is_a_digest_copy():
    autos = alert_automations(CRITICAL, WARNING)
    assert not [a for a in autos if "digest" in a.name or "setlist:digest" in a.tags]


def test_one_block_for_everything_still_works():
    assert {_block_of(a) for a in alert_automations(CRITICAL)} == {CRITICAL}
    assert Routes.of() == Routes(ALERT_BLOCK, ALERT_BLOCK, None)
    assert Routes.of("ops") == Routes("ops", "ops", None)
    assert Routes.of(critical="pd") == Routes("pd", ALERT_BLOCK, None)
    assert Routes.of("ops", warning="slack", digest="mail") == Routes("ops", "slack", "mail")


def test_a_short_sla_is_kept_to_the_second():
    from datetime import timedelta

    (auto,) = alert_automations(CRITICAL, sla={Priority.high: timedelta(seconds=30)})[2:3]
    assert auto.name == "setlist: high run pending over SLA"
    assert auto.trigger.within == timedelta(seconds=30)
    assert "0.5 min" in auto.description


# --------------------------------------------------------------------------- server


class _Sink:
    """An HTTP endpoint in a thread that keeps every request body, by path."""

    def __init__(self) -> None:
        received: list[tuple[str, str]] = []
        self.received = received

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                length = int(self.headers.get("Content-Length") or 0)
                received.append((self.path, self.rfile.read(length).decode()))
                self.send_response(202)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def at(self, path: str) -> list[str]:
        return [body for p, body in list(self.received) if p == path]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def sink():
    s = _Sink()
    yield s
    s.close()


class _Mailbox:
    """An SMTP server in a thread (aiosmtpd) that keeps every message it accepts, with
    its envelope; logins are checked against one user."""

    USER, PASSWORD = "alerts", "s3cret-smtp-password"

    def __init__(self) -> None:
        from aiosmtpd.controller import Controller
        from aiosmtpd.smtp import AuthResult

        messages: list[tuple[list[str], email.message.Message]] = []
        self.messages = messages

        class Handler:
            async def handle_DATA(self, server, session, envelope):  # noqa: N802
                parsed = email.message_from_bytes(envelope.original_content)
                messages.append((list(envelope.rcpt_tos), parsed))
                return "250 OK"

        def authenticate(server, session, envelope, mechanism, auth_data):
            ok = (
                auth_data.login.decode() == self.USER
                and auth_data.password.decode() == self.PASSWORD
            )
            return AuthResult(success=ok, handled=False)

        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.controller = Controller(
            Handler(),
            hostname="127.0.0.1",
            port=self.port,
            authenticator=authenticate,
            auth_require_tls=False,
        )
        self.controller.start()

    def with_subject(self, needle: str) -> list[tuple[list[str], email.message.Message]]:
        return [(rcpt, m) for rcpt, m in list(self.messages) if needle in m["Subject"]]

    def close(self) -> None:
        self.controller.stop()


@pytest.fixture
def mailbox():
    box = _Mailbox()
    yield box
    box.close()


def _email_block(mailbox: _Mailbox, **fields):
    from blocks.smtp_email import SmtpEmail

    return SmtpEmail(
        smtp_server="127.0.0.1",
        smtp_port=mailbox.port,
        security="none",
        **{"from_address": "setlist@example.com", "to_addresses": ["ops@example.com"], **fields},
    )


async def test_an_email_block_delivers_one_message_to_its_recipients_only(mailbox):
    block = _email_block(
        mailbox,
        to_addresses=["ops@example.com", "oncall@example.com"],
        username=_Mailbox.USER,
        password=_Mailbox.PASSWORD,
    )
    # A run name is not header text: a line break in it must not add a recipient.
    await block.notify("Flow run x is Failed.", "[warning] run\r\nBcc: thief@evil.example")
    ((rcpt, message),) = mailbox.messages
    assert sorted(rcpt) == ["oncall@example.com", "ops@example.com"]
    assert message["Subject"] == "[warning] run Bcc: thief@evil.example"
    assert message["Bcc"] is None and message["From"] == "setlist@example.com"
    assert message.get_payload().strip() == "Flow run x is Failed."
    assert _Mailbox.PASSWORD not in str(block.model_dump())


async def test_a_refused_login_fails_with_the_reason_and_never_the_password(mailbox):
    from prefect.blocks.abstract import NotificationError

    block = _email_block(mailbox, username=_Mailbox.USER, password="wrong-" + _Mailbox.PASSWORD)
    with pytest.raises(NotificationError) as failed:
        await block.notify("body", "subject")
    assert "SMTPAuthenticationError" in failed.value.log
    assert _Mailbox.PASSWORD not in failed.value.log and "wrong-" not in failed.value.log
    assert mailbox.messages == []


@pytest.mark.parametrize(
    "fields",
    [
        {"to_addresses": ["ops@example.com\nBcc: thief@evil.example"]},
        {"to_addresses": ["Ops <ops@example.com>"]},
        {"to_addresses": []},
        {"from_address": "not-an-address"},
        {"smtp_server": "relay.example.com\r\nRCPT TO:<x@y>"},
        {"smtp_port": 0},
    ],
)
async def test_a_malformed_email_block_is_refused_before_it_is_saved(fields):
    from setlist.core.tenancy import SetlistError

    args = {
        "smtp_server": "relay.example.com",
        "to": ["ops@example.com"],
        "sender": "setlist@example.com",
    }
    renamed = {"to_addresses": "to", "from_address": "sender", "smtp_port": "port"}
    args.update({renamed.get(k, k): v for k, v in fields.items()})
    with pytest.raises(SetlistError, match="e-mail block refused"):
        await automations.save_email_block("test-never-saved", **args)


async def _until(check, seconds: float = 90) -> bool:
    delay, deadline = 0.25, time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(delay)
        delay = min(delay * 2, 3)
    return True


async def _until_async(check, seconds: float = 90) -> bool:
    delay, deadline = 0.25, time.monotonic() + seconds
    while not await check():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(delay)
        delay = min(delay * 2, 3)
    return True


async def _clean(client) -> None:
    for auto in await automations.tagged_automations(client):
        if ALERT_TAG in auto.tags:
            await client.delete_automation(auto.id)
    from setlist.observability.digest import UNTIL_VARIABLE

    for variable in (ROUTES_VARIABLE, UNTIL_VARIABLE):
        with contextlib.suppress(ObjectNotFound):
            await client.delete_variable_by_name(variable)


async def _save_blocks(sink: _Sink, mailbox: _Mailbox, suffix: str) -> dict[str, str]:
    from prefect.blocks.notifications import SlackWebhook

    names = {k: f"test-{k}-{suffix}" for k in ("pagerduty", "slack", "digest")}
    await automations.save_pagerduty_block(
        names["pagerduty"], "routing-key-1", url=f"{sink.url}/pagerduty"
    )
    # Not a hooks.slack.com URL, so Prefect's Slack block hands it to apprise as it is:
    # apprise's JSON notifier posts to the sink.
    port = sink.url.rsplit(":", 1)[1]
    await SlackWebhook(url=f"json://127.0.0.1:{port}/slack").asave(names["slack"], overwrite=True)
    await automations.save_email_block(
        names["digest"],
        smtp_server="127.0.0.1",
        port=mailbox.port,
        security="none",
        username=_Mailbox.USER,
        password=_Mailbox.PASSWORD,
        sender="setlist@example.com",
        to=["digest@example.com"],
    )
    return names


@pytest.mark.server
async def test_critical_and_warning_alerts_reach_only_their_own_sinks(client, sink, mailbox):
    from datetime import timedelta

    from prefect import flow
    from prefect.states import Crashed, Failed

    from setlist.observability import digest

    names = await _save_blocks(sink, mailbox, uuid.uuid4().hex[:6])
    tenant = f"routing-{uuid.uuid4().hex[:6]}"
    start = datetime.now(UTC) - timedelta(seconds=1)
    await digest._store_until(client, start)
    try:
        await automations.apply(
            client,
            critical=names["pagerduty"],
            warning=names["slack"],
            digest=names["digest"],
        )
        await asyncio.sleep(3)  # the triggers service loads new automations

        @flow(name="alert-routing-probe")
        def probe() -> None:
            pass

        crashed = await client.create_flow_run(probe, name=f"crash-{tenant}", tags=["setlist"])
        failed = await client.create_flow_run(probe, name=f"fail-{tenant}", tags=["setlist"])
        await client.set_flow_run_state(crashed.id, Crashed(message="node lost"), force=True)
        await client.set_flow_run_state(failed.id, Failed(message="bad input"), force=True)
        finding = {
            "id": str(uuid.uuid4()),
            "occurred": datetime.now(UTC).isoformat(),
            "event": "setlist.security.finding",
            "resource": {
                "prefect.resource.id": f"setlist.tenant.{tenant}",
                "setlist.tenant": tenant,
                "setlist.severity": "critical",
            },
            "payload": {"check": "public-bucket"},
        }
        (await client.request("POST", "/events", json=[finding])).raise_for_status()

        def got(path: str, needle: str) -> bool:
            return any(needle in body for body in sink.at(path))

        expected = [
            ("/pagerduty", f"crash-{tenant}"),
            ("/pagerduty", f"finding for {tenant}"),
            ("/slack", f"fail-{tenant}"),
        ]

        assert await _until(lambda: all(got(*e) for e in expected)), sink.received
        await asyncio.sleep(2)  # room for a stray copy to land
        assert not got("/pagerduty", f"fail-{tenant}")
        assert not got("/slack", f"crash-{tenant}") and not got("/slack", "finding")
        assert mailbox.messages == []  # the digest waits for its period

        # The period's digest: one e-mail, the warning in it, nothing critical; the
        # next period starts where this one ended, so nothing is sent twice.
        now = datetime.now(UTC) + digest.SETTLE

        async def warned() -> bool:
            fired = await digest.collect(client, start, now - digest.SETTLE)
            return any(f"fail-{tenant}" == f.subject for f in fired)

        assert await _until_async(warned)
        done = await digest.send_due(client, now=now)
        assert done.sent_to == names["digest"] and done.since == start
        ((rcpt, mail),) = mailbox.messages
        assert rcpt == ["digest@example.com"]
        assert mail["Subject"].startswith("[warning] Setlist digest: ")
        body = mail.get_payload()
        assert f"fail-{tenant}" in body and "run failed (" in body
        assert f"crash-{tenant}" not in body and "finding" not in body
        again = await digest.send_due(client, now=now + timedelta(seconds=1))
        assert again.since == now - digest.SETTLE and again.sent_to is None
        assert len(mailbox.messages) == 1

        (page,) = [json.loads(b) for b in sink.at("/pagerduty") if f"crash-{tenant}" in b]
        assert page["routing_key"] == "routing-key-1" and page["event_action"] == "trigger"
        assert page["payload"]["severity"] == "critical"
        assert page["payload"]["summary"].startswith("[critical] Setlist: crash-")
        (slack,) = [json.loads(b) for b in sink.at("/slack") if f"fail-{tenant}" in b]
        assert slack["title"].startswith("[warning] Setlist: fail-")
    finally:
        await _clean(client)


@pytest.mark.server
async def test_reapplying_updates_in_place_drops_what_is_no_longer_routed_and_falls_back(
    client, sink, mailbox
):
    from setlist.core.tenancy import SetlistError
    from setlist.observability import digest

    names = await _save_blocks(sink, mailbox, uuid.uuid4().hex[:6])
    existed = True
    try:
        await automations.notification_block_id(client, ALERT_BLOCK)
    except SetlistError:
        existed = False
        await automations.save_notification_block(ALERT_BLOCK, webhook_url=f"{sink.url}/all")
    try:
        first = await automations.apply(
            client, critical=names["pagerduty"], warning=names["slack"], digest=names["digest"]
        )
        assert len(first) == 8  # the digest reads what the warnings fired: no copies
        ids = {}
        for auto in await automations.tagged_automations(client):
            if ALERT_TAG in auto.tags:
                ids[auto.name] = auto.id
        assert len(ids) == 8

        again = await automations.apply(
            client, critical=names["pagerduty"], warning=names["slack"], digest=names["digest"]
        )
        assert {what for _, what in again} == {"updated"}
        # A bare apply, as `setlist up` makes, keeps the routing the operator chose.
        bare = await automations.apply(client)
        assert {what for _, what in bare} == {"updated"}
        same = {a.name: a.id for a in await automations.tagged_automations(client)}
        assert same == ids

        # An alert automation of an earlier release (the digest's per-warning copies)
        # goes; no digest and no warning block any more: warnings fall back to
        # setlist-alerts.
        (old,) = [a for a in alert_automations(WARNING) if a.name == "setlist: run failed"]
        await client.create_automation(old.model_copy(update={"name": f"{old.name} (digest)"}))
        narrowed = await automations.apply(client, critical=names["pagerduty"])
        assert [n for n, what in narrowed if what == "deleted"] == ["setlist: run failed (digest)"]
        fallback = await automations.notification_block_id(client, ALERT_BLOCK)
        pagerduty = await automations.notification_block_id(client, names["pagerduty"])
        (failed,) = await client.read_automations_by_name("setlist: run failed")
        (crashed,) = await client.read_automations_by_name("setlist: run crashed")
        assert _block_of(failed) == fallback and _block_of(crashed) == pagerduty
        assert failed.id == ids["setlist: run failed"]  # updated, not recreated
        stored = await automations.stored_routes(client)
        assert stored == Routes(names["pagerduty"], ALERT_BLOCK, None)
        assert await digest.send_due(client) is None  # no digest route: nothing to send
    finally:
        await _clean(client)
        if not existed:
            await client.delete_block_document(
                await automations.notification_block_id(client, ALERT_BLOCK)
            )


@pytest.mark.server
def test_the_cli_makes_the_blocks_and_applies_the_routes(
    prefect_server, sink, mailbox, monkeypatch
):
    import anyio
    from prefect.client.orchestration import get_client
    from typer.testing import CliRunner

    from setlist.cli import app

    suffix = uuid.uuid4().hex[:6]
    result = CliRunner().invoke(
        app,
        [
            "automations",
            "apply",
            "--critical-block",
            f"test-pd-{suffix}",
            "--pagerduty-key",
            "rk",
            "--pagerduty-url",
            f"{sink.url}/pagerduty",
            "--warning-block",
            f"test-slack-{suffix}",
            "--warning-slack-url",
            f"json://127.0.0.1:{sink.url.rsplit(':', 1)[1]}/slack",
            "--digest-block",
            f"test-mail-{suffix}",
            "--digest-email-to",
            "ops@example.com",
            "--digest-email-to",
            "oncall@example.com",
            "--smtp-server",
            "127.0.0.1",
            "--smtp-port",
            str(mailbox.port),
            "--smtp-security",
            "none",
            "--smtp-user",
            _Mailbox.USER,
            "--smtp-from",
            "setlist@example.com",
        ],
        env={"SETLIST_SMTP_PASSWORD": _Mailbox.PASSWORD},
    )

    # The digest of the period so far, shown (not sent: no period is closed).
    preview = CliRunner().invoke(app, ["automations", "digest"])

    async def routed() -> Routes | None:
        async with get_client() as c:
            try:
                return await automations.stored_routes(c)
            finally:
                await _clean(c)

    assert result.exit_code == 0, result.output
    assert preview.exit_code == 0 and "[warning] Setlist digest: " in preview.output
    assert mailbox.messages == []
    assert "created" in result.output or "updated" in result.output
    assert _Mailbox.PASSWORD not in result.output
    assert anyio.run(routed) == Routes(
        f"test-pd-{suffix}", f"test-slack-{suffix}", f"test-mail-{suffix}"
    )

    async def send_through_saved_block() -> None:
        from blocks.smtp_email import SmtpEmail

        block = await SmtpEmail.aload(f"test-mail-{suffix}")
        await block.notify("digest body", "[warning] probe")

    anyio.run(send_through_saved_block)
    ((rcpt, mail),) = mailbox.with_subject("probe")
    assert sorted(rcpt) == ["oncall@example.com", "ops@example.com"]


def test_a_failed_digest_send_is_logged_without_the_webhooks_secret_url():
    import httpx
    from prefect.blocks.abstract import NotificationError

    from setlist.observability.metrics import _reason

    url = "https://hooks.slack.com/services/T000/B000/secret-token-123"
    request = httpx.Request("POST", url)
    error = httpx.HTTPStatusError(
        f"404 for url {url}", request=request, response=httpx.Response(404)
    )
    assert _reason(error) == "the notification endpoint answered 404"
    assert _reason(NotificationError(log="e-mail to relay:587 failed: timeout")).endswith("timeout")
    assert _reason(ConnectionError(url)) == "ConnectionError"
