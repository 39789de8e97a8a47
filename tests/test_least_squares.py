"""Conjugate gradient on an operator's normal map: it converges on the ill-conditioned multi-coil MRI map."""

import torch

from rsd_core.kinds import build_operator
from rsd_core.presets import build_config
from rsd_core.restore.least_squares import solve_normal


def test_cg_keeps_converging_on_float32_multicoil_kspace():
    """Noiseless R = 4 k-space of the cpu-mri operator (4 bank coils, 32 px) handed over in float32: the
    measurements' misfit after 2,000 iterations is below that after 500 and under 1e-3 of y. In float32 arithmetic
    the iterates lose conjugacy and diverge past ~600 iterations (misfit back near y's size): that fails here."""
    operator = build_operator(build_config("cpu-mri").data.operator)
    rng = torch.Generator().manual_seed(0)
    x = torch.nn.functional.interpolate(torch.randn((4, 2, 8, 8), generator=rng), size=(32, 32), mode="bilinear")
    state = operator.sample_state(4, (2, 32, 32), rng)
    y = operator.forward(x, state).float()

    def misfit(iters: int) -> float:
        got = solve_normal(operator, y, state, 0.0, iters)
        assert got.dtype == torch.float32
        return float((operator.forward(got, state) - y).norm() / y.norm())

    short, long = misfit(500), misfit(2000)
    assert long < short and long < 1e-3, (short, long)
