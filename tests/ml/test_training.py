"""The recommender and the ml-training flow: quality, resume, promotion, isolation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.sparse as sp
from threadpoolctl import threadpool_limits
from typer.testing import CliRunner

from setlist.core.tenancy import SetlistError
from setlist.etl.demo import listening_table
from setlist.ml.als_solver import ALSModel, Device, cuda_backend, numpy_backend, resolve_device
from setlist.ml.recommender import (
    Split,
    TrainingParams,
    build_split,
    evaluate_factors,
    evaluate_popularity,
    train,
)

SMALL = TrainingParams(factors=32, iterations=8, regularization=0.05)


@pytest.fixture(scope="module")
def events():
    return listening_table("acme", users=800, tracks=500, events=60_000, seed=11)


@pytest.fixture(scope="module")
def split(events) -> Split:
    return build_split(events, SMALL)


# ----------------------------------------------------------------------------- model


def test_batched_solver_matches_implicits_native_solver():
    """The CuPy code path, run on NumPy, against implicit's own multi-threaded solver."""
    rng = np.random.default_rng(0)
    n_users, n_items, nnz = 1500, 400, 30_000
    conf = sp.csr_matrix(
        (
            (1 + np.log1p(rng.random(nnz) * 5)).astype(np.float32),
            (rng.integers(0, n_users, nnz), rng.integers(0, n_items, nnz)),
        ),
        shape=(n_users, n_items),
    )
    conf.sum_duplicates()
    factors = {}
    for name, backend in (("native", None), ("batched", numpy_backend())):
        with threadpool_limits(1, "blas"):
            model = ALSModel(backend=backend, factors=24, iterations=6, random_state=3)
            model.fit(conf, show_progress=False)
        factors[name] = (model.user_factors, model.item_factors)
    for native, batched in zip(factors["native"], factors["batched"], strict=True):
        assert np.abs(native - batched).max() < 1e-4 * np.abs(native).max()


def test_split_is_by_time_and_counts_only_new_tracks(events, split):
    ts = events["ts"].cast("int64").to_numpy()
    assert split.train_events == int((ts < split.cutoff_ms).sum())
    assert split.train_events + split.test_events == events.num_rows
    assert 0.75 < split.train_events / events.num_rows < 0.85
    assert list(split.user_ids) == sorted(split.user_ids)
    # a held-out track is never one the listener already played in training
    assert split.test.multiply(split.train).nnz == 0
    assert split.test.nnz > 0 and split.eval_users.size > 0.9 * split.train.shape[0]


def test_metrics_of_a_known_ranking():
    train_m = sp.csr_matrix(np.array([[1, 0, 0, 0, 0], [0, 1, 0, 0, 0]], np.float32))
    test_m = sp.csr_matrix(np.array([[0, 1, 0, 1, 0], [0, 0, 0, 0, 1]], np.float32))
    split = Split(
        user_ids=np.array(["a", "b"]),
        item_ids=np.array(list("vwxyz")),
        train=train_m,
        test=test_m,
        cutoff_ms=0,
        train_events=2,
        test_events=3,
        dropped_test_events=0,
    )
    # one factor: every user ranks items by this score; item 0 (seen by a) is filtered
    items = np.array([[9.0], [5.0], [4.0], [3.0], [1.0]], np.float32)
    m = evaluate_factors(split, np.ones((2, 1), np.float32), items)
    # a: ranking w, x, y, z → hits at ranks 1 and 3 of 2 relevant
    # b: ranking v, x, y, z (w seen) → hit at rank 4 of 1 relevant
    ndcg_a = (1 + 1 / np.log2(4)) / (1 + 1 / np.log2(3))
    ndcg_b = 1 / np.log2(5)
    assert m.ndcg_at_10 == pytest.approx((ndcg_a + ndcg_b) / 2)
    assert m.recall_at_10 == pytest.approx(1.0)
    assert m.precision_at_10 == pytest.approx((2 / 10 + 1 / 10) / 2)
    assert m.users == 2


