"""implicit's ALS, with its conjugate-gradient half-step on a CUDA device.

implicit ships CPU wheels only: its CUDA build fetches RAPIDS at build time, which no
wheel carries and no air-gapped GPU node can do. So the model stays implicit's own
(its fit loop, random initialisation, callbacks, recommend, save), and only the solver
it calls for each half-step is swapped: the same update (Takács et al.'s conjugate
gradient for implicit ALS, ``cg_steps`` steps warm-started from the current factors,
the same per-row stopping rule) run for every row at once with an array module —
CuPy on a GPU, NumPy on the CPU. On NumPy it is what the test-suite compares with
implicit's native solver, so the GPU code path is checked on every CPU run.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from enum import StrEnum
from types import ModuleType
from typing import Any

import numpy as np
from implicit.cpu.als import AlternatingLeastSquares

from setlist.core.tenancy import SetlistError

# Bytes of the temporary (non-zeros × factors) arrays a half-step gathers at once.
GATHER_BYTES = {"numpy": 1 << 28, "cuda": 1 << 32}
CONVERGED = 1e-20  # implicit's threshold on the squared residual


class Device(StrEnum):
    """Where training runs. ``auto`` takes a CUDA device when one is present."""

    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


@dataclass(frozen=True)
class Backend:
    """An array module and its sparse module: NumPy/SciPy or CuPy/cupyx."""

    name: str
    xp: ModuleType
    sparse: ModuleType

    def to_device(self, array: Any) -> Any:
        return self.xp.asarray(array)

    def to_host(self, array: Any) -> np.ndarray:
        return array.get() if hasattr(array, "get") else np.asarray(array)


def numpy_backend() -> Backend:
    import scipy.sparse

    return Backend("numpy", np, scipy.sparse)


@functools.cache
def cuda_backend() -> Backend | None:
    """CuPy on the first CUDA device, or None where there is no usable one."""
    try:
        import cupy
        import cupyx.scipy.sparse

        if cupy.cuda.runtime.getDeviceCount() < 1:
            return None
        cupy.zeros(1).sum()  # a driver that lists a device but can't run fails here
    except Exception:  # noqa: BLE001 - no CuPy, no driver, no device: all mean "no GPU"
        return None
    return Backend("cuda", cupy, cupyx.scipy.sparse)


def resolve_device(requested: Device | str) -> Device:
    """``auto`` → cuda if a device is usable, else cpu; ``cuda`` without one is refused."""
    requested = Device(requested)
    has_gpu = cuda_backend() is not None
    if requested is Device.auto:
        return Device.cuda if has_gpu else Device.cpu
    if requested is Device.cuda and not has_gpu:
        raise SetlistError(
            "device 'cuda' was asked for but no usable CUDA device (or CuPy) is present; "
            "use device 'auto' or 'cpu'"
        )
    return requested


class _DeviceMatrix:
    """One confidence matrix on the backend, with its row index per non-zero."""

    def __init__(self, be: Backend, csr: Any):
        xp = be.xp
        self.shape = csr.shape
        self.indptr = be.to_device(csr.indptr.astype(np.int32))
        self.indices = be.to_device(csr.indices.astype(np.int32))
        conf = be.to_device(csr.data.astype(np.float32))
        self.positive = conf > 0
        self.conf = conf
        self.conf_abs = xp.abs(conf)
        rows = np.repeat(np.arange(csr.shape[0], dtype=np.int32), np.diff(csr.indptr))
        self.rows = be.to_device(rows)  # built on the host: cupy.repeat takes host counts


class BatchedCG:
    """A solver with implicit's signature ``(Cui, X, Y, regularization, ...)``.

    Updates ``X`` in place like implicit's. The backend copies of the two confidence
    matrices (users × items and its transpose) are kept between calls.
    """

    def __init__(self, backend: Backend):
        self.backend = backend
        self._matrices: dict[int, tuple[Any, _DeviceMatrix]] = {}

    def _matrix(self, csr: Any) -> _DeviceMatrix:
        hit = self._matrices.get(id(csr))
        if hit is None or hit[0] is not csr:
            if len(self._matrices) >= 2:
                self._matrices.clear()
            hit = (csr, _DeviceMatrix(self.backend, csr))
            self._matrices[id(csr)] = hit
        return hit[1]

    def __call__(self, Cui, X, Y, regularization, num_threads=0, cg_steps=3):  # noqa: N803
        be = self.backend
        m = self._matrix(Cui)
        x = be.to_device(X)
        y = be.to_device(Y)
        if be.name == "numpy":
            x = x.copy()  # like a device copy: X changes only when the update is done
        cg_update(be, m, x, y, float(regularization), cg_steps)
        X[...] = be.to_host(x)


def cg_update(be: Backend, m: _DeviceMatrix, x: Any, y: Any, reg: float, cg_steps: int) -> None:
    """implicit's ``least_squares_cg``, batched over every row of ``x`` (in place)."""
    xp = be.xp
    n_rows, n_factors = x.shape
    yty = y.T @ y + xp.asarray(reg * np.eye(n_factors, dtype=np.float32))

    chunk = max(1024, GATHER_BYTES.get(be.name, 1 << 28) // (8 * n_factors))

    def rowdot(a):
        """For each non-zero (u, i): a[u] · y[i]."""
        out = xp.empty(m.rows.shape[0], dtype=xp.float32)
        for s in range(0, out.shape[0], chunk):
            e = s + chunk
            out[s:e] = (a[m.rows[s:e]] * y[m.indices[s:e]]).sum(axis=1)
        return out

    def scatter(weights):
        """For each row u: Σ_i weights[u, i] · y[i]."""
        return be.sparse.csr_matrix((weights, m.indices, m.indptr), shape=m.shape) @ y

    d = rowdot(x)
    w = xp.where(m.positive, m.conf - (m.conf - 1) * d, -(m.conf_abs - 1) * d)
    r = scatter(w.astype(xp.float32)) - x @ yty
    p = r.copy()
    rsold = (r * r).sum(axis=1)
    active = rsold >= CONVERGED
    for _ in range(cg_steps):
        if not bool(active.any()):
            break
        ap = p @ yty + scatter(((m.conf_abs - 1) * rowdot(p)).astype(xp.float32))
        pap = (p * ap).sum(axis=1)
        alpha = xp.where(active, rsold / xp.where(active, pap, 1), 0).astype(xp.float32)
        x += alpha[:, None] * p
        r -= alpha[:, None] * ap
        rsnew = (r * r).sum(axis=1)
        active &= rsnew >= CONVERGED
        beta = xp.where(active, rsnew / xp.where(rsold > 0, rsold, 1), 0).astype(xp.float32)
        p = r + beta[:, None] * p
        rsold = rsnew


class ALSModel(AlternatingLeastSquares):
    """implicit's ALS model, with the half-step solver of the chosen backend.

    ``backend=None`` keeps implicit's native multi-threaded solver (the CPU path).
    """

    def __init__(self, *, backend: Backend | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        self._batched = BatchedCG(backend) if backend is not None else None

    @property
    def solver(self):
        if self._batched is None:
            return super().solver
        return functools.partial(self._batched, cg_steps=self.cg_steps)


def make_model(device: Device, **params: Any) -> ALSModel:
    """The model for a resolved device: cpu → implicit's solver, cuda → CuPy's."""
    device = resolve_device(device)
    backend = cuda_backend() if device is Device.cuda else None
    return ALSModel(backend=backend, **params)
