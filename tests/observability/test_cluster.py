"""`setlist cluster check` (`make check-cluster`) against the session server, and against
kmock's emulated Kubernetes API for the cluster's checks."""

from __future__ import annotations

import asyncio
import json
import socket
import uuid

import kmock
import pytest
import yaml
from prefect.client.schemas.actions import WorkPoolCreate
from typer.testing import CliRunner

from setlist.cli import app
from setlist.k8s.tenant_kit import build_kit
from setlist.observability.cluster import base_objects
from setlist.tenants.onboarding import TenantSpec, create_tenant, list_profiles, read_profile

pytestmark = [pytest.mark.server, pytest.mark.filterwarnings("ignore::DeprecationWarning")]

CLUSTER_SCOPED = {
    "Namespace",
    "PriorityClass",
    "ClusterRole",
    "ClusterRoleBinding",
    "ResourceFlavor",
    "ClusterQueue",
    "WorkloadPriorityClass",
}

VERSION = {
    "major": "1",
    "minor": "31",
    "gitVersion": "v1.31.0-kmock",
    "gitCommit": "0" * 40,
    "gitTreeState": "clean",
    "buildDate": "2025-01-01T00:00:00Z",
    "goVersion": "go1.23",
    "compiler": "gc",
    "platform": "linux/amd64",
}


def _check(*args: str):
    return CliRunner().invoke(app, ["cluster", "check", *args])


def _lines(output: str) -> dict[str, tuple[str, str]]:
    """check name → (status, reason), from the one line each check prints."""
    found = {}
    for line in output.splitlines():
        parts = line.split(maxsplit=2)
        if len(parts) >= 2 and parts[0] in ("ok", "skip", "FAIL"):
            found[parts[1]] = (parts[0], parts[2] if len(parts) > 2 else "")
    return found


@pytest.fixture
def no_kubeconfig(monkeypatch, tmp_path):
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "no-kubeconfig"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)


@pytest.fixture
async def served_pool(client):
    """A pool of its own with a worker online (the session's pool has none)."""
    name = f"check-{uuid.uuid4().hex[:8]}"
    await client.create_work_pool(WorkPoolCreate(name=name, type="process"))
    await client.send_worker_heartbeat(name, "pytest-worker", heartbeat_interval_seconds=300)
    yield name
    await client.delete_work_pool(name)


def test_a_pool_without_worker_fails_and_kubernetes_is_skipped(prefect_server, no_kubeconfig):
    result = _check()
    assert result.exit_code == 1, result.output
    lines = _lines(result.output)
    assert lines["server"][0] == "ok" and lines["database"][0] == "ok"
    status, reason = lines["pool:setlist-local"]
    assert status == "FAIL" and "no worker online for pool 'setlist-local'" in reason
    status, reason = lines["k8s"]
    assert status == "skip" and "no kube context" in reason and "no-kubeconfig" in reason
    # one line per check, then the summary
    report = json.loads(_check("--json").output)
    assert len(lines) == len(report["checks"]) and report["ready"] is False
    assert "checks failed" in result.output.splitlines()[-1]


def test_every_pool_served_and_no_cluster_passes(prefect_server, served_pool, no_kubeconfig):
    result = _check("--pool", served_pool)
    assert result.exit_code == 0, result.output
    lines = _lines(result.output)
    assert lines[f"pool:{served_pool}"] == ("ok", "1 worker(s) online")
    assert "pool:setlist-local" not in lines
    assert lines["k8s"][0] == "skip"
    assert result.output.splitlines()[-1] == "ready"


def test_an_unreachable_cluster_fails_its_api_line(
    prefect_server, served_pool, tmp_path, monkeypatch
):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends
    monkeypatch.setenv("KUBECONFIG", str(_kubeconfig(tmp_path, f"https://127.0.0.1:{port}")))
    result = _check("--kube-context", "test", "--pool", served_pool)
    assert result.exit_code == 1, result.output
    lines = _lines(result.output)
    assert lines["k8s:api"][0] == "FAIL" and "unreachable" in lines["k8s:api"][1]
    assert lines["k8s:priority-classes"][0] == "skip"
    unknown = _check("--kube-context", "nope", "--pool", served_pool)
    assert unknown.exit_code == 1
    assert _lines(unknown.output)["k8s:api"][0] == "FAIL" and "'nope'" in unknown.output


