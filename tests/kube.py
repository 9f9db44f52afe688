"""An emulated Kubernetes API (kmock) and a worker's submission into it, for the tests
that need the Job the real Kubernetes worker creates."""

from __future__ import annotations

import contextlib
import uuid

import kmock
from kubernetes_asyncio.client import ApiClient, BatchV1Api, Configuration
from prefect.states import Pending

from setlist.workers.kubernetes import SetlistJobConfiguration


class GenerateNameEmulator(kmock.KubernetesEmulator):
    """kmock's emulator, plus the API server's ``metadata.generateName``."""

    async def _handle(self, request):
        if (
            request.resource is not None
            and request.action == kmock.action.CREATE
            and isinstance(request.data, dict)
        ):
            meta = request.data.setdefault("metadata", {})
            if not meta.get("name") and meta.get("generateName"):
                meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
        return await super()._handle(request)


@contextlib.asynccontextmanager
async def emulated_cluster():
    """→ an API client of a fresh emulated cluster that knows Jobs."""
    async with GenerateNameEmulator() as emulator, kmock.Server(emulator) as server:
        emulator.resources["batch/v1/jobs"] = {}
        async with ApiClient(Configuration(host=str(server.url).rstrip("/"))) as api:
            yield api


async def worker_submits(client, worker, run_id, kube, work_queue_name=None) -> dict:
    """What a Kubernetes worker does for one submission, up to the Job it creates:
    Pending, the configuration resolved from the run's deployment and pool, Submitting,
    the state stamp, the Job. → the created Job as a manifest (dict).

    ``worker`` is not started (its cluster observer needs a real cluster): its client
    is ``client``. ``work_queue_name`` stands in for a run read from a queue other than
    its own.
    """
    await client.set_flow_run_state(run_id, Pending(), force=True)
    await client.set_flow_run_state(run_id, Pending(name="Submitting"), force=True)
    run = await client.read_flow_run(run_id)
    if work_queue_name:
        run = run.model_copy(update={"work_queue_name": work_queue_name})
    pool = await client.read_work_pool(worker._work_pool_name)
    config = await SetlistJobConfiguration.resolve_for_flow_run(
        run, client=client, work_pool=pool, worker_name=worker.name
    )
    await worker.stamp_submission(run, config)
    job = await worker._create_job(config, kube)
    return kube.sanitize_for_serialization(job)


async def jobs_in(kube, namespace: str):
    return (await BatchV1Api(kube).list_namespaced_job(namespace)).items
