"""The SmtpEmail block: alerts as e-mail through the operator's SMTP relay.

Prefect ships e-mail only through SendGrid's API; most operators have an SMTP relay
(their mail provider, a cluster's Postfix, SES's SMTP interface) and want the warnings'
digest in a mailbox. The block is a Prefect notification block, so automations send
through it as through Slack's: the server's actions service loads it, which is why the
``prefect.collections`` entry point imports this module in the server's process too.

What an alert carries (a run's name, an event's tenant id) is never trusted as header
text: line breaks are folded away before the subject is set, so no alert can add a
recipient or a header. The password is a secret field: it never appears in the block's
plain fields, in the message or in the error a failed delivery raises.
"""

from __future__ import annotations

import asyncio
import re
import smtplib
import ssl
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from enum import StrEnum

from prefect.blocks.abstract import NotificationBlock, NotificationError
from pydantic import Field, SecretStr, field_validator

# One plain address: no display name, no list, nothing a header could be folded around.
_ADDRESS = re.compile(
    r"^[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+@[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?$"
)
_HOST = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9.:-]*[A-Za-z0-9])?$")
SUBJECT_MAX = 200


class SmtpSecurity(StrEnum):
    starttls = "starttls"  # submission port 587: plain connection upgraded to TLS
    tls = "tls"  # implicit TLS, port 465
    none = "none"  # a relay on loopback or inside the cluster only


def _address(value: str) -> str:
    value = value.strip()
    if not _ADDRESS.match(value):
        raise ValueError(f"not a plain e-mail address: {value!r}")
    return value


def one_line(text: str, limit: int = SUBJECT_MAX) -> str:
    """``text`` as one header-safe line: every run of whitespace (line breaks included)
    becomes one space, cut to ``limit`` characters."""
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


class SmtpEmail(NotificationBlock):
    """Sends each notification as one e-mail to ``to_addresses`` through an SMTP relay."""

    _block_type_name = "Setlist SMTP Email"
    _block_type_slug = "setlist-smtp-email"
    _description = "Alerts as e-mail through an SMTP relay (STARTTLS, TLS or, on loopback, plain)."

    smtp_server: str = Field(description="host name or address of the SMTP relay")
    smtp_port: int = Field(default=587, ge=1, le=65535)
    security: SmtpSecurity = SmtpSecurity.starttls
    username: str | None = Field(default=None, description="login, when the relay wants one")
    password: SecretStr | None = None
    from_address: str = Field(description="the sender, e.g. setlist-alerts@example.com")
    to_addresses: list[str] = Field(min_length=1, max_length=50)
    timeout_s: float = Field(default=30.0, gt=0, le=300)

    @field_validator("smtp_server")
    @classmethod
    def _host(cls, value: str) -> str:
        if not _HOST.match(value):
            raise ValueError(f"not a host name or address: {value!r}")
        return value

    @field_validator("from_address")
    @classmethod
    def _from(cls, value: str) -> str:
        return _address(value)

    @field_validator("to_addresses")
    @classmethod
    def _to(cls, value: list[str]) -> list[str]:
        return [_address(v) for v in value]

    def message(self, body: str, subject: str | None = None) -> EmailMessage:
        msg = EmailMessage()
        msg["Subject"] = one_line(subject or "Setlist alert")
        msg["From"] = self.from_address
        msg["To"] = ", ".join(self.to_addresses)
        msg["Date"] = formatdate(localtime=False, usegmt=True)
        msg["Message-ID"] = make_msgid(domain=self.from_address.rsplit("@", 1)[1])
        msg.set_content(body)
        return msg

    def _send(self, msg: EmailMessage) -> None:
        context = ssl.create_default_context()
        smtp: smtplib.SMTP
        if self.security is SmtpSecurity.tls:
            smtp = smtplib.SMTP_SSL(
                self.smtp_server, self.smtp_port, timeout=self.timeout_s, context=context
            )
        else:
            smtp = smtplib.SMTP(self.smtp_server, self.smtp_port, timeout=self.timeout_s)
        with smtp:
            if self.security is SmtpSecurity.starttls:
                smtp.starttls(context=context)
            if self.username:
                secret = self.password.get_secret_value() if self.password else ""
                smtp.login(self.username, secret)
            smtp.send_message(msg)

    async def notify(self, body: str, subject: str | None = None) -> None:
        msg = self.message(body, subject)
        try:
            await asyncio.to_thread(self._send, msg)
        except (smtplib.SMTPException, OSError) as exc:
            # The exception's own text is the server's reply or the socket's error; it
            # never holds the password, which smtplib sends only base64-encoded.
            reason = f"{type(exc).__name__}: {exc}"
            if self.password and self.password.get_secret_value() in reason:
                reason = type(exc).__name__
            log = f"e-mail to {self.smtp_server}:{self.smtp_port} failed: {reason}"
            self.logger.error(log)
            raise NotificationError(log=log) from None
