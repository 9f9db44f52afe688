"""The tenant recommender: listening events → implicit feedback → ALS → ranked tracks.

Pure computation, no Prefect and no storage: the flow and the benchmark call the same
functions, so what the benchmark calls "raw" is exactly the flow's work minus the
platform around it.

Feedback. A (listener, track) pair's weight is its plays, each counted by the share of
``full_play_ms`` it lasted (a 3 s skip is 0.1 of a play, anything past 30 s one play);
the confidence implicit gets is ``1 + log1p(plays)`` (times ``alpha`` inside implicit).

Split. By time: the latest ``holdout_share`` of events (by timestamp) are held out.
The model learns on the rest and is asked, for each listener seen in training, for
the 10 tracks they will newly play — tracks already in their training history are
neither recommended nor counted as hits.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import scipy.sparse as sp
from implicit.cpu.topk import topk
from pydantic import BaseModel, Field
from threadpoolctl import threadpool_limits

from setlist.core.tenancy import SetlistError
from setlist.ml.als_solver import ALSModel, Device, cuda_backend, make_model, resolve_device

K = 10
EVAL_BATCH = 1024  # listeners scored at once: bounds the (batch × tracks) score matrix


class NotEnoughData(SetlistError):
    """The tenant's curated events can't support a training run (and why)."""


class TrainingParams(BaseModel):
    """Hyper-parameters of one training run; everything that changes the model."""

    factors: int = Field(64, ge=2, le=1024, description="latent factors per listener/track")
    regularization: float = Field(0.05, ge=0.0, le=100.0, description="L2 on the factors")
    alpha: float = Field(4.0, gt=0.0, le=1000.0, description="weight of observed plays")
    iterations: int = Field(15, ge=1, le=500, description="ALS epochs")
    cg_steps: int = Field(3, ge=1, le=20, description="conjugate-gradient steps per epoch")
    holdout_share: float = Field(0.2, gt=0.0, lt=0.9, description="latest events held out")
    full_play_ms: int = Field(30_000, ge=1000, description="ms at which a play counts fully")
    seed: int = Field(7, description="random initialisation of the factors")


@dataclass
class Split:
    """Training matrix and hold-out of one dataset, indexed by sorted ids."""

    user_ids: np.ndarray  # str, sorted
    item_ids: np.ndarray  # str, sorted
    train: sp.csr_matrix  # users × items confidences (before alpha)
    test: sp.csr_matrix  # users × items, 1 where the listener newly played the track
    cutoff_ms: int
    train_events: int
    test_events: int
    dropped_test_events: int  # held-out events of listeners/tracks unseen in training

    @property
    def eval_users(self) -> np.ndarray:
        return np.flatnonzero(np.diff(self.test.indptr) > 0)


@dataclass
class Metrics:
    precision_at_10: float
    recall_at_10: float
    ndcg_at_10: float
    users: int

    def as_dict(self) -> dict[str, float | int]:
        return dict(self.__dict__)


@dataclass
class TrainState:
    """Where a training stands: what a checkpoint holds."""

    epoch: int
    user_factors: np.ndarray
    item_factors: np.ndarray
    history: list[list[int]] = field(default_factory=list)  # [[from, to], ...] per session


def _index(values: pa.ChunkedArray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positions of ``values`` in the sorted ``ids`` and whether each was found."""
    idx = pc.index_in(values, value_set=pa.array(ids, pa.string()))
    found = pc.is_valid(idx).to_numpy(zero_copy_only=False)
    return idx.fill_null(0).to_numpy().astype(np.int64), found


def _pair_matrix(users: np.ndarray, items: np.ndarray, weights: np.ndarray, shape) -> sp.csr_matrix:
    keys = users.astype(np.int64) * shape[1] + items
    uniq, inverse = np.unique(keys, return_inverse=True)
    summed = np.bincount(inverse, weights=weights, minlength=uniq.size)
    rows, cols = np.divmod(uniq, shape[1])
    # Keys are sorted, so the triplets are already in CSR order.
    indptr = np.zeros(shape[0] + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=shape[0]), out=indptr[1:])
    return sp.csr_matrix((summed, cols.astype(np.int32), indptr), shape=shape)


