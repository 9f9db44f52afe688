"""Pure domain rules: ids, bands, tiers, quotas, queue names."""

from __future__ import annotations

import pytest

from setlist.core.tenancy import (
    TIERS,
    InvalidTenantId,
    JobType,
    Priority,
    ResourceTier,
    SetlistError,
    TenantQuota,
    check_tier_allowed,
    cpu_to_millicpu,
    job_variables,
    memory_to_mib,
    parse_job_type,
    parse_priority,
    parse_queue_name,
    parse_tier,
    queue_name,
    tier_for,
    validate_tenant_id,
)


@pytest.mark.parametrize("good", ["a", "acme", "enterprise-client-001", "0x", "a" * 50])
def test_valid_tenant_ids(good):
    assert validate_tenant_id(good) == good


@pytest.mark.parametrize(
    "bad,reason",
    [
        ("", "empty"),
        ("Acme", "DNS-1123"),
        ("-acme", "DNS-1123"),
        ("acme-", "DNS-1123"),
        ("ac_me", "DNS-1123"),
        ("ac.me", "DNS-1123"),
        ("../etc", "DNS-1123"),
        ("a" * 51, "at most 50"),
    ],
)
def test_invalid_tenant_ids_say_why(bad, reason):
    with pytest.raises(InvalidTenantId, match=reason):
        validate_tenant_id(bad)


def test_bands_in_dispatch_order():
    assert [p.value for p in Priority] == ["critical", "high", "normal", "low", "batch"]
    assert Priority.critical.rank < Priority.batch.rank


def test_tiers_match_the_seed_exactly():
    expected = {
        "micro": ("100m", "128Mi"),
        "small": ("250m", "512Mi"),
        "medium": ("500m", "1Gi"),
        "large": ("2000m", "4Gi"),
        "xlarge": ("8000m", "16Gi"),
        "enterprise": ("16000m", "32Gi"),
    }
    assert {t.value: (r.cpu, r.memory) for t, r in TIERS.items()} == expected
    for res in TIERS.values():
        assert cpu_to_millicpu(res.cpu) == res.millicpu
        assert memory_to_mib(res.memory) == res.memory_mib


def test_parsers_refuse_with_accepted_values():
    assert parse_priority("HIGH") is Priority.high
    assert parse_tier(" large ") is ResourceTier.large
    assert parse_job_type("data-etl") is JobType.data_etl
    with pytest.raises(SetlistError, match="accepted: critical, high, normal, low, batch"):
        parse_priority("urgent")
    with pytest.raises(SetlistError, match="accepted: micro, small"):
        parse_tier("huge")
    with pytest.raises(SetlistError, match="unknown job type 'mining'"):
        parse_job_type("mining")


def test_quota_defaults_and_validation():
    q = TenantQuota()
    assert q.concurrent_jobs == 4 and q.weight == 1.0
    with pytest.raises(ValueError):
        TenantQuota(concurrent_jobs=0)
    with pytest.raises(ValueError, match="cpu quantity"):
        TenantQuota(cpu="lots")
    with pytest.raises(ValueError, match="memory quantity"):
        TenantQuota(memory="4GB")


def test_tier_must_fit_quota():
    small = TenantQuota(cpu="1", memory="2Gi")
    check_tier_allowed(small, ResourceTier.medium)
    with pytest.raises(SetlistError, match="exceeds the tenant quota"):
        check_tier_allowed(small, ResourceTier.large)


def test_queue_names_round_trip_and_reject_foreign_queues():
    for band in Priority:
        assert parse_queue_name(queue_name("acme--x", band)) == ("acme--x", band)
    assert parse_queue_name("default") is None
    assert parse_queue_name("acme.urgent") is None
    assert parse_queue_name("Bad.normal") is None


def test_default_tiers_and_job_variables():
    assert tier_for(JobType.ml_training) is ResourceTier.xlarge
    assert tier_for(JobType.canary, {JobType.canary: ResourceTier.small}) is ResourceTier.small
    jv = job_variables("acme", JobType.data_etl, Priority.low, ResourceTier.large)
    assert jv == {
        "tenant": "acme",
        "job_type": "data-etl",
        "band": "low",
        "tier": "large",
        "cpu": "2000m",
        "memory": "4Gi",
        "active_deadline_seconds": 3 * 3600,
    }
    gpu = job_variables("acme", JobType.ml_training, Priority.high, ResourceTier.xlarge, gpu=1)
    assert gpu["gpu"] == 1
    with pytest.raises(InvalidTenantId):
        job_variables("../x", JobType.canary, Priority.low, ResourceTier.micro)


@pytest.mark.parametrize(
    ("name", "tags", "owner"),
    [
        ("acme_threshold", [], "acme"),
        ("acme-eu_threshold", [], "acme-eu"),
        ("acme-eu-threshold", [], None),  # no separator: a platform variable
        ("acme-threshold", ["tenant:acme"], "acme"),
        ("acme_threshold", ["tenant:acme-eu"], "acme-eu"),  # the tag decides
        ("Bad_x", [], None),  # not a tenant id before the separator
        ("_x", [], None),
        ("setlist_dispatcher", [], None),  # the platform's own
    ],
)
def test_a_variable_belongs_to_exactly_one_tenant_or_none(name, tags, owner):
    from setlist.core.tenancy import variable_owner

    assert variable_owner(name, tags) == owner
