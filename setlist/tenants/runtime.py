"""What every Setlist flow does first: prove which tenant it runs for, then get its handles.

A run's tenant comes from its ``tenant_id`` parameter, which anyone with the UI can
edit. The queue a run was dispatched from and the tags it was created with can't be
changed from a run form in the same way, so a run whose parameter disagrees with its
queue or tags is refused before it touches any data.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from prefect.context import FlowRunContext

from blocks.tenant import TenantProfile
from setlist.core import tracing
from setlist.core.process_usage import TreeUsage
from setlist.core.run_names import name_this_run
from setlist.core.storage import TenantStorage, tenant_storage
from setlist.core.tenancy import SetlistError, parse_queue_name, validate_tenant_id
from setlist.tenants.onboarding import read_active_profile, read_profile
from setlist.tenants.storage_identity import tenant_store_config

if TYPE_CHECKING:
    from blocks.storage import LocalStorageConfig, S3StorageConfig

# Every flow imports this module first: its process exports spans when OTLP is configured.
tracing.configure()


class TenantMismatch(SetlistError):
    """A run whose tenant parameter is not the tenant of its queue or deployment."""


@dataclass(frozen=True)
class TenantContext:
    profile: TenantProfile
    storage: TenantStorage
    # What ``storage`` was opened with: on S3 the tenant's own credential, never the
    # platform's (worker processes of a job open their own handles from it).
    storage_config: LocalStorageConfig | S3StorageConfig | None = None

    @property
    def tenant_id(self) -> str:
        return self.profile.tenant_id


def check_run_tenant(tenant_id: str, queue_name: str | None, tags: list[str]) -> None:
    """Refuse a run whose queue or tags belong to a tenant other than ``tenant_id``."""
    if queue_name:
        parsed = parse_queue_name(queue_name)
        if parsed is None:  # the pool's `default` queue too: it bypasses bands and grants
            raise TenantMismatch(f"work queue {queue_name!r} is not a Setlist tenant queue")
        if parsed is not None and parsed[0] != tenant_id:
            raise TenantMismatch(
                f"run for tenant {tenant_id!r} was dispatched from queue {queue_name!r} "
                f"of tenant {parsed[0]!r}; runs may only use their own tenant's queues"
            )
    tagged = {t.split(":", 1)[1] for t in tags if t.startswith("tenant:")}
    if tagged - {tenant_id}:
        raise TenantMismatch(
            f"run for tenant {tenant_id!r} carries tags of tenant(s) {sorted(tagged)}; "
            "a run's tenant parameter must match its deployment's tenant"
        )


async def enter_tenant(tenant_id: str, *, active_only: bool = True) -> TenantContext:
    """Validate the running flow's tenant and return its profile and storage handle.

    On an S3 store the handle holds the tenant's own credential (its identity block,
    ``setlist.tenants.storage_identity``), which reaches its own prefix only.

    ``active_only=False`` is for flows that protect a tenant's data (backups, restores):
    a suspended tenant's data still needs them.
    """
    validate_tenant_id(tenant_id)
    ctx = FlowRunContext.get()
    if ctx is not None and ctx.flow_run is not None:
        check_run_tenant(tenant_id, ctx.flow_run.work_queue_name, list(ctx.flow_run.tags))
    profile = await (read_active_profile if active_only else read_profile)(tenant_id)
    config = await tenant_store_config(tenant_id, profile.storage_block)
    return TenantContext(
        profile=profile, storage=tenant_storage(tenant_id, config), storage_config=config
    )


_sampling: dict[str, TreeUsage] = {}  # flow run id → its sampler, in the run's process


def measure_usage(flow: Any, flow_run: Any, state: Any) -> None:
    """Flow hook (running): start sampling the run's process tree."""
    key = str(flow_run.id)
    if key not in _sampling:
        try:
            _sampling[key] = TreeUsage().start()
        except Exception as exc:  # noqa: BLE001 - usage is best-effort
            _logger().warning("cannot sample the usage of run %s: %s", flow_run.id, exc)


def _usage_of(flow_run: Any) -> dict[str, float]:
    sampler = _sampling.pop(str(flow_run.id), None)
    if sampler is not None:
        usage = sampler.stop()
        return {
            "setlist.usage.cpu_s": usage.cpu_s,
            "setlist.usage.max_rss_mib": usage.max_rss_mib,
            "setlist.usage.processes": usage.processes,
        }
    import resource  # no sampler (it could not start): the flow's own process at least

    own = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "setlist.usage.cpu_s": round(own.ru_utime + own.ru_stime, 3),
        "setlist.usage.max_rss_mib": round(own.ru_maxrss / 1024, 1),  # Linux: KiB
    }


async def record_usage(flow: Any, flow_run: Any, state: Any) -> None:
    """Flow hook (completion, failure, crash, cancellation): label the run with what it
    used, every process of it (``setlist.core.process_usage``).

    Each run has a process of its own on the process pool and a pod of its own on
    Kubernetes, so its process tree is the run's. The labels feed ``setlist report
    resources``. Never fails the run: usage is best-effort.
    """
    from prefect.client.orchestration import get_client

    labels = _usage_of(flow_run)
    try:
        async with get_client() as client:
            await client.update_flow_run_labels(flow_run.id, labels)
    except Exception as exc:  # noqa: BLE001 - a label is never worth a failed run
        _logger().warning("could not record usage of run %s: %s", flow_run.id, exc)


def _logger():
    from prefect.logging import get_logger

    return get_logger("setlist")


USAGE_HOOKS = {
    "on_running": [measure_usage],
    "on_completion": [record_usage],
    "on_failure": [record_usage],
    "on_crashed": [record_usage],
    "on_cancellation": [record_usage],
}
# What every job flow's decorator takes: the usage hooks, and the run's seed-style name
# (set when the run starts, however it was started).
JOB_FLOW = {**USAGE_HOOKS, "flow_run_name": name_this_run}
