"""Derived Job renders (``setlist.security.render_cache``) against full renders.

Every derived Job must equal, deep and exact, the Job prefect-kubernetes renders for the
same tenant: for every band and tier, both pool kinds, deployment job variables over the
defaults, tenant ids short and as long as allowed. A new template revision (template,
image setting, Prefect settings) must render afresh, and a key whose tenant id is not a
plain substitution must fall back to full renders.
"""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import pytest

from blocks.tenant import TenantProfile
from setlist.core.tenancy import (
    TENANT_ID_MAX,
    JobType,
    Priority,
    ResourceTier,
    job_variables,
    tenant_namespace,
)
from setlist.k8s import templates
from setlist.k8s.templates import PoolKind
from setlist.security import render_cache
from setlist.security.render_cache import PROBES, JobRenderCache, with_tenant
from setlist.security.sources import job_cases, rendered_objects

LONGEST = "t" * (TENANT_ID_MAX - 4) + "-end"


def _jobs(objects):
    return [o for o in objects if o["kind"] == "Job"]


def test_with_tenant_writes_the_id_in_keys_and_strings_and_copies():
    entry = {
        "ns": f"tenant-{PROBES[0]}",
        "labels": {f"x/{PROBES[0]}": PROBES[0], "n": 3, "b": False, "z": None, "f": 0.5},
        "list": [PROBES[0], {"q": f"{PROBES[0]}.normal"}],
    }
    text = json.dumps(entry)
    out = with_tenant(text, PROBES[0], "acme")
    assert out == {
        "ns": "tenant-acme",
        "labels": {"x/acme": "acme", "n": 3, "b": False, "z": None, "f": 0.5},
        "list": ["acme", {"q": "acme.normal"}],
    }
    out["list"][1]["q"] = "changed"
    assert with_tenant(text, PROBES[0], "acme")["list"][1]["q"] == "acme.normal"


@pytest.mark.server
async def test_derived_objects_equal_full_renders_for_every_band_tier_and_pool(client):
    renders = JobRenderCache()
    pools_seen = set()
    for i, band in enumerate(Priority):
        for j, tier in enumerate(ResourceTier):
            tid = LONGEST if (i + j) % 2 else f"b{i}t{j}"
            profile = TenantProfile(
                tenant_id=tid,
                default_priority=band,
                tier_overrides={jt: tier for jt in JobType},
            )
            pools_seen |= {kind for _, kind in job_cases(profile)}
            derived = await rendered_objects(client, profile, {}, renders=renders)
            full = await rendered_objects(client, profile, {}, derive=False)
            assert derived == full, (band, tier)
            jobs = _jobs(derived)
            assert len(jobs) == len(job_cases(profile))
            for job in jobs:
                labels = job["metadata"]["labels"]
                assert job["metadata"]["namespace"] == tenant_namespace(tid)
                assert labels["setlist.io/tenant"] == tid
                assert (labels["setlist.io/band"], labels["setlist.io/tier"]) == (band, tier)
    assert pools_seen == set(PoolKind)
    # every Job came from the cache: 2 probe renders per (band, tier, job case), no more
    cases = len(job_cases(TenantProfile(tenant_id="x")))
    assert renders.derived == len(Priority) * len(ResourceTier) * cases
    assert renders.renders == 2 * renders.derived
    assert len(renders) == renders.derived


@pytest.mark.server
@pytest.mark.parametrize("kind", list(PoolKind))
async def test_every_job_type_derives_on_each_pool(client, kind):
    renders = JobRenderCache()
    for job_type in JobType:
        for tid in ("a", LONGEST):
            gpu = 2 if kind is PoolKind.gpu else 0
            values = job_variables(tid, job_type, Priority.high, ResourceTier.large, gpu=gpu)
            derived = await renders.render(client, values, kind)
            assert derived == await renders.render_full(client, values, kind)
    assert len(renders) == len(JobType)


