"""ML-training benchmark: the ml-training flow against the same training called directly.

    .venv/bin/python bench/ml.py [--events 5000000] [--users 100000] [--tracks 30000]
                                 [--factors 64] [--iterations 15] [--device auto]
                                 [--rounds 2]

Generates listening events with taste clusters, publishes them as a tenant's curated
table, then in one process against a local Prefect test server:
  - raw: read the table, build the split, train, evaluate model and baseline — the
    functions the flow's tasks call, called directly;
  - flow: ``ml-training`` for the tenant (tenant check, tasks, a checkpoint every
    epoch, evaluation against the champion, registry, artifacts, events).
Both on the same data and device, ``--rounds`` times in alternating order (each round
with its own seed; later flow rounds also re-score the champion the first one made);
each side's best round counts. Prints one JSON object as its last line: train_s,
raw_s, overhead_ratio (train_s / raw_s), ndcg_at_10, baseline_ndcg_at_10, device, and
the sizes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TENANT = "bench-ml"


def raw_training(storage, params, device) -> dict:
    from setlist.etl.curated import read_manifest, read_table
    from setlist.ml.recommender import build_split, evaluate_factors, evaluate_popularity, train

    t0 = time.perf_counter()
    events = read_table(storage, read_manifest(storage), ["user_id", "track_id", "ts", "ms_played"])
    split = build_split(events, params)
    del events
    state = train(split, params, device)
    model = evaluate_factors(split, state.user_factors, state.item_factors, device)
    baseline = evaluate_popularity(split)
    return {
        "seconds": time.perf_counter() - t0,
        "ndcg": model.ndcg_at_10,
        "baseline": baseline.ndcg_at_10,
        "pairs": int(split.train.nnz),
        "shape": list(split.train.shape),
    }


async def flow_training(params, device) -> dict:
    from flows.ml_training import ml_training

    t0 = time.perf_counter()
    report = await ml_training(TENANT, params=params, device=device)
    return {
        "seconds": time.perf_counter() - t0,
        "ndcg": report.metrics["ndcg_at_10"],
        "baseline": report.baseline["ndcg_at_10"],
        "device": report.device,
        "resumed": report.resumed_from_epoch,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=5_000_000)
    ap.add_argument("--users", type=int, default=100_000)
    ap.add_argument("--tracks", type=int, default=30_000)
    ap.add_argument("--factors", type=int, default=64)
    ap.add_argument("--iterations", type=int, default=15)
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--rounds", type=int, default=2, help="each side's best of this many")
    args = ap.parse_args()

    home = Path(tempfile.mkdtemp(prefix="setlist-bench-ml-"))
    os.environ["SETLIST_HOME"] = str(home)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ["PREFECT_LOCAL_STORAGE_PATH"] = str(home / "results")

    import anyio
    from prefect.client.orchestration import get_client
    from prefect.testing.utilities import prefect_test_harness

    from setlist import stack
    from setlist.etl.demo import listening_table, publish_curated
    from setlist.ml.als_solver import resolve_device
    from setlist.ml.recommender import TrainingParams
    from setlist.tenants.onboarding import TenantSpec, create_tenant
    from setlist.tenants.runtime import enter_tenant

    params = TrainingParams(factors=args.factors, iterations=args.iterations)
    device = resolve_device(args.device)
    t0 = time.perf_counter()
    events = listening_table(
        TENANT, users=args.users, tracks=args.tracks, events=args.events, seed=5
    )
    print(f"generated {events.num_rows} events in {time.perf_counter() - t0:.1f}s", flush=True)

    with prefect_test_harness(server_startup_timeout=120):

        async def setup(table):
            await stack.bootstrap_platform(home / "storage")
            async with get_client() as client:
                await create_tenant(client, TenantSpec(tenant_id=TENANT))
            storage = (await enter_tenant(TENANT)).storage
            publish_curated(storage, table)
            return storage

        storage = anyio.run(setup, events)
        del events
        # Warm both paths once on a small slice (imports, thread pools, first compute).
        raw_training(storage, params.model_copy(update={"iterations": 1}), device)
        raws, flows = [], []
        for r in range(args.rounds):
            # A new seed per round: the same work, but not a training the flow has done
            # (it would skip a registered one). Alternate which goes first.
            seeded = params.model_copy(update={"seed": params.seed + r})
            order = ("raw", "flow") if r % 2 == 0 else ("flow", "raw")
            for kind in order:
                if kind == "raw":
                    raws.append(raw_training(storage, seeded, device))
                else:
                    flows.append(anyio.run(flow_training, seeded, device))
            print(
                f"round {r}: raw {raws[-1]['seconds']:.2f}s, flow {flows[-1]['seconds']:.2f}s",
                flush=True,
            )
        raw = min(raws, key=lambda x: x["seconds"])
        flow = min(flows, key=lambda x: x["seconds"])

    result = {
        "train_s": round(flow["seconds"], 3),
        "raw_s": round(raw["seconds"], 3),
        "overhead_ratio": round(flow["seconds"] / raw["seconds"], 4),
        "ndcg_at_10": round(flow["ndcg"], 5),
        "baseline_ndcg_at_10": round(flow["baseline"], 5),
        "raw_ndcg_at_10": round(raw["ndcg"], 5),
        "device": flow["device"],
        "events": args.events,
        "users_x_tracks": raw["shape"],
        "pairs": raw["pairs"],
        "factors": args.factors,
        "iterations": args.iterations,
        "rounds": args.rounds,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
