"""Tenant kits and the kustomize tree: built offline, validated against the official schemas."""

from __future__ import annotations

import shutil
import subprocess

import kubernetes_validate
import pytest
import yaml

from blocks.tenant import TenantProfile
from setlist.core.settings import REPO_ROOT
from setlist.core.tenancy import TenantQuota
from setlist.k8s.tenant_kit import build_kit, kit_yaml
from setlist.security.pod_security import restricted_violations

K8S_VERSIONS = ["1.31", kubernetes_validate.latest_version()]
KUEUE = "kueue.x-k8s.io/v1beta1"
CLUSTER_SCOPED = {
    "Namespace",
    "ClusterRole",
    "ClusterRoleBinding",
    "PriorityClass",
    "ClusterQueue",
    "ResourceFlavor",
    "WorkloadPriorityClass",
}


def _validate(doc):
    if doc["apiVersion"] == KUEUE:
        return  # a CRD: no official schema; checked structurally below
    for version in K8S_VERSIONS:
        kubernetes_validate.validate(doc, version, strict=True)


def _kustomize(path: str) -> list[dict]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl (with its built-in kustomize) is not installed")
    out = subprocess.run(
        [kubectl, "kustomize", str(REPO_ROOT / path)], capture_output=True, text=True, check=True
    ).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def test_kit_is_valid_and_isolating():
    profile = TenantProfile(
        tenant_id="acme", quota=TenantQuota(concurrent_jobs=3, cpu="4", memory="8Gi", gpu=1)
    )
    docs = build_kit(profile)
    for doc in docs:
        _validate(doc)
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == "tenant-acme"
    by_kind = {}
    for doc in docs:
        by_kind.setdefault(doc["kind"], []).append(doc)
    ns = by_kind["Namespace"][0]["metadata"]["labels"]
    for mode in ("enforce", "audit", "warn"):
        assert ns[f"pod-security.kubernetes.io/{mode}"] == "restricted"
    hard = by_kind["ResourceQuota"][0]["spec"]["hard"]
    assert hard["limits.cpu"] == "4000m" and hard["limits.memory"] == "8192Mi"
    assert hard["requests.nvidia.com/gpu"] == "1" and hard["pods"] == "3"
    deny = next(p for p in by_kind["NetworkPolicy"] if p["metadata"]["name"] == "default-deny")
    assert deny["spec"] == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}
    egress = next(p for p in by_kind["NetworkPolicy"] if p["metadata"]["name"] != "default-deny")
    assert "ingress" not in egress["spec"]
    assert {port["port"] for rule in egress["spec"]["egress"] for port in rule["ports"]} == {
        53,
        4200,
        443,
    }
    assert by_kind["ServiceAccount"][0]["automountServiceAccountToken"] is False
    binding = by_kind["RoleBinding"][0]
    assert binding["roleRef"]["name"] == "setlist-worker-jobs"
    assert binding["subjects"][0]["namespace"] == "setlist-system"
    # a 4-cpu quota admits micro … large (2 cpu) but not xlarge (8 cpu)
    queues = {q["metadata"]["name"]: q["spec"]["clusterQueue"] for q in by_kind["LocalQueue"]}
    assert queues == {f"tier-{t}": f"setlist-{t}" for t in ("micro", "small", "medium", "large")}
    limit = by_kind["LimitRange"][0]["spec"]["limits"][0]
    assert limit["max"] == {"cpu": "2000m", "memory": "4Gi"}


def test_committed_demo_kit_matches_the_generator():
    committed = (REPO_ROOT / "k8s" / "tenant" / "kit.yaml").read_text()
    body = "".join(line for line in committed.splitlines(True) if not line.startswith("#"))
    assert body == kit_yaml(TenantProfile(tenant_id="enterprise-client-001"))


@pytest.mark.parametrize(
    "path", ["k8s/base", "k8s/overlays/dev", "k8s/overlays/prod", "k8s/overlays/ha", "k8s/tenant"]
)
def test_kustomize_builds_validate(path):
    docs = _kustomize(path)
    assert docs
    for doc in docs:
        _validate(doc)
        assert restricted_violations(doc) == [], (doc["kind"], doc["metadata"]["name"])
        if doc["kind"] in CLUSTER_SCOPED:
            assert "namespace" not in doc["metadata"], doc["metadata"]["name"]
        if doc["kind"] in ("Deployment", "StatefulSet"):
            pod = doc["spec"]["template"]["spec"]
            for c in pod["containers"]:
                assert ":latest" not in c["image"] and ":" in c["image"]