@pytest.mark.server
async def test_deployment_job_variables_are_part_of_the_key(client):
    """A deployment's job variables (env naming the tenant, resources, GPUs, service
    account) are rendered, not substituted: two tenants differing there get their own
    entries and each Job equals its full render."""
    renders = JobRenderCache()
    profile = TenantProfile(tenant_id="dep-vars")
    for n, tid in enumerate(("dep-vars", "dep-vars-2")):
        deployments = {
            JobType.ml_training: SimpleNamespace(
                job_variables={
                    "gpu": 2,
                    "gpu_product": "NVIDIA-H100",
                    "env": {"OWNER": tid, "MODE": f"m{n}"},
                    "cpu": "3",
                    "memory": "5Gi",
                }
            ),
            JobType.data_etl: SimpleNamespace(
                job_variables={"service_account_name": "etl-runner", "scratch_size": "4Gi"}
            ),
        }
        profile = profile.model_copy(update={"tenant_id": tid})
        derived = await rendered_objects(client, profile, deployments, renders=renders)
        assert derived == await rendered_objects(client, profile, deployments, derive=False)
        gpu_job = next(o for o in _jobs(derived) if o["metadata"]["name"] == "ml-training-gpu")
        (container,) = gpu_job["spec"]["template"]["spec"]["containers"]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 2
        assert {"name": "OWNER", "value": tid} in container["env"]
    # the ml-training cases differ in env: own entries; the rest are shared
    assert len(renders) == len(job_cases(profile)) + 2


