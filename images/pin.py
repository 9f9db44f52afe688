"""Pin overlays/prod to the images a release pushed, by digest.

    .venv/bin/python images/pin.py RUNTIME@sha256:… GPU@sha256:… [OUT]

Each reference is what the push printed (`docker push`, `podman push --digestfile`,
`crane digest`): name@sha256:<64 hex>. Writes the kustomize Component that overlays/prod
includes (default k8s/overlays/prod/pins/kustomization.yaml): an image transformer that
rewrites every Deployment's ghcr.io/setlist/runtime to the pinned digest, and the
settings that name the tenant jobs' images (SETLIST_IMAGE, SETLIST_GPU_IMAGE) to the same
pins, so the worker's pools and the cluster's pods run the bytes that were tested.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import yaml

DIGEST = re.compile(r"(?P<name>[^@\s]+?)(?::[A-Za-z0-9_.-]+)?@(?P<digest>sha256:[a-f0-9]{64})")
BASE_NAME = "ghcr.io/setlist/runtime"
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "k8s/overlays/prod/pins/kustomization.yaml"


def component(runtime: str, gpu: str) -> dict:
    pins = {}
    for what, ref in (("runtime", runtime), ("gpu", gpu)):
        match = DIGEST.fullmatch(ref)
        if not match:
            raise SystemExit(f"{what} image {ref!r} is not name@sha256:<64 hex>")
        pins[what] = match
    run = pins["runtime"]
    return {
        "apiVersion": "kustomize.config.k8s.io/v1alpha1",
        "kind": "Component",
        "images": [
            {"name": BASE_NAME, "newName": run["name"], "digest": run["digest"]},
        ],
        "patches": [
            {
                "target": {"kind": "ConfigMap", "name": "setlist-config"},
                "patch": yaml.safe_dump(
                    [
                        {
                            "op": "replace",
                            "path": f"/data/{key}",
                            "value": f"{pins[what]['name']}@{pins[what]['digest']}",
                        }
                        for key, what in (
                            ("SETLIST_IMAGE", "runtime"),
                            ("SETLIST_GPU_IMAGE", "gpu"),
                        )
                    ],
                    sort_keys=False,
                ),
            }
        ],
    }


def main(argv: list[str]) -> int:
    if len(argv) not in (2, 3):
        print(__doc__, file=sys.stderr)
        return 2
    out = Path(argv[2]) if len(argv) == 3 else DEFAULT_OUT
    body = yaml.safe_dump(component(argv[0], argv[1]), sort_keys=False)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("# Written by `make pin-image` (images/pin.py): the images prod runs.\n" + body)
    print(f"pinned {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