# --------------------------------------------------------------------------- kmock


def _kubeconfig(tmp_path, url: str):
    path = tmp_path / "kubeconfig"
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "test", "cluster": {"server": url}}],
                "users": [{"name": "test", "user": {"token": "t"}}],
                "contexts": [{"name": "test", "context": {"cluster": "test", "user": "test"}}],
                "current-context": "test",
            }
        )
    )
    return path


def _plural(kind: str) -> str:
    lower = kind.lower()
    if lower.endswith("y"):
        return lower[:-1] + "ies"
    return lower + ("es" if lower.endswith("s") else "s")


def _key(obj: dict) -> tuple[str, str | None, str]:
    meta = obj["metadata"]
    return (f"{obj['apiVersion']}/{_plural(obj['kind'])}", meta.get("namespace"), meta["name"])


@pytest.fixture(autouse=True)
def namespaces_path(monkeypatch):
    """kmock reads ``/api/v1/namespaces[/NAME]`` as a namespace prefix with no resource;
    the API server reads it as the cluster-scoped resource namespaces (and NAME)."""
    from kmock._internal import parsing

    original = parsing.parse_path

    def parse_path(path: str):
        parts = path.strip("/").split("/")
        if parts[:3] == ["api", "v1", "namespaces"] and len(parts) <= 4:
            return parsing.ParsedPath("", "v1", "namespaces", None, (parts[3:] or [None])[0])
        return original(path)

    monkeypatch.setattr(parsing, "parse_path", parse_path)


def _declare(emulator, objects: list[dict], *, without_group: str = "") -> None:
    # kubernetes' VersionApi asks for /version/, which kmock serves without the slash only
    emulator["get /version/"] << VERSION
    for obj in objects:
        if without_group and obj["apiVersion"].startswith(without_group):
            continue
        emulator.resources[f"{obj['apiVersion']}/{_plural(obj['kind'])}"] = kmock.ResourceInfo(
            kind=obj["kind"],
            namespaced=obj["kind"] not in CLUSTER_SCOPED,
            verbs={"get", "list"},
        )


def _live(obj: dict) -> dict:
    """The object as the API would hold it: Deployments with their replicas available."""
    if obj["kind"] == "Deployment":
        return {**obj, "status": {"availableReplicas": obj["spec"].get("replicas", 1)}}
    return obj


@pytest.fixture
async def cluster(client, tenant_id, tmp_path, monkeypatch):
    """kmock serving every kind of k8s/base and the tenant kits, holding all their
    objects (a tenant of its own among them); KUBECONFIG points at it as context
    ``test``."""
    await create_tenant(client, TenantSpec(tenant_id=tenant_id))
    kits = [o for p in await list_profiles(client) for o in build_kit(p)]
    objects = base_objects() + kits
    async with kmock.KubernetesEmulator() as emulator, kmock.Server(emulator) as server:
        _declare(emulator, objects)
        for obj in objects:
            emulator.objects[_key(obj)] = _live(obj)
        monkeypatch.setenv("KUBECONFIG", str(_kubeconfig(tmp_path, str(server.url).rstrip("/"))))
        yield emulator