def test_popularity_baseline_equals_ranking_by_listener_count(split):
    """The baseline's shortcut gives what ranking every track by its count gives."""
    counts = np.diff(split.train.tocsc().indptr).astype(np.float32)
    # distinct counts (ties broken by index) so both rankings are the same list
    scores = (counts * split.train.shape[1] - np.arange(counts.size))[:, None]
    ranked = evaluate_factors(split, np.ones((split.train.shape[0], 1), np.float32), scores)
    fast = evaluate_popularity(split)
    assert fast.ndcg_at_10 == pytest.approx(ranked.ndcg_at_10)
    assert fast.recall_at_10 == pytest.approx(ranked.recall_at_10)
    assert fast.precision_at_10 == pytest.approx(ranked.precision_at_10)


def test_trained_model_beats_popularity_by_at_least_20_percent(split):
    state = train(split, SMALL, Device.cpu)
    model = evaluate_factors(split, state.user_factors, state.item_factors)
    baseline = evaluate_popularity(split)
    assert model.ndcg_at_10 >= 1.2 * baseline.ndcg_at_10
    assert model.precision_at_10 > baseline.precision_at_10


def test_resuming_from_epoch_k_gives_the_uninterrupted_model(split):
    whole = train(split, SMALL, Device.cpu)

    class Stop(Exception):
        pass

    saved = {}

    def stop_at_3(state):
        if state.epoch == 3:
            saved["state"] = type(state)(
                state.epoch, state.user_factors.copy(), state.item_factors.copy(), state.history
            )
            raise Stop

    with pytest.raises(Stop):
        train(split, SMALL, Device.cpu, on_epoch=stop_at_3)
    resumed = train(split, SMALL, Device.cpu, resume=saved["state"])
    assert resumed.epoch == SMALL.iterations and resumed.history == [[0, 3], [3, 8]]
    np.testing.assert_allclose(resumed.user_factors, whole.user_factors, atol=1e-5)
    np.testing.assert_allclose(resumed.item_factors, whole.item_factors, atol=1e-5)


@pytest.mark.skipif(cuda_backend() is not None, reason="a CUDA device is present")
def test_cuda_without_a_device_is_refused_and_auto_falls_back():
    with pytest.raises(SetlistError, match="no usable CUDA device"):
        resolve_device("cuda")
    assert resolve_device("auto") is Device.cpu


@pytest.mark.skipif(cuda_backend() is None, reason="needs a CUDA device")
def test_gpu_training_matches_cpu_within_tolerance(split):
    cpu = train(split, SMALL, Device.cpu)
    gpu = train(split, SMALL, Device.cuda)
    cpu_m = evaluate_factors(split, cpu.user_factors, cpu.item_factors)
    gpu_m = evaluate_factors(split, gpu.user_factors, gpu.item_factors, Device.cuda)
    assert np.abs(cpu.user_factors - gpu.user_factors).max() < 1e-3 * np.abs(cpu.user_factors).max()
    assert abs(cpu_m.ndcg_at_10 - gpu_m.ndcg_at_10) < 0.005


# ----------------------------------------------------------------------------- the flow


async def _seed(tenant_id: str, events):
    """Onboard a tenant and give it curated events (published by the ETL's table code)."""
    import pyarrow as pa
    from prefect.client.orchestration import get_client

    from setlist.etl.demo import publish_curated
    from setlist.tenants.onboarding import TenantSpec, create_tenant
    from setlist.tenants.runtime import enter_tenant

    async with get_client() as client:
        await create_tenant(client, TenantSpec(tenant_id=tenant_id))
    storage = (await enter_tenant(tenant_id)).storage
    own = pa.array([tenant_id] * events.num_rows, pa.string())
    publish_curated(storage, events.set_column(1, "tenant_id", own))
    return tenant_id, storage


@pytest.fixture
async def trained_tenant(prefect_server, tenant_id, events):
    return await _seed(tenant_id, events)