def build_split(events: pa.Table, params: TrainingParams) -> Split:
    """Curated events → training confidences and the hold-out, split by time."""
    if events.num_rows == 0:
        raise NotEnoughData("the tenant has no curated events; run data-etl first")
    ts = events["ts"].cast(pa.int64()).to_numpy()
    cutoff = int(np.quantile(ts, 1.0 - params.holdout_share, method="higher"))
    in_train = ts < cutoff
    train = events.filter(pa.array(in_train))
    test = events.filter(pa.array(~in_train))
    if train.num_rows == 0 or test.num_rows == 0:
        raise NotEnoughData(
            f"all {events.num_rows} events share one timestamp range; a time split needs "
            "events before and after the hold-out cutoff"
        )
    user_ids = np.asarray(pc.unique(train["user_id"]).sort().to_pylist(), dtype=str)
    item_ids = np.asarray(pc.unique(train["track_id"]).sort().to_pylist(), dtype=str)
    shape = (len(user_ids), len(item_ids))
    plays = np.minimum(train["ms_played"].to_numpy() / params.full_play_ms, 1.0)
    counts = _pair_matrix(
        _index(train["user_id"], user_ids)[0], _index(train["track_id"], item_ids)[0], plays, shape
    )
    confidence = counts.copy()
    confidence.data = (1.0 + np.log1p(counts.data)).astype(np.float32)

    tu, user_known = _index(test["user_id"], user_ids)
    ti, item_known = _index(test["track_id"], item_ids)
    known = user_known & item_known
    tu, ti = tu[known], ti[known]
    held = _pair_matrix(tu, ti, np.ones(tu.size), shape)
    held.data[:] = 1.0
    held = held - held.multiply(counts > 0)  # only tracks new to the listener count
    held.eliminate_zeros()
    return Split(
        user_ids=user_ids,
        item_ids=item_ids,
        train=confidence,
        test=held.tocsr().astype(np.float32),
        cutoff_ms=cutoff,
        train_events=train.num_rows,
        test_events=test.num_rows,
        dropped_test_events=int((~known).sum()),
    )


def train(
    split: Split,
    params: TrainingParams,
    device: Device | str = Device.auto,
    *,
    resume: TrainState | None = None,
    on_epoch: Callable[[TrainState], None] | None = None,
) -> TrainState:
    """Fit ALS from ``resume`` (or from a seeded start) up to ``params.iterations``.

    ``on_epoch`` sees the state after each epoch (that is where checkpoints are taken);
    resuming from an epoch-k state gives the same factors as never stopping.
    """
    with threadpool_limits(1, "blas"):  # implicit parallelises itself; BLAS threads fight it
        return _train(split, params, device, resume, on_epoch)


def _train(split, params, device, resume, on_epoch) -> TrainState:
    model = make_model(
        resolve_device(device),
        factors=params.factors,
        regularization=params.regularization,
        alpha=params.alpha,
        iterations=params.iterations,
        random_state=params.seed,
        num_threads=0,
    )
    model.cg_steps = params.cg_steps
    start = 0
    history: list[list[int]] = []
    if resume is not None:
        if resume.user_factors.shape != (split.train.shape[0], params.factors) or (
            resume.item_factors.shape != (split.train.shape[1], params.factors)
        ):
            raise SetlistError("checkpoint does not match this dataset and parameters")
        model.user_factors = resume.user_factors.astype(np.float32, copy=True)
        model.item_factors = resume.item_factors.astype(np.float32, copy=True)
        start = resume.epoch
        history = [list(h) for h in resume.history]
    remaining = params.iterations - start
    history.append([start, start])
    state = TrainState(
        epoch=start,
        user_factors=model.user_factors,
        item_factors=model.item_factors,
        history=history,
    )
    if remaining <= 0:
        history.pop()
        return state

    def callback(iteration: int, _elapsed: float, _loss) -> None:
        state.epoch = start + iteration + 1
        state.user_factors = model.user_factors
        state.item_factors = model.item_factors
        history[-1][1] = state.epoch
        if on_epoch is not None:
            on_epoch(state)

    model.iterations = remaining
    model.fit(split.train, show_progress=False, callback=callback)
    return state


def _dcg_discounts() -> np.ndarray:
    return 1.0 / np.log2(np.arange(2, K + 2))


class _Scorer:
    """Accumulates precision/recall/NDCG@10 from each batch's top-10 track indices."""

    def __init__(self, split: Split):
        self.split = split
        self.users = split.eval_users
        if self.users.size == 0:
            raise NotEnoughData("no listener of the hold-out was seen in training")
        self.discounts = _dcg_discounts()
        self.ideal = np.concatenate([[0.0], np.cumsum(self.discounts)])
        self.precision = self.recall = self.ndcg = 0.0

    def add(self, batch: np.ndarray, top: np.ndarray) -> None:
        """``top``: (len(batch), K) track indices, best first, -1 where there are fewer."""
        relevant = self.split.test[batch]
        hits = np.take_along_axis(relevant.astype(bool).toarray(), np.maximum(top, 0), axis=1)
        hits &= top >= 0
        n_rel = np.diff(relevant.indptr)
        n_hits = hits.sum(axis=1)
        self.precision += float((n_hits / K).sum())
        self.recall += float((n_hits / n_rel).sum())
        self.ndcg += float(
            ((hits * self.discounts).sum(axis=1) / self.ideal[np.minimum(n_rel, K)]).sum()
        )

    def result(self) -> Metrics:
        n = self.users.size
        return Metrics(self.precision / n, self.recall / n, self.ndcg / n, int(n))


