"""The one way Setlist reaches a Kubernetes API: in-cluster credentials, else kubeconfig.

The service account comes first because that is how the platform runs in a cluster; a
laptop or CI machine has no service account and falls back to ``~/.kube/config`` (or
``KUBECONFIG``). ``kubernetes`` is imported here, lazily, so that code which only renders
manifests never pays for it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kubernetes.client import ApiClient


def load_api_client() -> ApiClient:
    """A client on the in-cluster service account, or on the kubeconfig outside a cluster.

    Loading also sets the ``kubernetes`` package's default configuration, which API
    objects built without a client use.
    """
    from kubernetes import config as kube_config
    from kubernetes.client import ApiClient

    try:
        kube_config.load_incluster_config()
    except kube_config.ConfigException:
        kube_config.load_kube_config()
    return ApiClient()
