"""`apply_kit` (what `setlist tenant create` runs when a cluster is configured) through
the real `kubernetes` dynamic client — discovery, then a server-side apply PATCH per
object — against kmock's emulated API.

Two gaps of the emulator are filled here, as the API server behaves: a cluster-scoped
object's path (``/api/v1/namespaces/NAME``) names the object, not a namespace; and an
apply PATCH (``application/apply-patch+yaml``) creates a missing object and merges into
an existing one. Field ownership (managers, conflicts) is not emulated.
"""

from __future__ import annotations

import asyncio
import re

import kmock
import pytest
from kubernetes.client import ApiClient, Configuration

from blocks.tenant import TenantProfile
from setlist.core.tenancy import TenantQuota, tenant_namespace
from setlist.k8s.tenant_kit import apply_kit, build_kit

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

_CLUSTER_SCOPED = re.compile(r"^/api/v1/namespaces/([^/]+)$")

# plural: (apiVersion, kind, namespaced)
KIT_RESOURCES = {
    "v1/namespaces": ("Namespace", False),
    "v1/resourcequotas": ("ResourceQuota", True),
    "v1/limitranges": ("LimitRange", True),
    "v1/serviceaccounts": ("ServiceAccount", True),
    "networking.k8s.io/v1/networkpolicies": ("NetworkPolicy", True),
    "rbac.authorization.k8s.io/v1/rolebindings": ("RoleBinding", True),
    "kueue.x-k8s.io/v1beta1/localqueues": ("LocalQueue", True),
}


class ApplyEmulator(kmock.KubernetesEmulator):
    """kmock's emulator with the API server's server-side apply (as an upsert).

    The request is re-read in place: kmock tracks each request by identity."""

    async def _handle(self, request):
        def reread(**fields) -> None:
            for name, value in fields.items():
                object.__setattr__(request, name, value)  # a frozen attrs instance

        match = _CLUSTER_SCOPED.match(request.url.path)
        if match:
            actions = {
                kmock.method.GET: kmock.action.FETCH,
                kmock.method.PATCH: kmock.action.UPDATE,
                kmock.method.DELETE: kmock.action.DELETE,
            }
            reread(
                resource=kmock.resource("", "v1", "namespaces"),
                namespace=None,
                name=match[1],
                action=actions.get(request.method, request.action),
            )
        if (
            request.action == kmock.action.UPDATE
            and request.headers.get("Content-Type", "").startswith("application/apply-patch")
            and (request.resource, request.namespace, request.name) not in self.objects
        ):
            # as the POST that creates it: no name in the path, the name in the body
            reread(action=kmock.action.CREATE, method=kmock.method.POST, name=None)
        return await super()._handle(request)


@pytest.fixture
async def cluster():
    async with ApplyEmulator() as emulator, kmock.Server(emulator) as server:
        for plural, (kind, namespaced) in KIT_RESOURCES.items():
            emulator.resources[plural] = kmock.ResourceInfo(
                kind=kind,
                namespaced=namespaced,
                verbs={"get", "list", "create", "patch", "delete"},
            )
        yield emulator, str(server.url).rstrip("/")


def _key(obj: dict) -> tuple[str, str | None, str]:
    """(group/plural as kmock keys it, namespace, name) of a rendered object."""
    plural = next(p for p, (kind, _) in KIT_RESOURCES.items() if kind == obj["kind"])
    group = plural.split("/")[0] if "." in plural else ""
    meta = obj["metadata"]
    return (f"{group}/{plural.rsplit('/', 1)[1]}", meta.get("namespace"), meta["name"])


def _objects(emulator) -> dict[tuple[str, str | None, str], dict]:
    return {
        (f"{key[0].group}/{key[0].plural}", key[1], key[2]): obj.raw
        for key, obj in emulator.objects.items()
        if not obj.deleted
    }


def _apply(url: str, profile: TenantProfile) -> list[str]:
    with ApiClient(Configuration(host=url)) as api:
        return apply_kit(profile, api)


async def test_apply_creates_the_kit_and_a_second_apply_changes_nothing(cluster):
    emulator, url = cluster
    profile = TenantProfile(
        tenant_id="acme", quota=TenantQuota(concurrent_jobs=3, cpu="12", memory="48Gi")
    )
    kit = build_kit(profile)
    applied = await asyncio.to_thread(_apply, url, profile)
    assert applied == [
        f"{o['kind']}/{o['metadata'].get('namespace', '')}/{o['metadata']['name']}" for o in kit
    ]
    stored = _objects(emulator)
    assert set(stored) == {_key(o) for o in kit}
    namespace = stored[("/namespaces", None, tenant_namespace("acme"))]
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    for obj in kit:  # every object arrived as rendered, in the tenant's namespace
        got = stored[_key(obj)]
        assert got["metadata"].get("namespace") == obj["metadata"].get("namespace")
        for field in ("spec", "subjects", "roleRef"):
            assert got.get(field) == obj.get(field), (obj["kind"], field)

    # Idempotent: the same kit again leaves the same objects, none duplicated.
    assert await asyncio.to_thread(_apply, url, profile) == applied
    assert _objects(emulator) == stored

    # A changed quota is applied in place (and a tier it now fits gets its LocalQueue).
    bigger = profile.model_copy(update={"quota": TenantQuota(concurrent_jobs=5, cpu="20")})
    await asyncio.to_thread(_apply, url, bigger)
    after = _objects(emulator)
    assert set(after) == {_key(o) for o in build_kit(bigger)} > set(stored)
    quota = next(o for o in build_kit(bigger) if o["kind"] == "ResourceQuota")
    assert after[_key(quota)]["spec"] == quota["spec"] != stored[_key(quota)]["spec"]
