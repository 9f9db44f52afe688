"""A tenant's model registry and training checkpoints, in the tenant's own storage.

Layout under the tenant's storage::

    models/recommender/registry.json               every version, and which is champion
    models/recommender/v0003/model.npz             factors and the ids they belong to
    models/recommender/v0003/model_card.md
    models/recommender/_checkpoints/<key>.npz      the latest epoch of an unfinished run

Everything goes through a ``TenantStorage``, which can only address its own tenant's
keys; on top of that each model file names the tenant it was trained for, and loading
it through another tenant's handle is refused. Version names are checked before they
become keys. ``registry.json`` is replaced by one write, so a reader sees the registry
before or after a registration, never half of it; model files are written first.

A training run is identified by its *training key*: the hash of its parameters and
the exact curated table it read. A re-run with the same key resumes from that key's
checkpoint, and once registered the same key is never registered twice.
"""

from __future__ import annotations

import hashlib
import io
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
import orjson
from pydantic import BaseModel, Field

from setlist.core import records
from setlist.core.storage import ObjectNotFound, TenantStorage
from setlist.core.tenancy import SetlistError
from setlist.ml.recommender import Metrics, TrainingParams, TrainState

ROOT = "models/recommender/"
REGISTRY_KEY = ROOT + "registry.json"
CHECKPOINTS = ROOT + "_checkpoints/"
ALGORITHM = "implicit-als-cg/1"  # bump when a change makes old checkpoints unusable
_VERSION = re.compile(r"v\d{4,6}")


class ModelNotFound(SetlistError):
    """No such model version for this tenant."""


class ForeignModel(SetlistError):
    """A model file that belongs to another tenant."""


class DataSnapshot(BaseModel):
    """Which curated table a model was trained on."""

    table_version: int
    manifest_sha256: str
    rows: int
    cutoff: str = ""
    train_events: int = 0
    test_events: int = 0


class ModelVersion(BaseModel):
    version: str
    training_key: str
    tenant_id: str
    created_at: str
    flow_run_id: str | None = None
    algorithm: str = ALGORITHM
    device: str
    epochs: int
    params: dict[str, Any]
    data: DataSnapshot
    metrics: dict[str, float | int]
    baseline: dict[str, float | int]
    champion_at_training: dict[str, Any] | None = None
    promoted: bool = False
    decision: str = ""
    model_sha256: str = ""  # of model.npz; set in the registry's entry, after the write


class Promotion(BaseModel):
    version: str
    at: str
    by: str
    reason: str


class Registry(BaseModel):
    tenant_id: str
    champion: str | None = None
    versions: list[ModelVersion] = Field(default_factory=list)
    promotions: list[Promotion] = Field(default_factory=list)

    def get(self, version: str) -> ModelVersion:
        for v in self.versions:
            if v.version == version:
                return v
        known = ", ".join(v.version for v in self.versions) or "none"
        raise ModelNotFound(f"tenant {self.tenant_id!r} has no model {version!r}; has: {known}")

    def by_key(self, training_key: str) -> ModelVersion | None:
        return next((v for v in self.versions if v.training_key == training_key), None)

    def next_version(self) -> str:
        return f"v{len(self.versions) + 1:04d}"


@dataclass
class LoadedModel:
    meta: ModelVersion
    user_ids: np.ndarray
    item_ids: np.ndarray
    user_factors: np.ndarray
    item_factors: np.ndarray


def check_version(version: str) -> str:
    if not isinstance(version, str) or not _VERSION.fullmatch(version):
        raise ModelNotFound(f"model version {version!r} is not a version name like 'v0001'")
    return version


def training_key(params: TrainingParams, data: DataSnapshot) -> str:
    payload = orjson.dumps(
        {
            "algorithm": ALGORITHM,
            "params": params.model_dump(mode="json"),
            "manifest": data.manifest_sha256,
        },
        option=orjson.OPT_SORT_KEYS,
    )
    return hashlib.sha256(payload).hexdigest()[:32]


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


# ----------------------------------------------------------------------------- registry


def read_registry(storage: TenantStorage) -> Registry:
    """The tenant's registry (empty before the first registration). One the platform did
    not seal for this tenant is refused (``UnsealedRecord``): a planted registry would
    choose which model file serves as champion."""
    try:
        registry = Registry.model_validate(records.read_record(storage, REGISTRY_KEY))
    except ObjectNotFound:
        return Registry(tenant_id=storage.tenant_id)
    if registry.tenant_id != storage.tenant_id:
        raise ForeignModel(
            f"the registry in tenant {storage.tenant_id!r}'s storage belongs to "
            f"{registry.tenant_id!r}; refusing to use it"
        )
    return registry


