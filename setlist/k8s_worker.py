"""The Kubernetes worker of Setlist's pools: prefect-kubernetes' worker with three changes.

1. Schema-correct Jobs: upstream's manifest check insists on ``parallelism`` and
   ``completions`` inside the *pod* spec, where the Kubernetes schema rejects them; they
   are Job-spec fields. This configuration checks against the correct shape instead.
2. Tenant isolation: before a Job is created, its namespace and tenant label must be
   those of the tenant whose queue dispatched the run. A run whose job variables name
   another tenant is refused, so nothing is created in a namespace not its own.
3. Dispatch order: it takes a tenant run only with the dispatcher's grant
   (``setlist.grants``).

Registered as worker type ``setlist-kubernetes`` (entry point ``prefect.collections``,
through ``setlist.workers``).
"""

from __future__ import annotations

from typing import Any, Self

from jsonpatch import JsonPatch
from prefect_kubernetes.worker import KubernetesWorker, KubernetesWorkerJobConfiguration
from pydantic import model_validator

from setlist.grants import GrantedRunsOnly
from setlist.k8s_jobs import PoolKind, check_run_namespace, load_template


def _required_shape() -> dict[str, Any]:
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"annotations": {}, "labels": {}},
        "spec": {
            "template": {
                "spec": {"restartPolicy": "Never", "containers": [{"name": "prefect-job"}]}
            }
        },
    }


def _server_only(name: str) -> bool:
    return name.startswith(("PREFECT_SERVER_", "PREFECT_API_DATABASE", "PREFECT_UI_"))


class SetlistJobConfiguration(KubernetesWorkerJobConfiguration):
    @model_validator(mode="after")
    def _validate_job_manifest(self) -> Self:  # overrides upstream's validator by name
        manifest = self.job_manifest
        metadata = manifest.setdefault("metadata", {})
        metadata.setdefault("annotations", {})
        metadata.setdefault("labels", {})
        metadata.setdefault("namespace", self.namespace)
        pod_spec = manifest.get("spec", {}).get("template", {}).get("spec", {})
        for misplaced in ("parallelism", "completions"):
            if misplaced in pod_spec:
                raise ValueError(
                    f"/spec/template/spec/{misplaced} is not a pod field; "
                    f"set /spec/{misplaced} on the Job instead"
                )
        patch = JsonPatch.from_diff(manifest, _required_shape())
        missing = sorted(op["path"] for op in patch if op["op"] == "add")
        if missing:
            raise ValueError(f"Job is missing required attributes at: {', '.join(missing)}")
        wrong = sorted(
            f"{op['path']} must be {op['value']!r}" for op in patch if op["op"] == "replace"
        )
        if wrong:
            raise ValueError(f"Job has incompatible values: {', '.join(wrong)}")
        return self

    def prepare_for_flow_run(
        self, flow_run, deployment=None, flow=None, work_pool=None, worker_name=None, worker_id=None
    ):
        super().prepare_for_flow_run(
            flow_run, deployment, flow, work_pool, worker_name, worker_id=worker_id
        )
        check_run_namespace(self.job_manifest, flow_run.work_queue_name)
        # The worker copies its own PREFECT_* settings into the Job; server-side ones
        # (database URL and password among them) have no business in a tenant's pod.
        for container in self.job_manifest["spec"]["template"]["spec"]["containers"]:
            container["env"] = [
                e for e in container.get("env", []) if not _server_only(e.get("name", ""))
            ]


class SetlistKubernetesWorker(GrantedRunsOnly, KubernetesWorker):
    type = "setlist-kubernetes"
    job_configuration = SetlistJobConfiguration
    _display_name = "Setlist Kubernetes"
    _description = "Runs Setlist jobs as hardened Kubernetes Jobs in tenant namespaces."

    @classmethod
    def get_default_base_job_template(cls) -> dict[str, Any]:
        return load_template(PoolKind.cpu)