def test_base_objects_fit_together():
    docs = _kustomize("k8s/base")
    kinds = {}
    for d in docs:
        kinds.setdefault(d["kind"], {})[d["metadata"]["name"]] = d
    bands = ["critical", "high", "normal", "low", "batch"]
    assert set(kinds["PriorityClass"]) == {f"setlist-{b}" for b in bands}
    assert set(kinds["WorkloadPriorityClass"]) == set(kinds["PriorityClass"])
    for name, pc in kinds["PriorityClass"].items():
        assert kinds["WorkloadPriorityClass"][name]["value"] == pc["value"]
    values = [kinds["PriorityClass"][f"setlist-{b}"]["value"] for b in bands]
    assert values == sorted(values, reverse=True)
    flavors = set(kinds["ResourceFlavor"])
    tiers = ["micro", "small", "medium", "large", "xlarge", "enterprise"]
    assert set(kinds["ClusterQueue"]) == {f"setlist-{t}" for t in tiers}
    for cq in kinds["ClusterQueue"].values():
        assert cq["spec"]["cohort"] == "setlist"
        for group in cq["spec"]["resourceGroups"]:
            for flavor in group["flavors"]:
                assert flavor["name"] in flavors
                assert {r["name"] for r in flavor["resources"]} == set(group["coveredResources"])
    rules = kinds["ClusterRole"]["setlist-worker-jobs"]["rules"]
    assert all("*" not in r["verbs"] and "*" not in r["resources"] for r in rules)
    assert not any("secrets" in r["resources"] for r in rules)
    assert "ClusterRoleBinding" not in kinds  # bound per tenant namespace only
    for name in ("setlist-worker-cpu", "setlist-worker-gpu"):
        dep = kinds["Deployment"][name]
        assert kinds["PodDisruptionBudget"][name]["spec"]["selector"] == dep["spec"]["selector"]
        spec = dep["spec"]["template"]["spec"]
        assert spec["topologySpreadConstraints"]
        container = spec["containers"][0]
        assert "setlist-kubernetes" in container["args"]
        assert container["livenessProbe"] and container["readinessProbe"]


