"""The one way Setlist reaches a Kubernetes API: in-cluster credentials, else kubeconfig.

The service account comes first because that is how the platform runs in a cluster; a
laptop or CI machine has no service account and falls back to ``~/.kube/config`` (or
``KUBECONFIG``). A context named by the operator always comes from the kubeconfig.
``kubernetes`` is imported here, lazily, so that code which only renders manifests never
pays for it.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kubernetes.client import ApiClient


def kubeconfig_path() -> str:
    """``KUBECONFIG`` (one path, or several joined by ``os.pathsep``), else
    ``~/.kube/config``: read when called (the ``kubernetes`` package reads it once, at
    import)."""
    return os.environ.get("KUBECONFIG") or "~/.kube/config"


def load_api_client(context: str | None = None) -> ApiClient:
    """A client on the in-cluster service account, or on the kubeconfig outside a cluster;
    with ``context``, on that context of the kubeconfig.

    Loading also sets the ``kubernetes`` package's default configuration, which API
    objects built without a client use. A missing or unusable kubeconfig raises
    ``kubernetes.config.ConfigException``.
    """
    from kubernetes import config as kube_config
    from kubernetes.client import ApiClient

    if context is None:
        try:
            kube_config.load_incluster_config()
            return ApiClient()
        except kube_config.ConfigException:
            pass
    kube_config.load_kube_config(config_file=kubeconfig_path(), context=context)
    return ApiClient()
