"""Platform records sealed for one tenant and one key: any edit, move or copy is refused,
and a job gets a seal from the gate only for its own tenant and its own job's prefixes."""

from __future__ import annotations

import json

import pytest
from prefect.settings import PREFECT_API_AUTH_STRING, temporary_settings

from setlist.core import records, runtokens
from setlist.core.storage import LocalTenantStorage
from setlist.core.tenancy import SetlistError
from setlist.tenants.onboarding import TenantSpec, create_tenant
from setlist.tenants.submit import submit

DOC = {"status": "final", "totals": {"total": "12.50"}, "runs": [1, 2.5, None], "n": {"1": "x"}}


@pytest.fixture
def store(tmp_path):
    return lambda tenant: LocalTenantStorage(tenant, tmp_path)


def test_a_sealed_record_reads_back_as_written(store):
    acme = store("acme")
    records.write_record(acme, "billing/2026-01-01/_manifest.json", DOC)
    assert records.read_record(acme, "billing/2026-01-01/_manifest.json") == DOC
    # Sealing is deterministic: a re-run writes the same bytes.
    first = acme.get_bytes("billing/2026-01-01/_manifest.json")
    records.write_record(acme, "billing/2026-01-01/_manifest.json", DOC)
    assert acme.get_bytes("billing/2026-01-01/_manifest.json") == first


@pytest.mark.parametrize(
    "tamper",
    [
        pytest.param(lambda d: {**d, "status": "provisional"}, id="field-edited"),
        pytest.param(lambda d: {**d, "totals": {"total": "0.00"}}, id="nested-edited"),
        pytest.param(lambda d: {**d, "extra": 1}, id="field-added"),
        pytest.param(lambda d: {k: v for k, v in d.items() if k != "runs"}, id="field-dropped"),
        pytest.param(lambda d: {k: v for k, v in d.items() if k != "_seal"}, id="seal-stripped"),
        pytest.param(lambda d: {**d, "_seal": {"v": 1, "sig": "AAAA"}}, id="seal-forged"),
        pytest.param(lambda d: {**d, "_seal": {"v": 2, "sig": d["_seal"]["sig"]}}, id="version"),
        pytest.param(lambda d: [d], id="not-an-object"),
    ],
)
def test_an_edited_or_unsealed_record_is_refused(store, tamper):
    acme = store("acme")
    key = "billing/2026-01-01/_manifest.json"
    records.write_record(acme, key, DOC)
    doc = json.loads(acme.get_bytes(key))
    acme.put_bytes(key, json.dumps(tamper(doc)).encode())
    with pytest.raises(records.UnsealedRecord):
        records.read_record(acme, key)


def test_a_sealed_record_is_worthless_at_another_key_or_tenant(store):
    acme, other = store("acme"), store("acme-eu")
    records.write_record(acme, "billing/2026-01-01/_manifest.json", DOC)
    sealed = acme.get_bytes("billing/2026-01-01/_manifest.json")
    acme.put_bytes("billing/2026-01-02/_manifest.json", sealed)  # another day of the same
    other.put_bytes("billing/2026-01-01/_manifest.json", sealed)  # another tenant's day
    for storage, key in [(acme, "billing/2026-01-02/_manifest.json"),
                         (other, "billing/2026-01-01/_manifest.json")]:  # fmt: skip
        with pytest.raises(records.UnsealedRecord, match="does not verify"):
            records.read_record(storage, key)


def test_garbage_and_bytes_named_by_digest(store):
    acme = store("acme")
    acme.put_bytes("security/latest.json", b"\x00not json")
    with pytest.raises(records.UnsealedRecord, match="not JSON"):
        records.read_record(acme, "security/latest.json")
    acme.put_bytes("security/deep.json", b"[" * 100_000 + b"]" * 100_000)
    with pytest.raises(records.UnsealedRecord):
        records.read_record(acme, "security/deep.json")
    with pytest.raises(records.UnsealedRecord, match="digest differs"):
        records.check_bytes("curated/x.parquet", b"planted", "0" * 64)
    with pytest.raises(SetlistError, match="not a platform record key"):
        records.write_record(acme, "raw/2026/x.json", DOC)


# ------------------------------------------------------------------ through the gate


@pytest.mark.server
async def test_a_job_gets_seals_from_the_gate_only_for_its_own_tenant_and_kind(
    client, tenant_id, tmp_path
):
    """In a job (its credential a run token, no platform key), a billing run seals its
    tenant's billing records through the gate; its other prefixes, a canary run's
    records, and a token of another tenant are refused, and nothing is written."""
    a, b = f"{tenant_id[:20]}-a", f"{tenant_id[:20]}-b"
    for t in (a, b):
        await create_tenant(client, TenantSpec(tenant_id=t))
    billing = (await submit(client, "billing-report", a)).flow_run_id
    canary = (await submit(client, "canary", a)).flow_run_id
    mine, theirs = LocalTenantStorage(a, tmp_path), LocalTenantStorage(b, tmp_path)

    def as_job(run_id, tenant):
        token = runtokens.issue(run_id, tenant).auth_string()
        return temporary_settings({PREFECT_API_AUTH_STRING: token})

    with as_job(billing, a):
        assert records._job_auth()
        records.write_record(mine, "billing/2026-01-01/_manifest.json", DOC)
        for key in ("models/recommender/registry.json", "security/latest.json"):
            with pytest.raises(SetlistError, match="billing-report job seals records under"):
                records.write_record(mine, key, DOC)
        # Verifying in the job uses the public key the gate hands out.
        assert records.read_record(mine, "billing/2026-01-01/_manifest.json") == DOC
    with as_job(canary, a), pytest.raises(SetlistError, match="writes no platform records"):
        records.write_record(mine, "billing/2026-01-02/_manifest.json", DOC)
    # A's billing run, but the token claims tenant B: the gate refuses the token's run.
    with as_job(billing, b), pytest.raises(SetlistError, match="not its tenant's"):
        records.write_record(theirs, "billing/2026-01-01/_manifest.json", DOC)
    assert records.read_record(mine, "billing/2026-01-01/_manifest.json") == DOC
    assert sorted(mine.list_keys("")) == ["billing/2026-01-01/_manifest.json"]
    assert theirs.list_keys("") == []