def test_the_api_takes_the_operator_credential_from_a_secret_and_admits_only_setlist():
    docs = _kustomize("k8s/overlays/dev")
    by = {(d["kind"], d["metadata"]["name"]): d for d in docs}

    def env(name: str) -> dict:
        (container,) = by[("Deployment", name)]["spec"]["template"]["spec"]["containers"]
        return {e["name"]: e for e in container.get("env", [])}

    server = env("prefect-server")
    ref = server["PREFECT_SERVER_API_AUTH_STRING"]["valueFrom"]["secretKeyRef"]
    assert ref == {"name": "setlist-platform-credentials", "key": "api-auth"}
    # The gate verifies run tokens and seals records: it needs the platform key.
    key = server["SETLIST_PLATFORM_KEY"]["valueFrom"]["secretKeyRef"]
    assert key == {"name": "setlist-platform-credentials", "key": "platform-key"}
    for name in ("setlist-worker-cpu", "setlist-worker-gpu", "setlist-dispatcher"):
        e = env(name)
        assert e["PREFECT_API_AUTH_STRING"]["valueFrom"]["secretKeyRef"]["key"] == "api-auth"
        assert e["SETLIST_PLATFORM_KEY"]["valueFrom"]["secretKeyRef"]["key"] == "platform-key"
    assert "value" not in env("setlist-metrics")["PREFECT_API_AUTH_STRING"]
    # one exporter at a time, rollouts included: two would each send the digest
    metrics = by[("Deployment", "setlist-metrics")]["spec"]
    assert metrics["replicas"] == 1 and metrics["strategy"] == {"type": "Recreate"}
    policy = by[("NetworkPolicy", "prefect-server-ingress")]["spec"]
    assert policy["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "prefect-server"}
    assert policy["policyTypes"] == ["Ingress"]
    platform, jobs = policy["ingress"]
    (names,) = platform["from"][0]["podSelector"]["matchExpressions"]
    assert (
        "setlist-dispatcher" in names["values"] and "namespaceSelector" not in platform["from"][0]
    )
    assert jobs["from"][0]["namespaceSelector"]["matchExpressions"][0]["key"] == "setlist.io/tenant"


def _env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def test_the_ha_control_plane_is_prefects_multi_replica_shape():
    from setlist.controlplane.ha import REDIS_BACKENDS, REPLICA_ENV

    docs = _kustomize("k8s/overlays/ha")
    by = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    api = by[("Deployment", "prefect-server")]
    services = by[("Deployment", "prefect-server-services")]
    migrate = by[("Job", "prefect-server-migrate")]
    # the single server is not in this build: one Deployment serves the API
    deployments = {d["metadata"]["name"] for d in docs if d["kind"] == "Deployment"}
    assert {n for n in deployments if n.startswith("prefect-server")} == {
        "prefect-server",
        "prefect-server-services",
    }

    # ≥ 2 API replicas, every one without services; ≥ 2 services replicas, never both away
    assert api["spec"]["replicas"] >= 2
    assert api["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert services["spec"]["replicas"] >= 2
    assert services["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 1
    pdb = by[("PodDisruptionBudget", "prefect-server-services")]
    assert pdb["spec"]["minAvailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"] == services["spec"]["selector"]["matchLabels"]
    (server,) = api["spec"]["template"]["spec"]["containers"]
    assert server["args"][:3] == ["python", "-m", "setlist.controlplane"]
    assert "--no-services" in server["args"]
    (svc,) = services["spec"]["template"]["spec"]["containers"]
    assert svc["args"][-3:] == ["server", "services", "start"]
    assert api["spec"]["template"]["spec"]["topologySpreadConstraints"]
    assert server["readinessProbe"]["httpGet"]["path"] in ("/api/health", "/api/ready")
    assert server["livenessProbe"]["httpGet"]["path"] == "/api/health"

    # the migrations once, and before any replica or the services start
    assert migrate["spec"]["backoffLimit"] >= 1 and migrate["spec"]["ttlSecondsAfterFinished"]
    (job,) = migrate["spec"]["template"]["spec"]["containers"]
    assert job["args"] == ["python", "-m", "setlist.controlplane.ha", "migrate"]
    for dep in (api, services):
        (init,) = dep["spec"]["template"]["spec"]["initContainers"]
        assert init["args"][:4] == [
            "python",
            "-m",
            "setlist.controlplane.ha",
            "wait-for-migrations",
        ]
        assert _env(init)["PREFECT_SERVER_DATABASE_HOST"]["value"] == "setlist-postgres"

    # every Redis setting, the same on the replicas and the services; never migrating
    for container in (server, svc):
        env = _env(container)
        for name, value in {**REDIS_BACKENDS, **REPLICA_ENV}.items():
            assert env[name]["value"] == value, name
        assert env["PREFECT_REDIS_MESSAGING_HOST"]["value"] == "setlist-redis"
        assert env["PREFECT_REDIS_MESSAGING_PORT"]["value"] == "6379"
        assert env["PREFECT_REDIS_MESSAGING_DB"]["value"] == "0"
        ref = env["PREFECT_REDIS_MESSAGING_PASSWORD"]["valueFrom"]["secretKeyRef"]
        assert ref == {"name": "setlist-redis", "key": "password"}
        docket = env["PREFECT_SERVER_DOCKET_URL"]["value"]
        assert docket == "redis://:$(PREFECT_REDIS_MESSAGING_PASSWORD)@setlist-redis:6379/1"
        names = [e["name"] for e in container["env"]]
        # $(VAR) expands only from variables listed before it
        assert names.index("PREFECT_REDIS_MESSAGING_PASSWORD") < names.index(
            "PREFECT_SERVER_DOCKET_URL"
        )
        db_ref = env["PREFECT_SERVER_DATABASE_PASSWORD"]["valueFrom"]["secretKeyRef"]
        assert db_ref == {"name": "setlist-postgres", "key": "password"}
        auth = env["PREFECT_SERVER_API_AUTH_STRING"]["valueFrom"]["secretKeyRef"]
        assert auth == {"name": "setlist-platform-credentials", "key": "api-auth"}
        assert "value" not in env["PREFECT_SERVER_API_AUTH_STRING"]
    server_env, services_env = _env(server), _env(svc)
    key = server_env["SETLIST_PLATFORM_KEY"]["valueFrom"]["secretKeyRef"]
    assert key == {"name": "setlist-platform-credentials", "key": "platform-key"}
    assert "SETLIST_PLATFORM_KEY" not in services_env  # no gate in the services process
    assert set(services_env) == set(server_env) - {"SETLIST_PLATFORM_KEY"}

    # the PDB, the Service and the API's NetworkPolicy select exactly the API pods
    api_labels = api["spec"]["template"]["metadata"]["labels"]
    selector = api["spec"]["selector"]
    pdb = by[("PodDisruptionBudget", "prefect-server")]["spec"]
    assert pdb["selector"] == selector and pdb["minAvailable"] == 1
    assert by[("Service", "prefect-server")]["spec"]["selector"] == selector["matchLabels"]
    ingress = by[("NetworkPolicy", "prefect-server-ingress")]["spec"]
    assert ingress["podSelector"] == selector
    assert api_labels["app.kubernetes.io/name"] == "prefect-server"
    for other in (services, migrate):
        labels = other["spec"]["template"]["metadata"]["labels"]
        assert not all(labels.get(k) == v for k, v in selector["matchLabels"].items())
        # PostgreSQL admits every pod of the Prefect server (API, services, migration)
        assert labels["app.kubernetes.io/name"] == "prefect-server"
    postgres = by[("NetworkPolicy", "setlist-postgres")]["spec"]["ingress"][0]["from"][0]
    assert postgres["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "prefect-server"}

    # Redis: its password from a Secret, reachable from the replicas and services only
    redis = by[("StatefulSet", "setlist-redis")]["spec"]["template"]["spec"]
    (container,) = redis["containers"]
    assert "requirepass" not in container["args"][0].splitlines()[-1]  # not on argv
    ref = _env(container)["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]
    assert ref == {"name": "setlist-redis", "key": "password"}
    (rule,) = by[("NetworkPolicy", "setlist-redis")]["spec"]["ingress"]
    (peer,) = rule["from"]
    assert peer["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "prefect-server"}
    (components,) = peer["podSelector"]["matchExpressions"]
    assert components["operator"] == "In"
    assert sorted(components["values"]) == ["api", "services"]
    assert rule["ports"] == [{"protocol": "TCP", "port": 6379}]


@pytest.mark.parametrize(
    "path", ["k8s/base", "k8s/overlays/dev", "k8s/overlays/prod", "k8s/overlays/ha"]
)
def test_the_jobs_images_are_set_in_step_with_the_platforms_image(path):
    """The pods of the platform and the pools' job templates (SETLIST_IMAGE, read by the
    worker and the dispatcher from setlist-config) name the same build."""
    from setlist.core.settings import Settings

    docs = _kustomize(path)
    (config,) = [
        d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "setlist-config"
    ]
    data = config["data"]
    images = {
        c["image"]
        for d in docs
        if d["kind"] in ("Deployment", "StatefulSet", "Job")
        for c in d["spec"]["template"]["spec"]["containers"]
        if c["image"].startswith("ghcr.io/setlist/runtime")
    }
    assert images == {data["SETLIST_IMAGE"]}
    settings = Settings(image=data["SETLIST_IMAGE"], gpu_image=data["SETLIST_GPU_IMAGE"])
    cpu_pin = settings.image.removeprefix("ghcr.io/setlist/runtime")
    assert settings.gpu_image.startswith("ghcr.io/setlist/runtime-gpu")
    assert data["SETLIST_CODE_DIR"] == "/opt/setlist"  # images/Dockerfile's WORKDIR
    if path.endswith("prod"):
        assert cpu_pin.startswith("@sha256:") and "@sha256:" in settings.gpu_image


def test_pin_image_pins_prod_by_digest(tmp_path):
    tree = tmp_path / "k8s"
    shutil.copytree(REPO_ROOT / "k8s", tree)
    runtime = "registry.example/setlist/runtime@sha256:" + "1" * 64
    gpu = "registry.example/setlist/runtime-gpu:0.2.0@sha256:" + "2" * 64
    pin = [str(REPO_ROOT / ".venv/bin/python"), str(REPO_ROOT / "images/pin.py")]
    out = tree / "overlays/prod/pins/kustomization.yaml"
    subprocess.run([*pin, runtime, gpu, str(out)], check=True, capture_output=True)
    kubectl = shutil.which("kubectl") or pytest.skip("kubectl is not installed")
    built = subprocess.run(
        [kubectl, "kustomize", str(tree / "overlays/prod")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    docs = [d for d in yaml.safe_load_all(built) if d]
    (config,) = [
        d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "setlist-config"
    ]
    assert config["data"]["SETLIST_IMAGE"] == runtime
    assert (
        config["data"]["SETLIST_GPU_IMAGE"]
        == "registry.example/setlist/runtime-gpu@sha256:" + "2" * 64
    )
    workers = [
        d
        for d in docs
        if d["kind"] == "Deployment" and d["metadata"]["name"].startswith("setlist-worker")
    ]
    assert workers and {
        d["spec"]["template"]["spec"]["containers"][0]["image"] for d in workers
    } == {runtime}
    bad = subprocess.run(
        [*pin, "ghcr.io/setlist/runtime:0.2.0", gpu, str(out)], capture_output=True, text=True
    )
    assert bad.returncode != 0 and "is not name@sha256" in bad.stderr
