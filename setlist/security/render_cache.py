"""The security scan's Job renders, derived per tenant from one render per template revision.

A rendered Job (``setlist.workers.kubernetes.render_job``, prefect-kubernetes underneath)
costs about 15 ms, nearly all of it prefect-kubernetes copying the worker's Prefect
settings into the Job's environment, and a scan renders seven per tenant. Yet two tenants
with the same job variables but for ``tenant`` get the same Job but for the tenant id: the
template puts it in the namespace (``tenant-{{ tenant }}``) and the ``setlist.io/tenant``
labels, and the dry-run flow run (``dry_run_flow_run``) in its queue and tag. So the scan
renders each (pool kind, template revision, job variables less ``tenant``) once, with a
probe tenant id, and derives each tenant's Job by writing its id where the probe's stands.

What varies besides the tenant (job type, band, tier and its resources, GPUs, a
deployment's job variables) is part of the key, not substituted: band and tier are enums
the template checks, so no probe can stand in for them, and a platform has few of each.
The revision hashes everything else a render reads: the pool's base job template (with
the image of the settings), the platform's liveness environment and the environment the
worker copies from its Prefect settings. A change to any of them is a new revision, and
the next scan renders afresh.

Each entry proves itself when it is made: the Job is rendered for two probe ids (one of
the longest length a tenant id may have, so a truncating or slugifying step shows), and
the first, with the second's id written in, must equal the second exactly; else that key
is marked underivable and its Jobs are always rendered in full. The first probe is a true
``render_job``; the second takes the settings environment the revision already computed
(``_ProbeJobConfiguration``), so the same check proves that shortcut too. Job variables that name a
Prefect block or variable (read from the server at each render), or a probe id, bypass the
cache. ``JobRenderCache.render_full`` is the render the derivation stands for.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
from collections import OrderedDict
from typing import Any
from uuid import NAMESPACE_URL, uuid5

from prefect.settings import get_current_settings

from setlist.core.tenancy import TENANT_ID_MAX, validate_tenant_id
from setlist.k8s.templates import PoolKind, check_job_variables, load_template, sample_flow_run
from setlist.workers.job_credentials import liveness_environment
from setlist.workers.kubernetes import SetlistJobConfiguration, render_job

log = logging.getLogger(__name__)

# Two valid tenant ids that no real job variable contains; the second is as long as a
# tenant id may be.
PROBES = ("zz-scan-render-probe-a", "zz-scan-render-probe-b-".ljust(TENANT_ID_MAX, "0"))
assert len(PROBES[1]) == TENANT_ID_MAX
_SERVER_REFERENCE = re.compile(r"\{\{\s*prefect\.(blocks|variables)\.")
COMPUTE = object()  # render(): compute the revision
_DRY_RUN_NS = uuid5(NAMESPACE_URL, "https://setlist.io/security-scan/dry-run")


def dry_run_flow_run(values: dict[str, Any], kind: PoolKind | str):
    """The flow run a scan renders a Job for: ``sample_flow_run``'s, with ids fixed per
    job type and pool kind, so a render is a function of its inputs (a rescan renders the
    same Job, and a derived Job can equal a rendered one)."""
    job_type = values.get("job_type", "canary")
    return sample_flow_run(values).model_copy(
        update={
            "id": uuid5(_DRY_RUN_NS, f"flow-run/{job_type}/{PoolKind(kind).value}"),
            "flow_id": uuid5(_DRY_RUN_NS, f"flow/{job_type}"),
        }
    )


def with_tenant(entry: str, probe: str, tenant: str) -> Any:
    """A fresh object from ``entry`` (JSON text) with ``tenant`` written wherever ``probe``
    stands. Both are DNS labels (``[a-z0-9-]``, nothing JSON escapes), so in the text
    they occur only inside string tokens, keys and values alike."""
    return json.loads(entry.replace(probe, tenant))


_settings_env: tuple[object, dict[str, str], str] | None = None


def _current_settings_env() -> tuple[dict[str, str], str]:
    """The environment prefect-kubernetes copies from the current Prefect settings into
    a Job, and its digest: computed once per settings object (Prefect replaces, never
    mutates, them)."""
    global _settings_env
    settings = get_current_settings()
    if _settings_env is None or _settings_env[0] is not settings:
        env = settings.to_environment_variables(exclude_unset=True)
        digest = hashlib.sha256(json.dumps(env, sort_keys=True).encode()).hexdigest()
        _settings_env = (settings, env, digest)
    return _settings_env[1], _settings_env[2]


class _ProbeJobConfiguration(SetlistJobConfiguration):
    """The worker's configuration with the settings environment of the current revision
    taken as computed (its one costly step). Used for an entry's second probe only, which
    must then equal the first, a true ``render_job``, with the tenant id written in."""

    @classmethod
    def _base_environment(cls) -> dict[str, str]:
        return dict(_current_settings_env()[0])


async def _render_probe(client, values: dict[str, Any], kind: PoolKind) -> dict[str, Any]:
    """``render_job``'s steps through ``_ProbeJobConfiguration``."""
    check_job_variables(kind, values)
    config = await _ProbeJobConfiguration.from_template_and_values(
        load_template(kind), values, client=client
    )
    config._dry_run = True
    config.prepare_for_flow_run(dry_run_flow_run(values, kind))
    return config.job_manifest


