"""Power-function EMA and its post-hoc reconstruction (Karras et al. 2024, "Analyzing and Improving the Training
Dynamics of Diffusion Models" (EDM2), Sec. 3.1 and App. C.1-C.2).

Why: the EMA length that makes the best teacher or student is not known before training, and a run per length
costs a run each. A power-function EMA with exponent gamma averages the whole trajectory with weights
proportional to tau^gamma,

    theta_hat_gamma(t) = int_0^t tau^gamma theta(tau) dtau / int_0^t tau^gamma dtau,

updated per step as theta_hat(t) = beta(t) theta_hat(t - 1) + (1 - beta(t)) theta(t), beta(t) = (1 - 1/t)^(gamma+1).
Its length is the relative standard deviation sigma_rel of the weight profile (the width of the averaging window
over the training time), which depends on gamma alone. Training keeps two of them (two sigma_rels) and saves them
with every checkpoint; afterwards, any other sigma_rel at any checkpoint time is approximated by the linear
combination of the saved snapshots whose weight profiles come closest, in L2, to the wanted one. Choosing that
sigma_rel needs a score of the reconstructed models only: Proximal FD chooses it without clean data.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file


def gamma_of_sigma_rel(sigma_rel: float) -> float:
    """The exponent gamma whose profile has relative standard deviation ``sigma_rel`` (EDM2, Eq. 3): the largest
    real root of sigma_rel^2 (gamma + 2)^2 (gamma + 3) = gamma + 1."""
    # sigma_rel peaks at 1/sqrt(12) at gamma = 0 (the uniform average) and falls to 0 as gamma grows; the largest
    # root is the gamma > 0 one.
    if not 0.0 < sigma_rel < 12 ** -0.5:
        raise ValueError(f"sigma_rel must be in (0, {12 ** -0.5:.3f}), got {sigma_rel}")
    s2 = sigma_rel**2
    roots = np.roots([s2, 7 * s2, 16 * s2 - 1, 12 * s2 - 1])
    return float(max(r.real for r in roots if abs(r.imag) < 1e-9))


def sigma_rel_of_gamma(gamma: float) -> float:
    """The relative standard deviation of the profile tau^gamma on [0, t]."""
    return float(np.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3))))


def power_ema_name(ema_name: str, sigma_rel: float) -> str:
    """The checkpoint module name of the power-function EMA of length ``sigma_rel`` kept beside ``ema_name``:
    ``ema@0p05`` (no dot: checkpoint tensors are named ``module.NAME.KEY``)."""
    return f"{ema_name}@{sigma_rel:g}".replace(".", "p")


def _sigma_rel_of_name(name: str) -> float:
    return float(name.split("@", 1)[1].replace("p", "."))


def power_ema_beta(t: int, gamma: float) -> float:
    """Decay of the ``t``-th update (t = 1, 2, ...): the first update copies the weights, so the average needs
    no warm-up and no initial value."""
    return (1.0 - 1.0 / t) ** (gamma + 1)


def _profile_inner_products(t_a: np.ndarray, g_a: np.ndarray, t_b: np.ndarray, g_b: np.ndarray) -> np.ndarray:
    """<p_a, p_b> = int p_a p_b for the profiles p(tau) = (g + 1) tau^g / t^(g+1) on [0, t], in closed form
    (EDM2, App. C.2), evaluated in logarithms: t^(g+1) overflows for long runs and large gamma."""
    t_a, g_a, t_b, g_b = (np.asarray(x, dtype=np.float64)[..., None] for x in (t_a, g_a, t_b, g_b))
    t_b, g_b = t_b.T, g_b.T
    m = np.minimum(t_a, t_b)
    log = (np.log(g_a + 1) + np.log(g_b + 1) - np.log(g_a + g_b + 1) + (g_a + g_b + 1) * np.log(m)
           - (g_a + 1) * np.log(t_a) - (g_b + 1) * np.log(t_b))
    return np.exp(log)


def posthoc_weights(snapshot_t: Sequence[float], snapshot_gamma: Sequence[float], target_t: float,
                    target_gamma: float) -> np.ndarray:
    """Coefficients x of the snapshots (taken after ``snapshot_t`` steps, exponents ``snapshot_gamma``) whose
    combined weight profile sum_i x_i p_i is closest in L2 to the target's (``target_gamma`` at ``target_t``):
    the normal equations A x = b with A_ij = <p_i, p_j> and b_i = <p_i, p_target>. Times are scaled by the
    largest one first (the solution does not depend on the unit)."""
    t = np.asarray(snapshot_t, dtype=np.float64)
    g = np.asarray(snapshot_gamma, dtype=np.float64)
    if t.shape != g.shape or t.ndim != 1 or len(t) == 0:
        raise ValueError("snapshot_t and snapshot_gamma must be non-empty sequences of the same length")
    if (t <= 0).any() or target_t <= 0:
        raise ValueError("snapshot and target times must be positive")
    scale = max(t.max(), target_t)
    t, tr = t / scale, np.array([target_t / scale])
    a = _profile_inner_products(t, g, t, g)
    b = _profile_inner_products(t, g, tr, np.array([target_gamma]))[:, 0]
    return np.linalg.lstsq(a, b, rcond=None)[0]


SNAPSHOT_DIR = "power_ema"


def save_snapshot(folder: Path, step: int, modules: dict[str, torch.nn.Module]) -> Path:
    """The power EMAs after ``step`` steps as ``folder/step-NNNNNNN.safetensors`` (written atomically). Kept apart
    from the checkpoints, which a run may prune (``keep_checkpoints``) and which carry optimiser state: the
    reconstruction needs every snapshot and only the averaged weights."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {f"{name}.{key}": value.detach().cpu().contiguous()
               for name, module in modules.items() for key, value in module.state_dict().items()}
    path = folder / f"step-{step:07d}.safetensors"
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"step": str(step)})
    os.replace(tmp, path)
    return path


