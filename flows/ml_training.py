"""ML training: a tenant's curated events → an ALS recommender, checkpointed, registered.

The run resumes from its last checkpoint when it is retried or re-run on the same data
with the same parameters (the training key), and the model it produces becomes the
tenant's champion only if it beats both the popularity baseline and the current
champion on this run's hold-out. A re-run of a finished training registers nothing new.

The steps are ``setlist.ml.training``; this flow runs them and publishes the artifacts
and audit events. The names in ``__all__`` stay importable from here, for results stored by
runs made before the steps moved.
"""

from __future__ import annotations

import time
from typing import Annotated, Any

from prefect import flow, get_run_logger
from prefect.artifacts import acreate_markdown_artifact, acreate_table_artifact
from prefect.client.orchestration import get_client
from pydantic import Field

from setlist.core import audit
from setlist.core.storage import TenantStorage
from setlist.ml.als_solver import Device, resolve_device
from setlist.ml.model_registry import (
    ModelVersion,
    drop_checkpoint,
    model_card,
    read_registry,
    training_key,
)
from setlist.ml.recommender import TrainingParams
from setlist.ml.training import (
    Evaluation,
    TrainingReport,
    evaluate,
    fit,
    load_events,
    prepare,
    register,
)
from setlist.tenants.runtime import JOB_FLOW, enter_tenant
from setlist.tenants.usage import ensure_within_storage_quota

__all__ = ["TrainingReport", "ml_training"]


async def _publish(report: TrainingReport, meta: ModelVersion, scores: Evaluation) -> None:
    named = [(meta.version, scores.model), ("popularity baseline", scores.baseline)]
    if scores.champion is not None:
        named.append((f"champion {scores.champion_version}", scores.champion))
    rows = [{"model": name, **m.as_dict()} for name, m in named]
    await acreate_table_artifact(
        key=f"ml-training-{report.tenant_id}",
        table=rows,
        description=f"hold-out metrics of {meta.version}: {meta.decision}",
    )
    await acreate_markdown_artifact(
        key=f"model-card-{report.tenant_id}",
        markdown=model_card(meta),
        description=f"model card of {meta.version}",
    )
    async with get_client() as client:
        await audit.emit(
            client,
            "setlist.ml.trained",
            report.tenant_id,
            obj=(f"setlist.model.{report.tenant_id}.recommender.{meta.version}", "model"),
            payload=report.model_dump(),
        )
        if report.promoted:
            await audit.emit(
                client,
                "setlist.ml.promoted",
                report.tenant_id,
                obj=(f"setlist.model.{report.tenant_id}.recommender.{meta.version}", "model"),
                payload={"version": meta.version, "reason": meta.decision},
            )


def _report(storage: TenantStorage, meta: ModelVersion, t0: float, **run: Any) -> TrainingReport:
    return TrainingReport(
        tenant_id=meta.tenant_id,
        version=meta.version,
        training_key=meta.training_key,
        promoted=meta.promoted,
        decision=meta.decision,
        champion=read_registry(storage).champion,
        device=meta.device,
        metrics=meta.metrics,
        baseline=meta.baseline,
        seconds=round(time.perf_counter() - t0, 3),
        **run,
    )


@flow(name="ml-training", log_prints=True, persist_result=True, **JOB_FLOW)
async def ml_training(
    tenant_id: str,
    params: TrainingParams = TrainingParams(),  # noqa: B008 - a pydantic form in the UI
    device: Device = Device.auto,
    checkpoint_every: Annotated[int, Field(ge=1, le=100, description="epochs")] = 1,
    min_gain: Annotated[
        float, Field(ge=0, le=10, description="relative NDCG@10 gain needed to promote")
    ] = 0.0,
) -> TrainingReport:
    """Train the tenant's recommender on its curated events; promote it if it is better."""
    t0 = time.perf_counter()
    tenant = await enter_tenant(tenant_id)
    storage = tenant.storage
    logger = get_run_logger()
    await ensure_within_storage_quota(tenant, "ml-training")
    used = resolve_device(device)
    events, snapshot = load_events(storage)
    key = training_key(params, snapshot)
    done = read_registry(storage).by_key(key)
    if done is not None:
        logger.info("training %s already registered as %s; nothing to do", key, done.version)
        drop_checkpoint(storage, key)  # left behind if a run died right after registering
        return _report(storage, done, t0, reused=True)
    split = prepare(events, params)
    del events
    logger.info(
        "%s listeners × %s tracks, %s training pairs; %s listeners in the hold-out; device %s",
        *split.train.shape,
        split.train.nnz,
        split.eval_users.size,
        used.value,
    )
    state, start = fit(storage, split, params, used, key, checkpoint_every)
    scores = evaluate(storage, split, state, used)
    meta = await register(storage, key, split, state, snapshot, params, used, scores, min_gain)
    report = _report(storage, meta, t0, resumed_from_epoch=start, epochs_run=state.epoch - start)
    logger.info("%s: %s", meta.version, meta.decision)
    await _publish(report, meta, scores)
    return report