async def test_cluster_checks_each_part_and_names_what_is_missing(cluster, served_pool, tenant_id):
    args = ["--kube-context", "test", "--pool", served_pool]
    result = await asyncio.to_thread(_check, *args)
    assert result.exit_code == 0, result.output
    lines = _lines(result.output)
    assert lines["k8s:api"][0] == "ok" and "v1.31.0-kmock" in lines["k8s:api"][1]
    expected = {
        "k8s:kinds",
        "k8s:crds:kueue.x-k8s.io/v1beta1",
        "k8s:namespaces",
        "k8s:priority-classes",
        "k8s:rbac",
        "k8s:kueue",
        "k8s:workloads",
        "k8s:config",
        "k8s:tenant-kits",
    }
    assert {n for n, (status, _) in lines.items() if status == "ok"} >= expected
    assert "ClusterQueue" in lines["k8s:crds:kueue.x-k8s.io/v1beta1"][1]
    assert "setlist-batch" in lines["k8s:priority-classes"][1]

    # A PriorityClass gone, a worker Deployment with nothing available, a namespace of
    # a tenant kit missing: each named on its own line, exit 1.
    pc = next(o for o in base_objects() if o["kind"] == "PriorityClass")
    del cluster.objects[_key(pc)]
    worker = next(o for o in base_objects() if o["metadata"]["name"] == "setlist-worker-cpu")
    cluster.objects[_key(worker)] = {**worker, "status": {"availableReplicas": 0}}
    profile = await read_profile(tenant_id)
    ns = next(o for o in build_kit(profile) if o["kind"] == "Namespace")
    del cluster.objects[_key(ns)]
    result = await asyncio.to_thread(_check, *args)
    assert result.exit_code == 1, result.output
    lines = _lines(result.output)
    assert lines["k8s:priority-classes"] == (
        "FAIL",
        f"PriorityClass/{pc['metadata']['name']} missing",
    )
    status, reason = lines["k8s:workloads"]
    assert status == "FAIL" and "setlist-system/setlist-worker-cpu: 0 of 2 replicas" in reason
    status, reason = lines["k8s:tenant-kits"]
    assert status == "FAIL" and f"{tenant_id} lacks Namespace/{ns['metadata']['name']}" in reason
    assert lines["k8s:rbac"][0] == "ok" and lines["k8s:namespaces"][0] == "ok"


async def test_kueue_not_installed_fails_its_crd_line(client, served_pool, tmp_path, monkeypatch):
    objects = base_objects()
    async with kmock.KubernetesEmulator() as emulator, kmock.Server(emulator) as server:
        _declare(
            emulator,
            objects + [o for p in await list_profiles(client) for o in build_kit(p)],
            without_group="kueue.x-k8s.io",
        )
        monkeypatch.setenv("KUBECONFIG", str(_kubeconfig(tmp_path, str(server.url).rstrip("/"))))
        result = await asyncio.to_thread(_check, "--kube-context", "test", "--pool", served_pool)
    assert result.exit_code == 1, result.output
    lines = _lines(result.output)
    status, reason = lines["k8s:crds:kueue.x-k8s.io/v1beta1"]
    assert status == "FAIL" and "not served" in reason and "ClusterQueue" in reason
    assert lines["k8s:kueue"][0] == "skip"
    assert lines["k8s:kinds"][0] == "ok"


def test_cluster_init_makes_the_kubernetes_pools_with_the_images_of_the_settings(
    prefect_server, monkeypatch
):
    """What a cluster needs before its workers start: a GPU worker would otherwise
    create its pool with the CPU template (its type's default)."""
    import anyio
    from prefect.client.orchestration import get_client

    from setlist.core.settings import get_settings

    cpu = "registry.example/setlist/runtime@sha256:" + "3" * 64
    gpu = "registry.example/setlist/runtime-gpu:9.9.9"
    monkeypatch.setenv("SETLIST_IMAGE", cpu)
    monkeypatch.setenv("SETLIST_GPU_IMAGE", gpu)
    monkeypatch.setenv("SETLIST_BACKUP_BLOCK", f"missing-{uuid.uuid4().hex[:6]}")
    get_settings.cache_clear()
    try:
        result = CliRunner().invoke(app, ["cluster", "init"])
        assert result.exit_code == 0, result.output
        assert f"pool setlist-k8s: setlist-kubernetes, jobs run {cpu}" in result.output
        assert f"pool setlist-k8s-gpu: setlist-kubernetes, jobs run {gpu}" in result.output
        assert "storage block setlist-storage: present" in result.output
        assert "is missing" in result.output  # the backup block named above

        async def templates():
            async with get_client() as client:
                return [
                    (await client.read_work_pool(p)).base_job_template["variables"]["properties"]
                    for p in ("setlist-k8s", "setlist-k8s-gpu")
                ]

        cpu_vars, gpu_vars = anyio.run(templates)
        assert cpu_vars["image"]["default"] == cpu and "gpu" not in cpu_vars
        assert gpu_vars["image"]["default"] == gpu and "gpu" in gpu_vars
        monkeypatch.setenv("SETLIST_IMAGE", "registry.example/setlist/runtime:latest")
        get_settings.cache_clear()
        refused = CliRunner().invoke(app, ["cluster", "init"])
        assert refused.exit_code != 0 and "is not a pinned image" in str(refused.exception or "")
    finally:
        monkeypatch.undo()
        get_settings.cache_clear()
