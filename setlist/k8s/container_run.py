"""A Kubernetes Job's container, run by podman exactly as its pod spec asks.

The job templates promise a restricted pod: uid 10001, a read-only root filesystem,
every capability dropped, no privilege escalation, a size-limited ``/tmp`` emptyDir, the
tier's CPU and memory. A manifest that validates proves none of that works with the
image; running the image under those settings does. ``podman_run`` translates one Job
(as ``setlist render-job`` prints it, or as the worker created it) into ``podman run``
arguments, field by field, and refuses what it cannot reproduce rather than run
something laxer than the cluster would:

- one container, no init containers; ``command`` → ``--entrypoint``, ``args`` → the
  arguments, ``workingDir`` → ``--workdir``;
- ``env`` values (and ``secretKeyRef`` from the secrets given), passed by name so that
  a credential never appears in the process list;
- pod and container ``securityContext``: ``runAsUser``/``runAsGroup`` → ``--user``,
  ``fsGroup`` → ``--group-add``, ``runAsNonRoot`` checked as the kubelet does (refused
  for uid 0, or for an image whose user is root when no uid is set),
  ``readOnlyRootFilesystem`` → ``--read-only`` without podman's own tmpfs mounts,
  ``capabilities`` → ``--cap-drop``/``--cap-add``, ``allowPrivilegeEscalation: false``
  → ``no-new-privileges``, ``seccompProfile`` RuntimeDefault (podman's default) or
  Unconfined;
- ``emptyDir`` volumes → tmpfs mounts of their ``sizeLimit``, writable by any uid like
  an emptyDir;
- ``resources.limits`` → ``--cpus``, ``--memory``, and a GPU count → CDI devices;
- ``activeDeadlineSeconds`` → ``--timeout``, ``terminationGracePeriodSeconds`` →
  ``--stop-timeout``.

Scheduling fields (priority class, tolerations, affinity, service account without a
token) have no meaning on one machine and are ignored; so is the pod network: the
caller passes the network it needs (``--network host`` to reach loopback services).
"""

from __future__ import annotations

import json
import math
import shlex
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubernetes.utils.quantity import parse_quantity

from setlist.core.tenancy import SetlistError


class UntranslatableJob(SetlistError):
    """The Job asks for something a local container run cannot reproduce faithfully."""


# Pod fields translated below, or that only place a pod on a node (meaningless on one
# machine).
_POD_FIELDS = {
    "affinity",
    "nodeSelector",
    "tolerations",
    "priorityClassName",
    "priority",
    "schedulerName",
    "topologySpreadConstraints",
    "serviceAccountName",
    "serviceAccount",
    "enableServiceLinks",
    "restartPolicy",
    "terminationGracePeriodSeconds",
    "containers",
    "volumes",
    "securityContext",
    "automountServiceAccountToken",
    "dnsPolicy",
    "preemptionPolicy",
}
_CONTAINER_FIELDS = {
    "name",
    "image",
    "imagePullPolicy",
    "command",
    "args",
    "env",
    "workingDir",
    "resources",
    "securityContext",
    "volumeMounts",
    "ports",
    "livenessProbe",
    "readinessProbe",
    "startupProbe",
    "terminationMessagePath",
    "terminationMessagePolicy",
}
_SECURITY_FIELDS = {
    "runAsUser",
    "runAsGroup",
    "runAsNonRoot",
    "fsGroup",
    "readOnlyRootFilesystem",
    "allowPrivilegeEscalation",
    "privileged",
    "capabilities",
    "seccompProfile",
    "supplementalGroups",
}
_GPU_RESOURCES = ("nvidia.com/gpu",)


@dataclass
class ContainerRun:
    """``podman run`` arguments (after ``run``) and the environment to run them with:
    variables are passed by name, their values only through the environment."""

    args: list[str]
    env: dict[str, str] = field(default_factory=dict)
    name: str = ""

    def command(self, podman: Sequence[str] = ("podman",)) -> list[str]:
        return [*podman, "run", *self.args]

    def shell(self, podman: Sequence[str] = ("podman",)) -> str:
        """The command as a shell line, values as ``$NAME`` references (never printed)."""
        return shlex.join(self.command(podman))