@pytest.mark.server
async def test_flow_trains_registers_promotes_and_reruns_idempotently(trained_tenant):
    from flows.ml_training import ml_training
    from setlist.ml.model_registry import REGISTRY_KEY, load_model, read_registry

    tenant_id, storage = trained_tenant
    report = await ml_training(tenant_id, params=SMALL)
    assert report.version == "v0001" and report.promoted and report.champion == "v0001"
    assert report.metrics["ndcg_at_10"] >= 1.2 * report.baseline["ndcg_at_10"]
    assert report.resumed_from_epoch == 0 and report.epochs_run == SMALL.iterations
    registry = read_registry(storage)
    assert registry.champion == "v0001" and len(registry.versions) == 1
    model = load_model(storage, "v0001")
    assert model.user_factors.shape == (len(model.user_ids), SMALL.factors)
    assert model.meta.data.rows == 60_000 and model.meta.epochs == SMALL.iterations
    assert "NDCG@10" in storage.get_text("models/recommender/v0001/model_card.md")
    assert not storage.list_keys("models/recommender/_checkpoints")  # finished: dropped
    before = storage.get_bytes(REGISTRY_KEY)

    again = await ml_training(tenant_id, params=SMALL)
    assert again.reused and again.version == "v0001"
    assert storage.get_bytes(REGISTRY_KEY) == before


@pytest.mark.server
async def test_crash_after_epoch_k_then_rerun_resumes_at_k(trained_tenant, monkeypatch):
    import flows.ml_training as job
    from setlist.ml import training
    from setlist.ml.model_registry import load_checkpoint, load_model, training_key

    tenant_id, storage = trained_tenant
    real_save = training.save_checkpoint

    def crash_after_3(storage_, key, state):
        real_save(storage_, key, state)
        if state.epoch == 3:
            raise RuntimeError("node preempted")

    # each name is patched where it is looked up: CheckpointWriter's module, the flow's
    monkeypatch.setattr(training, "save_checkpoint", crash_after_3)
    monkeypatch.setattr(job, "fit", training.fit.with_options(retries=0))
    with pytest.raises(RuntimeError, match="preempted"):
        await job.ml_training(tenant_id, params=SMALL)
    monkeypatch.undo()

    _, snapshot = training.load_events.fn(storage)
    key = training_key(SMALL, snapshot)
    checkpoint = load_checkpoint(storage, key)
    assert checkpoint is not None and checkpoint.epoch == 3 and checkpoint.history == [[0, 3]]

    report = await job.ml_training(tenant_id, params=SMALL)
    assert report.resumed_from_epoch == 3 and report.epochs_run == SMALL.iterations - 3
    # and the result is the model an uninterrupted run gives
    events, _ = training.load_events.fn(storage)
    whole = train(build_split(events, SMALL), SMALL, Device(report.device))
    model = load_model(storage, report.version)
    # bit-for-bit on the CPU; a GPU's reductions may order sums differently
    atol = 1e-5 if report.device == "cpu" else 1e-3 * np.abs(whole.user_factors).max()
    np.testing.assert_allclose(model.user_factors, whole.user_factors, atol=atol)


@pytest.mark.server
async def test_worse_model_is_registered_but_not_promoted(trained_tenant):
    from flows.ml_training import ml_training
    from setlist.ml.model_registry import read_registry

    tenant_id, storage = trained_tenant
    good = await ml_training(tenant_id, params=SMALL)
    weak = await ml_training(
        tenant_id, params=SMALL.model_copy(update={"factors": 2, "iterations": 1})
    )
    assert good.promoted and not weak.promoted
    assert weak.version == "v0002" and weak.champion == "v0001"
    assert "not promoted" in weak.decision
    registry = read_registry(storage)
    assert registry.champion == "v0001"
    assert [p.version for p in registry.promotions] == ["v0001"]
    assert registry.get("v0002").champion_at_training["version"] == "v0001"


