"""The billing commands operators run (``setlist billing …``): report a period, put a tenant
on a plan, read a plan from a file.

Apart from ``setlist.billing.invoices`` because these need a tenant's profile and its
``billing`` lock (``setlist.tenants``, ``setlist.dispatch``), which producing a report
does not: the report code stays free of onboarding. A report asked for here is billed
with the same steps, under the same lock, as the ``billing-report`` job.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import pyarrow as pa
from prefect.client.orchestration import PrefectClient
from pydantic import ValidationError

from blocks.tenant import TenantProfile
from setlist.billing import invoices
from setlist.billing.invoices import (
    FINAL,
    MANIFEST_NAME,
    PLAN_LABEL,
    emit_events,
    load_plan,
    produce,
    read_lines,
    read_manifest,
)
from setlist.billing.metering import (
    BILLING_PREFIX,
    check_started,
)
from setlist.billing.pricing import (
    PricePlan,
)
from setlist.core.storage import TenantStorage
from setlist.core.tenancy import SetlistError


async def tenant_handles(tenant_id: str) -> tuple[TenantProfile, TenantStorage]:
    """A tenant's profile and storage, also for a suspended tenant (it still gets billed)."""
    from setlist.core.storage import load_storage_config, tenant_storage
    from setlist.tenants.onboarding import read_profile

    profile = await read_profile(tenant_id)
    return profile, tenant_storage(tenant_id, await load_storage_config(profile.storage_block))


async def obtain_report(
    client: PrefectClient,
    tenant_id: str,
    period_text: str,
    *,
    refresh: bool = False,
    now: datetime | None = None,
) -> tuple[dict[str, Any], pa.Table]:
    """(manifest, lines) of a period: the published final report, else billed now.

    A period without a report, with a provisional one, or with ``refresh`` is billed
    first (the same steps as the billing-report job, under the same tenant lock).
    """
    from setlist.billing.metering import parse_period
    from setlist.dispatch.locks import tenant_lock

    now = now or invoices.utcnow()  # through the module: one clock to set in tests
    period = parse_period(period_text, now)
    check_started(period, now)
    profile, storage = await tenant_handles(tenant_id)
    manifest = read_manifest(storage, period)
    if refresh or manifest is None or manifest["status"] != FINAL:
        plan = await load_plan(profile)
        async with tenant_lock(tenant_id, "billing"):
            reports = await produce(client, profile, storage, period, plan, now)
        await emit_events(client, reports)
        manifest = reports[-1].manifest
    return manifest, read_lines(storage, manifest)


async def effective_plan(tenant_id: str) -> PricePlan:
    from setlist.tenants.onboarding import read_profile

    return await load_plan(await read_profile(tenant_id))


async def assign_plan(client: PrefectClient, tenant_id: str, name: str) -> None:
    """Put a tenant on the plan ``name`` (which must exist, or be the standard plan)."""
    from setlist.tenants.onboarding import read_profile, update_tenant

    profile = await read_profile(tenant_id)
    await load_plan(profile.model_copy(update={"labels": {**profile.labels, PLAN_LABEL: name}}))
    await update_tenant(client, tenant_id, {"labels": {**profile.labels, PLAN_LABEL: name}})


def plan_from_file(name: str, path: str) -> PricePlan:
    """A plan named ``name`` from a YAML or JSON file of PricePlan fields."""
    import yaml

    try:
        with open(path) as fh:
            data = yaml.safe_load(fh) or {}
    except OSError as exc:
        raise SetlistError(f"can't read plan file {path!r}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise SetlistError(f"plan file {path!r} is not YAML or JSON: {exc}") from None
    if not isinstance(data, dict):
        raise SetlistError(f"plan file {path!r} must hold a mapping of plan fields")
    try:
        return PricePlan.model_validate({**data, "name": name})
    except ValidationError as exc:
        reasons = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'plan'}: {e['msg']}" for e in exc.errors()
        )
        raise SetlistError(f"plan {name!r}: {reasons}") from None


def manifest_key_of(manifest: dict[str, Any]) -> str:
    return f"{BILLING_PREFIX}{manifest['period']}/{MANIFEST_NAME}"