def evaluate_factors(
    split: Split,
    user_factors: np.ndarray,
    item_factors: np.ndarray,
    device: Device | str = Device.cpu,
) -> Metrics:
    """precision/recall/NDCG@10 over the hold-out for any factor model of this split.

    Each listener's training tracks are filtered out before ranking. On the CPU the
    ranking is implicit's own multi-threaded ``topk`` (what ``recommend`` uses); on a
    CUDA device the same scores and filter run in CuPy.
    """
    scorer = _Scorer(split)
    users = scorer.users
    if resolve_device(device) is Device.cuda:
        _rank_on_gpu(split, users, user_factors, item_factors, scorer)
        return scorer.result()
    items = np.ascontiguousarray(item_factors, dtype=np.float32)
    for s in range(0, users.size, EVAL_BATCH):
        batch = users[s : s + EVAL_BATCH]
        query = np.ascontiguousarray(user_factors[batch], dtype=np.float32)
        top, _ = topk(items, query, K, filter_query_items=split.train[batch], num_threads=0)
        scorer.add(batch, top)
    return scorer.result()


def _rank_on_gpu(split, users, user_factors, item_factors, scorer: _Scorer) -> None:
    be = cuda_backend()
    xp = be.xp
    items = be.to_device(np.asarray(item_factors, dtype=np.float32))
    batch_size = max(EVAL_BATCH, (1 << 30) // (4 * max(items.shape[0], 1)))
    for s in range(0, users.size, batch_size):
        batch = users[s : s + batch_size]
        scores = be.to_device(np.asarray(user_factors[batch], dtype=np.float32)) @ items.T
        seen = split.train[batch]
        rows = np.repeat(np.arange(batch.size), np.diff(seen.indptr))
        scores[be.to_device(rows), be.to_device(seen.indices)] = -xp.inf
        top = xp.argpartition(-scores, K - 1, axis=1)[:, :K]
        top_scores = xp.take_along_axis(scores, top, axis=1)
        order = xp.argsort(-top_scores, axis=1)
        top = xp.take_along_axis(top, order, axis=1)
        top = xp.where(xp.take_along_axis(top_scores, order, axis=1) == -xp.inf, -1, top)
        scorer.add(batch, be.to_host(top))


def evaluate_popularity(split: Split) -> Metrics:
    """The baseline: every listener gets the tracks most listeners played in training,
    minus those they already played (ties: lower track index first).

    One global ranking, so each listener's list is the first 10 tracks of it they have
    not played; only as many of the top tracks are looked at as that needs.
    """
    scorer = _Scorer(split)
    users = scorer.users
    n_items = split.train.shape[1]
    popularity = np.diff(split.train.tocsc().indptr)
    ranking = np.argsort(-popularity, kind="stable")
    for s in range(0, users.size, EVAL_BATCH * 8):
        batch = users[s : s + EVAL_BATCH * 8]
        seen = split.train[batch]
        rows = np.repeat(np.arange(batch.size), np.diff(seen.indptr))
        depth = min(n_items, 4 * K)
        while True:
            position = np.full(n_items, -1)
            position[ranking[:depth]] = np.arange(depth)
            cols = position[seen.indices]
            played = np.zeros((batch.size, depth), dtype=bool)
            played[rows[cols >= 0], cols[cols >= 0]] = True
            if depth == n_items or (depth - played.sum(axis=1)).min() >= K:
                break
            depth = min(n_items, depth * 4)
        first = np.argsort(played, axis=1, kind="stable")[:, :K]  # unplayed first, in order
        top = ranking[:depth][first]
        top[np.take_along_axis(played, first, axis=1)] = -1  # fewer than K left unplayed
        scorer.add(batch, top)
    return scorer.result()


def align_factors(ids: np.ndarray, factors: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """Rows of ``factors`` (keyed by ``ids``) for ``wanted`` ids; zeros for unknown ones.

    Lets a model trained on other data (the champion) be scored on this split.
    """
    out = np.zeros((wanted.size, factors.shape[1]), dtype=np.float32)
    pos = np.searchsorted(ids, wanted)
    pos_clipped = np.minimum(pos, max(ids.size - 1, 0))
    found = (ids.size > 0) & (ids[pos_clipped] == wanted)
    out[found] = factors[pos_clipped[found]]
    return out


def relative_gain(value: float, reference: float) -> float:
    if reference <= 0:
        return math.inf if value > 0 else 0.0
    return value / reference - 1.0


def model_from_state(state: TrainState) -> ALSModel:
    """An implicit model of a trained state (for ``recommend`` and friends)."""
    model = ALSModel(factors=state.user_factors.shape[1])
    model.user_factors = state.user_factors
    model.item_factors = state.item_factors
    return model
