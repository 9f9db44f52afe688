"""The Kubernetes worker of Setlist's pools: prefect-kubernetes' worker with six changes.

1. Schema-correct Jobs: upstream's manifest check insists on ``parallelism`` and
   ``completions`` inside the *pod* spec, where the Kubernetes schema rejects them; they
   are Job-spec fields. This configuration checks against the correct shape instead.
2. Tenant isolation: before a Job is created, its namespace and tenant label must be
   those of the tenant whose queue dispatched the run. A run whose job variables name
   another tenant is refused, so nothing is created in a namespace not its own.
3. Dispatch order: it takes a tenant run only with the dispatcher's grant
   (``setlist.dispatch.grants``).
4. One attempt at a time: each Job carries the id of the flow run's state at submission
   and its container starts through ``setlist.job_guard``, which runs the flow run only
   while it is still in that state — a Job that Kueue suspended and re-admits after the
   run was rescheduled or submitted again exits without running it.
5. An audit entry for each run it takes (``setlist.workers.audited``), whoever made it.
6. A Job that failed before its flow run started gives the run back to the dispatcher
   instead of leaving it Crashed (``setlist.workers.unstarted``).

Registered as worker type ``setlist-kubernetes`` (entry point ``prefect.collections``,
through ``setlist.workers``). ``render_job``, the dry run of a Job, lives beside the
configuration so that it renders through exactly the worker's code.
"""

from __future__ import annotations

from typing import Any, Self

from jsonpatch import JsonPatch
from prefect_kubernetes.worker import KubernetesWorker, KubernetesWorkerJobConfiguration
from pydantic import PrivateAttr, model_validator

from setlist.dispatch.grants import GrantedRunsOnly
from setlist.job_guard import STATE_ENV
from setlist.k8s.templates import (
    PoolKind,
    check_job_variables,
    check_run_namespace,
    load_template,
    sample_flow_run,
)
from setlist.workers.audited import AuditedStarts
from setlist.workers.job_credentials import (
    PLATFORM_SECRETS,
    check_run_overrides,
    job_environment,
)
from setlist.workers.unstarted import GivesBackUnstarted


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


GUARD = ["python", "-m", "setlist.job_guard"]


def _server_only(name: str) -> bool:
    return name.startswith(("PREFECT_SERVER_", "PREFECT_API_DATABASE", "PREFECT_UI_"))


class SetlistJobConfiguration(KubernetesWorkerJobConfiguration):
    _dry_run: bool = PrivateAttr(default=False)  # a render: no real token is minted

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
        container = self.job_manifest["spec"]["template"]["spec"]["containers"][0]
        args = list(container.get("args") or [])
        if args[: len(GUARD)] != GUARD:
            container["args"] = [*GUARD, "--", *args]
        check_run_overrides(flow_run)
        # The worker copies its own PREFECT_* settings into the Job; server-side ones
        # (database URL and password among them) have no business in a tenant's pod,
        # and the worker's credentials give way to the run's token.
        for container in self.job_manifest["spec"]["template"]["spec"]["containers"]:
            plain = {
                e["name"]: e.get("value")
                for e in container.get("env", [])
                if "valueFrom" not in e and not _server_only(e.get("name", ""))
            }
            kept = job_environment(plain, flow_run, mint=not self._dry_run)
            refs = [e for e in container.get("env", []) if "valueFrom" in e]
            container["env"] = [
                *({"name": k, "value": v} for k, v in kept.items()),
                *(e for e in refs if e["name"] not in kept),
            ]


class SetlistKubernetesWorker(GivesBackUnstarted, AuditedStarts, GrantedRunsOnly, KubernetesWorker):
    type = "setlist-kubernetes"
    job_configuration = SetlistJobConfiguration
    _display_name = "Setlist Kubernetes"
    _description = "Runs Setlist jobs as hardened Kubernetes Jobs in tenant namespaces."

    @classmethod
    def get_default_base_job_template(cls) -> dict[str, Any]:
        return load_template(PoolKind.cpu)

    async def stamp_submission(self, flow_run, configuration: SetlistJobConfiguration) -> str:
        """Write the flow run's current state id (the Pending state this submission moved
        it to) into the Job's environment, for ``setlist.job_guard``. → the id."""
        current = await self.client.read_flow_run(flow_run.id)
        state_id = str(current.state_id)
        for container in configuration.job_manifest["spec"]["template"]["spec"]["containers"]:
            env = [e for e in container.get("env", []) if e.get("name") != STATE_ENV]
            container["env"] = [*env, {"name": STATE_ENV, "value": state_id}]
        return state_id

    async def run(self, flow_run, configuration, task_status=None):
        await self.stamp_submission(flow_run, configuration)
        return await super().run(flow_run, configuration, task_status)

    # prefect-kubernetes can swap the job's credential for a reference to a Secret of
    # the worker's (its API_KEY_SECRET_* and API_AUTH_STRING_SECRET_* settings): that
    # Secret holds the operator credential, so a job keeps its run token instead.
    async def _replace_env_variable_with_secret(self, env_variable_name, *args, **kwargs):
        if env_variable_name in PLATFORM_SECRETS:
            self._logger.warning(
                "not replacing %s with a Secret: a Setlist job holds its run token only",
                env_variable_name,
            )
            return
        await super()._replace_env_variable_with_secret(env_variable_name, *args, **kwargs)

    async def _replace_api_key_with_secret(self, *args, **kwargs):
        return None


async def render_job(
    client,
    values: dict[str, Any],
    kind: PoolKind | str = PoolKind.cpu,
    flow_run=None,
) -> dict[str, Any]:
    """The Job manifest a Kubernetes worker creates for these job variables.

    ``client`` is required: prefect-kubernetes resolves block references through it and
    would otherwise start a temporary server of its own.
    """
    kind = PoolKind(kind)
    check_job_variables(kind, values)
    flow_run = flow_run or sample_flow_run(values)
    config = await SetlistJobConfiguration.from_template_and_values(
        load_template(kind), values, client=client
    )
    config._dry_run = True
    config.prepare_for_flow_run(flow_run)  # refuses a namespace not the run's tenant's
    return config.job_manifest