def write_registry(storage: TenantStorage, registry: Registry) -> None:
    records.write_record(storage, REGISTRY_KEY, registry.model_dump(mode="json"))


def _npz(**arrays: np.ndarray) -> bytes:
    sink = io.BytesIO()
    np.savez(sink, **arrays)
    return sink.getvalue()


def _load_npz(data: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}


def save_model(
    storage: TenantStorage,
    meta: ModelVersion,
    state: TrainState,
    user_ids: np.ndarray,
    item_ids: np.ndarray,
    card: str,
) -> str:
    """Write a version's files (before the registry names it); the model file's SHA-256,
    which the registry's sealed entry keeps."""
    prefix = ROOT + check_version(meta.version) + "/"
    data = _npz(
        tenant_id=np.asarray(storage.tenant_id),
        meta=np.frombuffer(meta.model_dump_json().encode(), dtype=np.uint8),
        user_ids=np.asarray(user_ids, dtype=str),
        item_ids=np.asarray(item_ids, dtype=str),
        user_factors=state.user_factors,
        item_factors=state.item_factors,
    )
    storage.put_bytes(prefix + "model.npz", data)
    storage.put_text(prefix + "model_card.md", card)
    return hashlib.sha256(data).hexdigest()


def load_model(
    storage: TenantStorage, version: str, registry: Registry | None = None
) -> LoadedModel:
    """A version's factors, from this tenant's storage only; with the ``registry``, only
    the very file its sealed entry names (a file planted over it is refused)."""
    key = ROOT + check_version(version) + "/model.npz"
    try:
        data = storage.get_bytes(key)
    except ObjectNotFound:
        raise ModelNotFound(f"tenant {storage.tenant_id!r} has no model {version!r}") from None
    if registry is not None:
        records.check_bytes(key, data, registry.get(version).model_sha256)
    arrays = _load_npz(data)
    owner = str(arrays["tenant_id"])
    if owner != storage.tenant_id:
        raise ForeignModel(
            f"model {version!r} in tenant {storage.tenant_id!r}'s storage was trained for "
            f"tenant {owner!r}; a tenant can only load its own models"
        )
    return LoadedModel(
        meta=ModelVersion.model_validate_json(arrays["meta"].tobytes()),
        user_ids=arrays["user_ids"],
        item_ids=arrays["item_ids"],
        user_factors=arrays["user_factors"],
        item_factors=arrays["item_factors"],
    )


def read_card(storage: TenantStorage, version: str) -> str:
    try:
        return storage.get_text(ROOT + check_version(version) + "/model_card.md")
    except ObjectNotFound:
        raise ModelNotFound(f"tenant {storage.tenant_id!r} has no model {version!r}") from None


def set_champion(registry: Registry, version: str, by: str, reason: str) -> Registry:
    registry.get(version)
    registry.champion = version
    for v in registry.versions:
        v.promoted = v.promoted or v.version == version
    registry.promotions.append(Promotion(version=version, at=now(), by=by, reason=reason))
    return registry


def decide(
    metrics: Metrics, baseline: Metrics, champion: Metrics | None, min_gain: float
) -> tuple[bool, str]:
    """Promote only a model that beats the popularity baseline and the current champion
    (both scored on this run's hold-out) on NDCG@10 by more than ``min_gain``."""
    need_baseline = baseline.ndcg_at_10 * (1 + min_gain)
    if metrics.ndcg_at_10 <= need_baseline:
        return False, (
            f"not promoted: NDCG@10 {metrics.ndcg_at_10:.4f} does not beat the popularity "
            f"baseline's {baseline.ndcg_at_10:.4f} by more than {min_gain:.0%}"
        )
    if champion is not None and metrics.ndcg_at_10 <= champion.ndcg_at_10 * (1 + min_gain):
        return False, (
            f"not promoted: NDCG@10 {metrics.ndcg_at_10:.4f} does not beat the champion's "
            f"{champion.ndcg_at_10:.4f} on the same hold-out by more than {min_gain:.0%}"
        )
    against = "the champion" if champion is not None else "no champion yet"
    return True, (
        f"promoted: NDCG@10 {metrics.ndcg_at_10:.4f} beats the baseline "
        f"({baseline.ndcg_at_10:.4f}) and {against}"
        + (f" ({champion.ndcg_at_10:.4f})" if champion is not None else "")
    )


