"""Pod Security Standards "restricted", checked on any object that carries a pod spec.

Kubernetes enforces this profile at admission through namespace labels; Setlist checks
the same rules on what it renders, so a template regression fails a test (and, later, a
security scan) instead of a deploy. Returns violations; an empty list means compliant.
"""

from __future__ import annotations

from typing import Any

_ALLOWED_CAPS_ADD = {"NET_BIND_SERVICE"}
_ALLOWED_VOLUME_TYPES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
}


def pod_spec_of(obj: dict[str, Any]) -> dict[str, Any] | None:
    """The pod spec inside a Pod, Job, CronJob, Deployment, StatefulSet or DaemonSet."""
    kind = obj.get("kind")
    spec = obj.get("spec") or {}
    if kind == "Pod":
        return spec
    if kind == "CronJob":
        return spec.get("jobTemplate", {}).get("spec", {}).get("template", {}).get("spec")
    if kind in ("Job", "Deployment", "StatefulSet", "DaemonSet", "ReplicaSet"):
        return spec.get("template", {}).get("spec")
    return None


def restricted_violations(obj: dict[str, Any]) -> list[str]:
    spec = pod_spec_of(obj)
    if spec is None:
        return []
    out: list[str] = []
    pod_sc = spec.get("securityContext") or {}
    for field in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(field):
            out.append(f"{field} is true")
    for vol in spec.get("volumes") or []:
        kinds = set(vol) - {"name"}
        if not kinds <= _ALLOWED_VOLUME_TYPES:
            out.append(f"volume {vol.get('name')} uses {sorted(kinds - _ALLOWED_VOLUME_TYPES)}")
    containers = [
        *(spec.get("initContainers") or []),
        *(spec.get("containers") or []),
        *(spec.get("ephemeralContainers") or []),
    ]
    pod_seccomp = (pod_sc.get("seccompProfile") or {}).get("type")
    for c in containers:
        name = c.get("name", "?")
        sc = c.get("securityContext") or {}
        if sc.get("privileged"):
            out.append(f"{name}: privileged")
        if sc.get("allowPrivilegeEscalation") is not False:
            out.append(f"{name}: allowPrivilegeEscalation is not false")
        non_root = sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot"))
        if non_root is not True:
            out.append(f"{name}: runAsNonRoot is not true")
        if sc.get("runAsUser", pod_sc.get("runAsUser")) == 0:
            out.append(f"{name}: runAsUser is 0")
        seccomp = (sc.get("seccompProfile") or {}).get("type") or pod_seccomp
        if seccomp not in ("RuntimeDefault", "Localhost"):
            out.append(f"{name}: seccompProfile is not RuntimeDefault or Localhost")
        caps = sc.get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or []):
            out.append(f"{name}: capabilities do not drop ALL")
        added = set(caps.get("add") or []) - _ALLOWED_CAPS_ADD
        if added:
            out.append(f"{name}: adds capabilities {sorted(added)}")
        for port in c.get("ports") or []:
            if port.get("hostPort"):
                out.append(f"{name}: hostPort {port['hostPort']}")
        # Beyond "restricted", Setlist's own hardening baseline:
        if sc.get("readOnlyRootFilesystem") is not True:
            out.append(f"{name}: root filesystem is writable")
        limits = (c.get("resources") or {}).get("limits") or {}
        if "cpu" not in limits or "memory" not in limits:
            out.append(f"{name}: no cpu/memory limits")
    return out
