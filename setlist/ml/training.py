"""The steps of a tenant's recommender training, as tasks: load, prepare, fit (from the
last checkpoint), evaluate, register.

A training resumes from its last checkpoint when it is retried or re-run on the same
data with the same parameters (the training key), and its model becomes the tenant's
champion only if it beats both the popularity baseline and the current champion on
this run's hold-out. The steps live here, not in the ``ml-training`` flow, so that each
can be run and tested on its own; the flow adds the tenant check, the artifacts and the
audit events.
"""

from __future__ import annotations

import hashlib
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.context import FlowRunContext
from pydantic import BaseModel, Field

from setlist.core import audit
from setlist.core.storage import TenantStorage
from setlist.dispatch.locks import tenant_lock
from setlist.etl.curated import Manifest, read_manifest, read_table
from setlist.ml.als_solver import Device
from setlist.ml.model_registry import (
    DataSnapshot,
    ModelVersion,
    Registry,
    decide,
    drop_checkpoint,
    load_checkpoint,
    load_model,
    model_card,
    now,
    read_registry,
    save_checkpoint,
    save_model,
    set_champion,
    write_registry,
)
from setlist.ml.recommender import (
    Metrics,
    Split,
    TrainingParams,
    TrainState,
    align_factors,
    build_split,
    evaluate_factors,
    evaluate_popularity,
    train,
)

COLUMNS = ["user_id", "track_id", "ts", "ms_played"]


class TrainingReport(BaseModel):
    tenant_id: str
    version: str
    training_key: str
    promoted: bool
    decision: str
    champion: str | None
    device: str
    resumed_from_epoch: int = 0
    epochs_run: int = 0
    metrics: dict[str, float | int] = Field(default_factory=dict)
    baseline: dict[str, float | int] = Field(default_factory=dict)
    reused: bool = False
    seconds: float = 0.0


@dataclass
class Evaluation:
    model: Metrics
    baseline: Metrics
    champion: Metrics | None
    champion_version: str | None


def fingerprint(manifest: Manifest) -> str:
    """The table's content identity: its partition files, not when they were published.
    Files a stream appended count too (after the canonical ones, so a table without any
    keeps the identity it always had)."""
    lines = [f"{d} {p.sha256}" for d, p in sorted(manifest.partitions.items())]
    lines += [
        f"{d} append {p.sha256}" for d in sorted(manifest.appended) for p in manifest.appended[d]
    ]
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


@task(retries=2, retry_delay_seconds=[2, 10], cache_policy=NO_CACHE, persist_result=False)
def load_events(storage: TenantStorage) -> tuple[pa.Table, DataSnapshot]:
    """One published version of the curated events (the columns training needs)."""
    manifest = read_manifest(storage)
    events = read_table(storage, manifest, COLUMNS)
    snapshot = DataSnapshot(
        table_version=manifest.version, manifest_sha256=fingerprint(manifest), rows=events.num_rows
    )
    return events, snapshot


@task(cache_policy=NO_CACHE, persist_result=False)
def prepare(events: pa.Table, params: TrainingParams) -> Split:
    """Feedback matrix and time-based hold-out."""
    return build_split(events, params)