@pytest.mark.server
async def test_a_new_template_revision_renders_afresh(client, tmp_path, monkeypatch):
    renders = JobRenderCache()
    profile = TenantProfile(tenant_id="rev-a")
    before = await rendered_objects(client, profile, {}, renders=renders)
    entries, full_renders = len(renders), renders.renders
    # The same revision: derived only, no render.
    again = await rendered_objects(
        client, profile.model_copy(update={"tenant_id": "rev-b"}), {}, renders=renders
    )
    assert renders.renders == full_renders and len(again) == len(before)

    # A template change: every Job of that pool kind renders afresh, with the change.
    shutil.copytree(templates.TEMPLATE_DIR, tmp_path / "t")
    cpu = json.loads((tmp_path / "t" / "cpu.json").read_text())
    pod = cpu["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]
    pod["terminationGracePeriodSeconds"] = 17
    (tmp_path / "t" / "cpu.json").write_text(json.dumps(cpu))
    monkeypatch.setattr(templates, "TEMPLATE_DIR", tmp_path / "t")
    templates._template.cache_clear()
    try:
        changed = await rendered_objects(client, profile, {}, renders=renders)
        assert changed == await rendered_objects(client, profile, {}, derive=False)
        grace = {
            o["metadata"]["name"]: o["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
            for o in _jobs(changed)
        }
        assert grace == {n: 60 if n.endswith("-gpu") else 17 for n in grace}
        cpu_cases = sum(kind is PoolKind.cpu for _, kind in job_cases(profile))
        assert len(renders) == entries + cpu_cases
    finally:
        monkeypatch.undo()
        templates._template.cache_clear()

    # A Prefect setting the worker copies into Jobs: a new revision too.
    from prefect.settings import PREFECT_LOGGING_LEVEL, temporary_settings

    entries = len(renders)
    with temporary_settings(updates={PREFECT_LOGGING_LEVEL: "DEBUG"}):
        debug = await rendered_objects(client, profile, {}, renders=renders)
        assert debug == await rendered_objects(client, profile, {}, derive=False)
    assert len(renders) == entries + len(job_cases(profile))
    env = _jobs(debug)[0]["spec"]["template"]["spec"]["containers"][0]["env"]
    assert {"name": "PREFECT_LOGGING_LEVEL", "value": "DEBUG"} in env
    # Back on the first revision: derived as before, nothing rendered.
    full_renders = renders.renders
    assert await rendered_objects(client, profile, {}, renders=renders) == before
    assert renders.renders == full_renders


@pytest.mark.server
async def test_the_image_setting_is_part_of_the_revision(client, monkeypatch):
    from setlist.core.settings import get_settings

    renders = JobRenderCache()
    values = job_variables("img", JobType.canary, Priority.normal, ResourceTier.micro)
    await renders.render(client, values, PoolKind.cpu)
    monkeypatch.setenv("SETLIST_IMAGE", "ghcr.io/setlist/runtime:9.9.9")
    get_settings.cache_clear()
    try:
        job = await renders.render(client, values, PoolKind.cpu)
        assert job == await renders.render_full(client, values, PoolKind.cpu)
        (container,) = job["spec"]["template"]["spec"]["containers"]
        assert container["image"] == "ghcr.io/setlist/runtime:9.9.9"
        assert len(renders) == 2
    finally:
        monkeypatch.undo()
        get_settings.cache_clear()


@pytest.mark.server
async def test_a_tenant_id_that_is_not_a_plain_substitution_falls_back(client, monkeypatch):
    """If a render ever transformed the tenant id (here: truncated into a label), the
    entry's own check catches it and the key's Jobs are rendered in full."""
    real = JobRenderCache.render_full

    async def truncating(client, values, kind):
        job = await real(client, values, kind)
        job["metadata"]["labels"]["short"] = values["tenant"][:24]
        return job

    real_probe = render_cache._render_probe

    async def truncating_probe(client, values, kind):
        job = await real_probe(client, values, kind)
        job["metadata"]["labels"]["short"] = values["tenant"][:24]
        return job

    monkeypatch.setattr(JobRenderCache, "render_full", staticmethod(truncating))
    monkeypatch.setattr(render_cache, "_render_probe", truncating_probe)
    renders = JobRenderCache()
    values = job_variables("fallback-tenant", JobType.canary, Priority.low, ResourceTier.small)
    job = await renders.render(client, values, PoolKind.cpu)
    assert job == await truncating(client, values, PoolKind.cpu)
    assert renders.derived == 0 and renders.renders == 3  # two probes, then in full
    await renders.render(client, values, PoolKind.cpu)
    assert renders.derived == 0 and renders.renders == 4  # no new probes: known underivable


@pytest.mark.server
async def test_variables_naming_server_state_are_never_cached(client):
    renders = JobRenderCache()
    values = job_variables("refs", JobType.canary, Priority.normal, ResourceTier.micro)
    values["env"] = {"FROM_VARIABLE": "{{ prefect.variables.setlist_no_such_variable }}"}
    job = await renders.render(client, values, PoolKind.cpu)
    assert job == await renders.render_full(client, values, PoolKind.cpu)
    assert len(renders) == 0 and renders.derived == 0


@pytest.mark.server
async def test_derived_jobs_are_fresh_copies(client):
    renders = JobRenderCache()
    values = job_variables("copies", JobType.canary, Priority.normal, ResourceTier.micro)
    first = await renders.render(client, values, PoolKind.cpu)
    first["metadata"]["labels"].clear()
    first["spec"]["template"]["spec"]["containers"][0]["env"].append({"name": "X"})
    assert await renders.render(client, values, PoolKind.cpu) == await renders.render_full(
        client, values, PoolKind.cpu
    )


async def test_the_cache_is_bounded_least_recently_used_first(monkeypatch):
    async def fake(client, values, kind):
        return {"metadata": {"namespace": f"tenant-{values['tenant']}"}, "values": dict(values)}

    monkeypatch.setattr(JobRenderCache, "render_full", staticmethod(fake))
    monkeypatch.setattr(render_cache, "_render_probe", fake)
    assert render_cache.JOB_RENDERS.max_entries > 0
    small = JobRenderCache(max_entries=2)
    bands = [Priority.low, Priority.normal, Priority.low, Priority.high]
    for band in bands:
        values = job_variables("bounded", JobType.canary, band, ResourceTier.micro)
        assert await small.render(None, values, PoolKind.cpu) == await fake(None, values, "cpu")
    # low, normal, low (a hit, so most recent), high: normal went
    assert [json.loads(blob)["band"] for _, _, blob in small._entries] == ["low", "high"]
    assert small.renders == 2 * 3 and small.derived == 4


@pytest.mark.server
async def test_tenant_deployments_are_its_catalogued_ones(prefect_server, tenant_id):
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    from setlist.security.sources import (
        catalog_job_types,
        tenant_deployments,
    )
    from setlist.tenants.onboarding import TenantSpec, create_tenant

    async with get_client() as client:
        await create_tenant(client, TenantSpec(tenant_id=tenant_id))
        expected = {}
        for job_type in catalog_job_types():
            try:
                dep = await client.read_deployment_by_name(f"{job_type.value}/{tenant_id}")
            except ObjectNotFound:
                continue
            expected[job_type] = dep.id
        assert expected
        got = await tenant_deployments(client, tenant_id)
        assert list(got) == list(expected)
        assert {jt: d.id for jt, d in got.items()} == expected