def template_revision(kind: PoolKind | str) -> str | None:
    """The revision of what a render of this pool kind reads besides its job variables;
    ``None`` when the template itself names server state (never derived)."""
    text = json.dumps(load_template(kind), sort_keys=True)
    if _SERVER_REFERENCE.search(text):
        return None
    parts = [PoolKind(kind).value, text, json.dumps(liveness_environment(), sort_keys=True)]
    parts.append(_current_settings_env()[1])
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


class JobRenderCache:
    """Rendered Jobs by (pool kind, revision, job variables less ``tenant``), each with the
    first probe's id in it; at most ``max_entries``, least recently used dropped first."""

    def __init__(self, max_entries: int = 1024) -> None:
        self.max_entries = max_entries
        self._entries: OrderedDict[tuple[str, str, str], str | None] = OrderedDict()
        self._lock = threading.Lock()  # scans of several tenants may share the process
        self.renders = 0  # full renders done, probes included
        self.derived = 0  # Jobs derived from an entry

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    @staticmethod
    async def render_full(client, values: dict[str, Any], kind: PoolKind | str) -> dict[str, Any]:
        """The Job prefect-kubernetes renders for these job variables, every step taken."""
        return await render_job(client, values, kind, flow_run=dry_run_flow_run(values, kind))

    async def _full(self, client, values: dict[str, Any], kind: PoolKind) -> dict[str, Any]:
        self.renders += 1
        return await self.render_full(client, values, kind)

    async def render(
        self,
        client,
        values: dict[str, Any],
        kind: PoolKind | str,
        revision: str | None | object = COMPUTE,
    ) -> dict[str, Any]:
        """The Job ``render_full`` gives for ``values``, derived when it can be.

        ``revision``: ``template_revision(kind)`` when the caller already has it (a scan
        takes one per pool kind), else computed here.
        """
        kind = PoolKind(kind)
        if revision is COMPUTE:
            revision = template_revision(kind)
        tenant = validate_tenant_id(values["tenant"])
        rest = {k: v for k, v in values.items() if k != "tenant"}
        blob = json.dumps(rest, sort_keys=True, default=repr)
        if (
            not isinstance(revision, str)
            or _SERVER_REFERENCE.search(blob)
            or any(p in blob for p in PROBES)
        ):
            return await self._full(client, values, kind)
        key = (kind.value, revision, blob)
        with self._lock:
            known = key in self._entries
            if known:
                self._entries.move_to_end(key)
                entry = self._entries[key]
        if not known:  # two scans may both make it: the same entry, harmless
            entry = await self._make_entry(client, values, kind)
            with self._lock:
                self._entries[key] = entry
                while len(self._entries) > self.max_entries:
                    self._entries.popitem(last=False)
        if entry is None:
            return await self._full(client, values, kind)
        self.derived += 1
        return with_tenant(entry, PROBES[0], tenant)

    async def _make_entry(self, client, values: dict[str, Any], kind: PoolKind) -> str | None:
        """The first probe's Job as JSON text, once the second probe's Job equals it with
        the second id written in; ``None`` (render in full) otherwise."""
        first = await self._full(client, {**values, "tenant": PROBES[0]}, kind)
        self.renders += 1
        second = await _render_probe(client, {**values, "tenant": PROBES[1]}, kind)
        text = json.dumps(first)
        if json.loads(text) != first or with_tenant(text, PROBES[0], PROBES[1]) != second:
            log.warning(
                "%s Job of %s: the tenant id is not a plain substitution; rendering in full",
                kind.value,
                values.get("job_type"),
            )
            return None
        return text


# The scan's cache: one per process, shared by every tenant scanned in it.
JOB_RENDERS = JobRenderCache()
