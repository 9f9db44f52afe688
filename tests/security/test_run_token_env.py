"""A job's run token in its manifest is by design; a secret pasted under its name is not."""

from __future__ import annotations

import uuid

import pytest

from setlist.core import runtokens
from setlist.security.checks import CheckId
from setlist.security.posture import posture_findings


def _job(value: str) -> dict:
    env = [{"name": "PREFECT_API_AUTH_STRING", "value": value}]
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "j", "namespace": "tenant-acme"},
        "spec": {"template": {"spec": {"containers": [{"name": "c", "env": env}]}}},
    }


def _literal_secret_findings(value: str) -> list:
    findings, _ = posture_findings("acme", "tenant-acme", [_job(value)])
    return [f for f in findings if f.check is CheckId.secret_literal_env]


def test_the_run_token_is_not_a_finding():
    token = runtokens.issue(uuid.uuid4(), "acme").auth_string(key=b"k" * 32)
    assert _literal_secret_findings(token) == []


@pytest.mark.parametrize(
    "value", ["setlist:Zx8f0fJ2kLq9Vd3NpR7tY1wE5uB", "run:hunter2 with spaces"]
)
def test_a_secret_under_the_same_name_is(value):
    assert len(_literal_secret_findings(value)) == 1