@pytest.mark.server
async def test_a_tenant_can_never_load_another_tenants_model(trained_tenant):
    from prefect.client.orchestration import get_client

    from flows.ml_training import ml_training
    from setlist.core.records import UnsealedRecord
    from setlist.ml.model_registry import ForeignModel, ModelNotFound, load_model, read_registry
    from setlist.tenants.onboarding import TenantSpec, create_tenant
    from setlist.tenants.runtime import enter_tenant

    owner, owner_storage = trained_tenant
    await ml_training(owner, params=SMALL)
    other = owner[:40].rstrip("-") + "-b"
    async with get_client() as client:
        await create_tenant(client, TenantSpec(tenant_id=other))
    other_storage = (await enter_tenant(other)).storage

    with pytest.raises(ModelNotFound):
        load_model(other_storage, "v0001")
    for hostile in ("../" + owner + "/models/recommender/v0001", "v1/../../x", "champion"):
        with pytest.raises(ModelNotFound, match="not a version name"):
            load_model(other_storage, hostile)
    # even the owner's files copied into the other tenant's storage are refused
    for key in owner_storage.list_keys("models/recommender"):
        other_storage.put_bytes(key, owner_storage.get_bytes(key))
    with pytest.raises(ForeignModel, match="only load its own"):
        load_model(other_storage, "v0001")
    with pytest.raises(UnsealedRecord, match="does not verify"):
        read_registry(other_storage)  # sealed for the owner, at the owner's prefix


@pytest.mark.server
async def test_a_planted_registry_or_model_file_is_refused(trained_tenant):
    """The tenant's credential can write under ``models/``: an edited registry (a
    champion of its choosing) or a model file swapped under the registry is refused."""
    import json

    from flows.ml_training import ml_training
    from setlist.core.records import UnsealedRecord
    from setlist.ml.model_registry import REGISTRY_KEY, load_model, read_registry

    owner, storage = trained_tenant
    await ml_training(owner, params=SMALL)
    registry = read_registry(storage)
    version = registry.champion or registry.versions[0].version
    model_key = f"models/recommender/{version}/model.npz"
    real = storage.get_bytes(model_key)
    assert load_model(storage, version, registry).meta.version == version

    storage.put_bytes(model_key, real[:-16] + b"\0" * 16)
    with pytest.raises(UnsealedRecord, match="digest differs"):
        load_model(storage, version, registry)
    storage.put_bytes(model_key, real)

    sealed = storage.get_bytes(REGISTRY_KEY)
    edited = json.loads(sealed)
    edited["champion"] = None
    storage.put_bytes(REGISTRY_KEY, json.dumps(edited).encode())
    with pytest.raises(UnsealedRecord):
        read_registry(storage)
    with pytest.raises(UnsealedRecord):
        await ml_training(owner, params=SMALL)
    storage.put_bytes(REGISTRY_KEY, sealed)
    assert read_registry(storage) == registry


@pytest.mark.server
def test_models_cli_lists_shows_and_promotes(prefect_server, tenant_id, events):
    import anyio

    from flows.ml_training import ml_training
    from setlist.cli import app

    async def seed_and_train():
        await _seed(tenant_id, events)
        await ml_training(tenant_id, params=SMALL)
        await ml_training(
            tenant_id, params=SMALL.model_copy(update={"factors": 2, "iterations": 1})
        )

    anyio.run(seed_and_train)
    runner = CliRunner()

    def cli(*args):
        return runner.invoke(app, list(args))

    r = cli("models", "list", "--tenant", tenant_id, "--json")
    assert r.exit_code == 0, r.output
    listed = json.loads(r.output)
    assert listed["champion"] == "v0001" and len(listed["versions"]) == 2
    r = cli("models", "show", "--tenant", tenant_id, "v0002")
    assert r.exit_code == 0 and "# Recommender v0002" in r.output
    r = cli("models", "promote", "--tenant", tenant_id, "v0002", "--reason", "rollback drill")
    assert r.exit_code == 0, r.output
    assert (
        json.loads(cli("models", "list", "--tenant", tenant_id, "--json").output)["champion"]
        == "v0002"
    )
    r = cli("models", "promote", "--tenant", tenant_id, "v0009")
    assert r.exit_code == 2 and "no model 'v0009'" in r.output