# ----------------------------------------------------------------------------- checkpoints


def checkpoint_key(key: str) -> str:
    if not re.fullmatch(r"[0-9a-f]{32}", key):
        raise SetlistError(f"training key {key!r} is not a 32-digit hex hash")
    return CHECKPOINTS + key + ".npz"


def save_checkpoint(storage: TenantStorage, key: str, state: TrainState) -> None:
    """The state after an epoch; replaces the previous one in one write."""
    storage.put_bytes(
        checkpoint_key(key),
        _npz(
            tenant_id=np.asarray(storage.tenant_id),
            epoch=np.asarray(state.epoch),
            history=np.asarray(state.history, dtype=np.int64).reshape(-1, 2),
            user_factors=state.user_factors,
            item_factors=state.item_factors,
        ),
    )


def load_checkpoint(storage: TenantStorage, key: str) -> TrainState | None:
    try:
        arrays = _load_npz(storage.get_bytes(checkpoint_key(key)))
    except ObjectNotFound:
        return None
    if str(arrays["tenant_id"]) != storage.tenant_id:
        raise ForeignModel("checkpoint belongs to another tenant; refusing to resume from it")
    return TrainState(
        epoch=int(arrays["epoch"]),
        user_factors=arrays["user_factors"],
        item_factors=arrays["item_factors"],
        history=arrays["history"].tolist(),
    )


def drop_checkpoint(storage: TenantStorage, key: str) -> None:
    storage.delete(checkpoint_key(key))


# ----------------------------------------------------------------------------- card


def model_card(meta: ModelVersion) -> str:
    m, b = meta.metrics, meta.baseline
    champ = meta.champion_at_training or {}
    rows = [
        ("precision@10", "precision_at_10"),
        ("recall@10", "recall_at_10"),
        ("NDCG@10", "ndcg_at_10"),
    ]
    table = "\n".join(
        f"| {label} | {m[k]:.4f} | {b[k]:.4f} | "
        + (f"{champ['metrics'][k]:.4f} |" if champ else "– |")
        for label, k in rows
    )
    params = "\n".join(f"- `{k}`: {v}" for k, v in sorted(meta.params.items()))
    return f"""# Recommender {meta.version} — tenant `{meta.tenant_id}`

Trained {meta.created_at} on `{meta.device}` for {meta.epochs} ALS epochs
({meta.algorithm}); flow run `{meta.flow_run_id or "-"}`.

## What it does
Ranks tracks for a listener of this tenant from their listening history (implicit
feedback: plays weighted by how long they lasted). It only knows listeners and tracks
present in its training data; new ones get no personal ranking.

## Data
Curated events table version {meta.data.table_version} ({meta.data.rows} events,
manifest sha256 `{meta.data.manifest_sha256[:16]}…`). Time split at {meta.data.cutoff}:
{meta.data.train_events} events before it train the model, {meta.data.test_events} after
it are held out.

## Evaluation (hold-out, tracks new to each listener)
| metric | this model | popularity baseline | champion at training |
| --- | --- | --- | --- |
{table}

Listeners evaluated: {m["users"]}.

## Decision
{meta.decision}

## Parameters
{params}

## Limits
Popularity and recency beyond the split are not modelled; a listener whose taste
changed after the cutoff is served their old taste until the next training.
"""


# ----------------------------------------------------------------------------- operators


async def promote(tenant_id: str, version: str, reason: str) -> Registry:
    """Make ``version`` the tenant's champion by hand (a rollback, say); audited."""
    from prefect.client.orchestration import get_client

    from setlist.core import audit
    from setlist.dispatch.locks import tenant_lock
    from setlist.tenants.runtime import enter_tenant

    storage = (await enter_tenant(tenant_id)).storage
    check_version(version)
    async with tenant_lock(tenant_id, "models"):
        registry = read_registry(storage)
        load_model(storage, version, registry)  # it must exist and be this tenant's
        previous = registry.champion
        set_champion(registry, version, by=audit.current_actor(), reason=reason)
        write_registry(storage, registry)
    async with get_client() as client:
        await audit.emit(
            client,
            "setlist.ml.promoted",
            tenant_id,
            obj=(f"setlist.model.{tenant_id}.recommender.{version}", "model"),
            payload={"version": version, "previous": previous, "reason": reason},
        )
    return registry


async def tenant_registry(tenant_id: str) -> tuple[TenantStorage, Registry]:
    from setlist.tenants.runtime import enter_tenant

    storage = (await enter_tenant(tenant_id)).storage
    return storage, read_registry(storage)