def list_snapshots(folder: Path) -> list[Path]:
    """The complete snapshots in ``folder``, oldest first."""
    return sorted(Path(folder).glob("step-*.safetensors"), key=lambda p: int(p.name[5:12]))


def reconstruct_ema(snapshots: Sequence[Path], ema_name: str, sigma_rel: float,
                    at_step: int | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """The weights of ``ema_name``'s network averaged with a power-function EMA of length ``sigma_rel`` at
    ``at_step`` (default: the last snapshot's step), reconstructed from the power EMAs training saved up to that
    step (``LoopConfig.power_ema_sigma_rels``; :func:`save_snapshot`). Returns the state dict and what it was
    made from (the snapshots and their coefficients).

    One file is read at a time: the coefficients depend only on the snapshots' steps and exponents."""
    parts = []  # (file, module name, step, gamma)
    for path in snapshots:
        with safe_open(str(path), "pt") as f:
            step, keys = int(f.metadata()["step"]), f.keys()
        if at_step is not None and step > at_step:
            continue
        names = {k.split(".", 1)[0] for k in keys if k.startswith(f"{ema_name}@")}
        parts += [(Path(path), name, step, gamma_of_sigma_rel(_sigma_rel_of_name(name))) for name in sorted(names)]
    if not parts:
        raise ValueError(f"no power-function EMA of '{ema_name}' in {len(snapshots)} snapshot(s) up to step "
                         f"{at_step}: train with power_ema_sigma_rels set")
    target_step = at_step if at_step is not None else max(p[2] for p in parts)
    weights = posthoc_weights([p[2] for p in parts], [p[3] for p in parts], target_step,
                              gamma_of_sigma_rel(sigma_rel))
    acc: dict[str, torch.Tensor] = {}
    dtypes: dict[str, torch.dtype] = {}
    for (path, name, _, _), w in zip(parts, weights, strict=True):
        prefix = f"{name}."
        with safe_open(str(path), "pt") as f:
            keys = f.keys()
            for key in (k for k in keys if k.startswith(prefix)):
                tensor, short = f.get_tensor(key), key[len(prefix):]
                if not tensor.is_floating_point():
                    acc[short] = tensor  # integer buffers: the latest snapshot's
                    continue
                dtypes[short] = tensor.dtype
                acc[short] = acc.get(short, 0.0) + float(w) * tensor.to(torch.float64)
    state = {k: v.to(dtypes[k]) if k in dtypes else v for k, v in acc.items()}
    made_from = {"sigma_rel": sigma_rel, "step": target_step,
                 "snapshots": [{"file": p.name, "module": n, "step": st, "weight": float(w)}
                               for (p, n, st, _), w in zip(parts, weights, strict=True)]}
    return state, made_from
