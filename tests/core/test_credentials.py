"""The platform's credentials: created once, 0600, never re-made; run tokens unforgeable."""

from __future__ import annotations

import os
import stat
import uuid

import pytest

from setlist.core import credentials, runtokens


def test_the_operator_credential_is_made_once_and_kept_private(tmp_path, monkeypatch):
    monkeypatch.delenv("PREFECT_API_AUTH_STRING", raising=False)
    assert credentials.operator_auth_string(tmp_path) is None  # nothing made by a read
    first, created = credentials.ensure_operator_auth_string(tmp_path)
    again, created_again = credentials.ensure_operator_auth_string(tmp_path)
    assert created and not created_again and first == again
    assert first.startswith("setlist:") and len(first) > 40
    path = tmp_path / "credentials" / "api-auth"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert credentials.operator_auth_string(tmp_path) == first


def test_the_environment_wins_over_the_file(tmp_path, monkeypatch):
    credentials.ensure_operator_auth_string(tmp_path)
    monkeypatch.setenv("PREFECT_API_AUTH_STRING", "setlist:from-a-secret")
    assert credentials.operator_auth_string(tmp_path) == "setlist:from-a-secret"


def test_keys_for_different_purposes_differ(tmp_path, monkeypatch):
    monkeypatch.delenv("SETLIST_PLATFORM_KEY", raising=False)
    grant, token = (
        credentials.derived_key("grant", tmp_path),
        credentials.derived_key("run-token", tmp_path),
    )
    assert grant != token and len(grant) == 32
    assert credentials.derived_key("grant", tmp_path) == grant  # the key file is kept
    monkeypatch.setenv("SETLIST_PLATFORM_KEY", "another-platform")
    assert credentials.derived_key("grant", tmp_path) != grant


KEY = b"k" * 32
FORGED_CLAIMS = runtokens._b64(
    b'{"r":"%s","t":"victim","e":9999999999}' % str(uuid.uuid4()).encode()
)


def test_a_run_token_carries_its_run_and_tenant():
    run = uuid.uuid4()
    token = runtokens.issue(run, "acme").encode(KEY)
    claims = runtokens.verify(token, KEY)
    assert (claims.run_id, claims.tenant_id) == (run, "acme")


@pytest.mark.parametrize(
    "tamper",
    [
        lambda t: t[:-2] + ("AA" if not t.endswith("AA") else "BB"),  # the MAC
        lambda t: (
            runtokens._b64(b'{"r":"%s","t":"victim","e":9999999999}' % str(uuid.uuid4()).encode())
            + "."
            + t.split(".")[1]
        ),  # other claims under the same MAC
        lambda t: t.split(".")[0],  # no MAC
        lambda t: "",
        lambda t: "a.b.c",
    ],
)
def test_a_tampered_run_token_is_refused(tamper):
    token = runtokens.issue(uuid.uuid4(), "acme").encode(KEY)
    with pytest.raises(runtokens.InvalidRunToken):
        runtokens.verify(tamper(token), KEY)


def test_a_token_made_with_another_key_or_expired_is_refused():
    run = uuid.uuid4()
    with pytest.raises(runtokens.InvalidRunToken, match="signature"):
        runtokens.verify(runtokens.issue(run, "acme").encode(b"x" * 32), KEY)
    old = runtokens.RunToken(run, "acme", expires=1_000).encode(KEY)
    with pytest.raises(runtokens.InvalidRunToken, match="expired"):
        runtokens.verify(old, KEY)


def test_a_token_for_a_bad_tenant_id_cannot_be_issued():
    with pytest.raises(Exception, match="DNS-1123"):
        runtokens.issue(uuid.uuid4(), "Bad_Tenant")


def test_tokens_are_not_in_the_environment_of_this_process():
    assert not any(v.startswith("run:") for v in os.environ.values())