class CheckpointWriter:
    """Writes checkpoints on a background thread, so an epoch never waits on storage.

    At most one write is in flight: the next save (and leaving the block) waits for it
    and re-raises its error, so training never runs ahead of a failing store. Each
    write replaces the checkpoint atomically; a crash loses at most the write in flight.
    """

    def __init__(self, storage: TenantStorage, key: str):
        self.storage, self.key = storage, key
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="checkpoint")
        self._pending: Future | None = None

    def submit(self, state: TrainState) -> None:
        # implicit updates the factors in place during the next epoch: write a copy
        snapshot = TrainState(
            epoch=state.epoch,
            user_factors=state.user_factors.copy(),
            item_factors=state.item_factors.copy(),
            history=[list(h) for h in state.history],
        )
        self.wait()
        self._pending = self._pool.submit(save_checkpoint, self.storage, self.key, snapshot)

    def wait(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def __enter__(self) -> CheckpointWriter:
        return self

    def __exit__(self, exc_type, *_: object) -> None:
        try:
            if exc_type is None:
                self.wait()
            elif self._pending is not None:
                self._pending.cancel()
        finally:
            self._pool.shutdown(wait=True)


@task(retries=2, retry_delay_seconds=[5, 30], cache_policy=NO_CACHE, persist_result=False)
def fit(
    storage: TenantStorage,
    split: Split,
    params: TrainingParams,
    device: Device,
    key: str,
    checkpoint_every: int,
) -> tuple[TrainState, int]:
    """Train from the key's checkpoint (if any), checkpointing every few epochs.

    A retry of this task, a retry of the flow and a new run on the same data and
    parameters all land here with the same key and go on from the last checkpoint.
    """
    logger = get_run_logger()
    resume = load_checkpoint(storage, key)
    start = resume.epoch if resume else 0
    if resume:
        logger.info("resuming from the checkpoint of epoch %s/%s", start, params.iterations)

    with CheckpointWriter(storage, key) as writer:

        def on_epoch(state: TrainState) -> None:
            if state.epoch % checkpoint_every == 0 or state.epoch == params.iterations:
                writer.submit(state)

        state = train(split, params, device, resume=resume, on_epoch=on_epoch)
    return state, start


def _score_version(
    storage: TenantStorage, split: Split, registry: Registry, version: str, device: Device
) -> Metrics:
    """A registered model scored on this split (its listeners/tracks matched by id)."""
    live = load_model(storage, version, registry)
    return evaluate_factors(
        split,
        align_factors(live.user_ids, live.user_factors, split.user_ids),
        align_factors(live.item_ids, live.item_factors, split.item_ids),
        device,
    )


@task(cache_policy=NO_CACHE, persist_result=False)
def evaluate(storage: TenantStorage, split: Split, state: TrainState, device: Device) -> Evaluation:
    """The model, the popularity baseline and the current champion on this hold-out."""
    registry = read_registry(storage)
    champion = registry.champion
    return Evaluation(
        model=evaluate_factors(split, state.user_factors, state.item_factors, device),
        baseline=evaluate_popularity(split),
        champion=_score_version(storage, split, registry, champion, device) if champion else None,
        champion_version=champion,
    )


@task(retries=2, retry_delay_seconds=[2, 10], cache_policy=NO_CACHE, persist_result=False)
async def register(
    storage: TenantStorage,
    key: str,
    split: Split,
    state: TrainState,
    snapshot: DataSnapshot,
    params: TrainingParams,
    device: Device,
    scores: Evaluation,
    min_gain: float,
) -> ModelVersion:
    """Store the version, decide promotion and publish the registry, under the tenant's
    models lock so two trainings never register at once."""
    async with tenant_lock(storage.tenant_id, "models"):
        registry = read_registry(storage)
        existing = registry.by_key(key)
        if existing is not None:
            return existing
        # The champion may have changed since evaluation; decide against the one now live.
        champion = scores.champion if registry.champion == scores.champion_version else None
        if registry.champion is not None and champion is None:
            champion = _score_version(storage, split, registry, registry.champion, device)
        promote, reason = decide(scores.model, scores.baseline, champion, min_gain)
        ctx = FlowRunContext.get()
        meta = ModelVersion(
            version=registry.next_version(),
            training_key=key,
            tenant_id=storage.tenant_id,
            created_at=now(),
            flow_run_id=str(ctx.flow_run.id) if ctx and ctx.flow_run else None,
            device=device.value,
            epochs=state.epoch,
            params=params.model_dump(mode="json"),
            data=snapshot.model_copy(
                update={
                    "cutoff": str(np.datetime64(split.cutoff_ms, "ms")) + "Z",
                    "train_events": split.train_events,
                    "test_events": split.test_events,
                }
            ),
            metrics=scores.model.as_dict(),
            baseline=scores.baseline.as_dict(),
            champion_at_training=(
                {"version": registry.champion, "metrics": champion.as_dict()}
                if champion is not None
                else None
            ),
            decision=reason,
        )
        meta.model_sha256 = save_model(
            storage, meta, state, split.user_ids, split.item_ids, model_card(meta)
        )
        registry.versions.append(meta)
        if promote:
            set_champion(registry, meta.version, by=audit.current_actor(), reason=reason)
            meta.promoted = True
        write_registry(storage, registry)
    drop_checkpoint(storage, key)
    return meta