def _pod_spec(job: Mapping[str, Any]) -> dict[str, Any]:
    if job.get("kind") != "Job":
        raise UntranslatableJob(f"kind {job.get('kind')!r}: only a Job is translated")
    return dict(((job.get("spec") or {}).get("template") or {}).get("spec") or {})


def _refuse_unknown(where: str, given: Mapping[str, Any], known: set[str]) -> None:
    unknown = sorted(k for k, v in given.items() if k not in known and v not in (None, [], {}))
    if unknown:
        raise UntranslatableJob(f"{where}: {', '.join(unknown)} cannot be run locally")


def _security(pod: Mapping[str, Any], container: Mapping[str, Any]) -> dict[str, Any]:
    """The container's effective security context: its own fields over the pod's."""
    pod_sc = dict(pod.get("securityContext") or {})
    own = dict(container.get("securityContext") or {})
    _refuse_unknown("pod securityContext", pod_sc, _SECURITY_FIELDS)
    _refuse_unknown("container securityContext", own, _SECURITY_FIELDS)
    return {**pod_sc, **own}


def _user_args(sc: Mapping[str, Any], image_user: str | None) -> list[str]:
    uid, gid = sc.get("runAsUser"), sc.get("runAsGroup")
    if sc.get("runAsNonRoot"):
        if uid == 0:
            raise UntranslatableJob("runAsNonRoot is true but runAsUser is 0")
        if uid is None:
            name = (image_user or "").split(":")[0]
            if not name.isdigit() or int(name) == 0:
                # the kubelet's rule: without a uid it must be able to tell the image's
                raise UntranslatableJob(
                    f"runAsNonRoot is true and the image runs as {image_user or 'root'!r}; "
                    "set runAsUser or a numeric non-root USER in the image"
                )
    args: list[str] = []
    if uid is not None:
        args += ["--user", f"{uid}:{gid}" if gid is not None else str(uid)]
    for group in [sc.get("fsGroup"), *(sc.get("supplementalGroups") or [])]:
        if group is not None:
            args += ["--group-add", str(group)]
    return args


def _hardening_args(sc: Mapping[str, Any]) -> list[str]:
    args: list[str] = []
    if sc.get("privileged"):
        args.append("--privileged")
    if sc.get("readOnlyRootFilesystem"):
        args += ["--read-only", "--read-only-tmpfs=false"]
    caps = sc.get("capabilities") or {}
    for cap in caps.get("drop") or []:
        args += ["--cap-drop", str(cap)]
    for cap in caps.get("add") or []:
        args += ["--cap-add", str(cap)]
    if sc.get("allowPrivilegeEscalation") is False:
        args += ["--security-opt", "no-new-privileges"]
    seccomp = (sc.get("seccompProfile") or {}).get("type", "RuntimeDefault")
    if seccomp == "Unconfined":
        args += ["--security-opt", "seccomp=unconfined"]
    elif seccomp != "RuntimeDefault":
        raise UntranslatableJob(f"seccompProfile {seccomp!r} cannot be run locally")
    return args


def _volume_args(pod: Mapping[str, Any], container: Mapping[str, Any]) -> list[str]:
    volumes = {v["name"]: v for v in pod.get("volumes") or []}
    args: list[str] = []
    for mount in container.get("volumeMounts") or []:
        volume = volumes.get(mount["name"])
        if volume is None:
            raise UntranslatableJob(f"volumeMount {mount['name']!r} names no volume")
        kinds = sorted(set(volume) - {"name"})
        if kinds != ["emptyDir"]:
            raise UntranslatableJob(
                f"volume {mount['name']!r} is {', '.join(kinds)}: only emptyDir runs locally"
            )
        if mount.get("subPath") or mount.get("readOnly"):
            raise UntranslatableJob(f"volumeMount {mount['name']!r}: subPath/readOnly")
        spec = ["type=tmpfs", f"destination={mount['mountPath']}", "tmpfs-mode=1777"]
        size = (volume.get("emptyDir") or {}).get("sizeLimit")
        if size:
            spec.append(f"tmpfs-size={int(parse_quantity(size))}")
        args += ["--mount", ",".join(spec)]
    return args


def _resource_args(container: Mapping[str, Any]) -> list[str]:
    limits = (container.get("resources") or {}).get("limits") or {}
    args: list[str] = []
    if "cpu" in limits:
        args += ["--cpus", f"{float(parse_quantity(limits['cpu'])):g}"]
    if "memory" in limits:
        args += ["--memory", str(int(parse_quantity(limits["memory"])))]
    for resource in _GPU_RESOURCES:
        count = int(parse_quantity(limits.get(resource, 0)))
        args += [a for i in range(count) for a in ("--device", f"{resource}={i}")]
    unknown = sorted(set(limits) - {"cpu", "memory", "ephemeral-storage", *_GPU_RESOURCES})
    if unknown:
        raise UntranslatableJob(f"resource limits {', '.join(unknown)} cannot be run locally")
    return args


def _env(container: Mapping[str, Any], secrets: Mapping[tuple[str, str], str]) -> dict[str, str]:
    env: dict[str, str] = {}
    for var in container.get("env") or []:
        name = var["name"]
        if "valueFrom" not in var:
            env[name] = "" if var.get("value") is None else str(var["value"])
            continue
        ref = var["valueFrom"].get("secretKeyRef")
        if not ref:
            raise UntranslatableJob(f"env {name}: only values and secretKeyRef run locally")
        key = (ref["name"], ref["key"])
        if key not in secrets:
            if ref.get("optional"):
                continue
            raise UntranslatableJob(f"env {name}: secret {key[0]}/{key[1]} was not given")
        env[name] = secrets[key]
    return env


def podman_run(
    job: Mapping[str, Any],
    *,
    image_user: str | None = None,
    secrets: Mapping[tuple[str, str], str] | None = None,
    image: str | None = None,
    extra: Sequence[str] = (),
) -> ContainerRun:
    """``podman run`` for this Job's one container, as its pod would run.

    ``image_user`` is the image's configured USER (for the ``runAsNonRoot`` check when
    the pod sets no uid); ``secrets`` maps (secret, key) to values for ``secretKeyRef``;
    ``image`` replaces the Job's image (a locally built tag of the same build); ``extra``
    goes before the image (the network, the machine's ulimits).
    """
    pod = _pod_spec(job)
    _refuse_unknown("pod spec", pod, _POD_FIELDS)
    if pod.get("automountServiceAccountToken") is not False:
        raise UntranslatableJob(
            "the pod mounts a service account token, which only a cluster can issue; "
            "a Setlist job pod sets automountServiceAccountToken: false"
        )
    containers = pod.get("containers") or []
    if len(containers) != 1:
        raise UntranslatableJob(f"{len(containers)} containers: one is translated")
    (container,) = containers
    _refuse_unknown("container", container, _CONTAINER_FIELDS)
    sc = _security(pod, container)
    meta = job.get("metadata") or {}
    name = str(meta.get("name") or meta.get("generateName") or container["name"]).rstrip("-")
    env = _env(container, secrets or {})
    args = ["--rm", "--name", name, "--pull", "never"]
    args += [
        a for k, v in sorted((meta.get("labels") or {}).items()) for a in ("--label", f"{k}={v}")
    ]
    args += _user_args(sc, image_user)
    args += _hardening_args(sc)
    args += _volume_args(pod, container)
    args += _resource_args(container)
    args += [a for k in env for a in ("--env", k)]
    if container.get("workingDir"):
        args += ["--workdir", container["workingDir"]]
    spec = job.get("spec") or {}
    if spec.get("activeDeadlineSeconds"):
        args += ["--timeout", str(int(spec["activeDeadlineSeconds"]))]
    grace = pod.get("terminationGracePeriodSeconds")
    if grace is not None:
        args += ["--stop-timeout", str(math.ceil(float(grace)))]
    if container.get("command"):
        args += ["--entrypoint", json.dumps(list(container["command"]))]
    args += [*extra, image or container["image"], *(container.get("args") or [])]
    return ContainerRun(args=args, env=env, name=name)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m setlist.k8s.container_run [JOB.yaml]``: print the podman command
    for a Job manifest (stdin by default), values of its variables left out."""
    import yaml

    argv = list(sys.argv[1:] if argv is None else argv)
    text = Path(argv[0]).read_text() if argv and argv[0] != "-" else sys.stdin.read()
    try:
        run = podman_run(yaml.safe_load(text))
    except UntranslatableJob as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(run.shell())
    return 0


if __name__ == "__main__":
    sys.exit(main())
