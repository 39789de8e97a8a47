"""Corruption operators: adjointness, shapes, shared masks, seeding, parameter validation."""

import pytest
import torch
from pydantic import ValidationError

from rsd_core.kinds import build_operator
from rsd_core.operators import parse_operator_spec

IMAGE_SPECS = [
    ({"kind": "identity", "sigma_n": 0.2}, (3, 16, 16)),
    ({"kind": "inpaint", "p": 0.6}, (3, 16, 16)),
    ({"kind": "blur", "kernel_size": 5, "std": 1.5, "sigma_n": 0.1}, (3, 16, 16)),
    ({"kind": "superres", "factor": 2}, (1, 16, 16)),
    ({"kind": "mri", "R": 4, "n_coils": 4}, (2, 16, 16)),
]


@pytest.mark.parametrize(("spec", "shape"), IMAGE_SPECS, ids=[s["kind"] for s, _ in IMAGE_SPECS])
def test_adjoint_identity_holds(spec, shape):
    op = build_operator(spec)
    gen = torch.Generator().manual_seed(0)
    state = op.sample_state(5, shape, gen)
    x = torch.randn(5, *shape, dtype=torch.float64)
    y = torch.randn(5, *op.observation_shape(shape), dtype=torch.float64)
    ax = op.forward(x, state).double()
    aty = op.adjoint(y, state).double()
    assert ax.shape == y.shape and aty.shape == x.shape
    lhs, rhs = (ax * y).sum(), (x * aty).sum()
    assert torch.allclose(lhs, rhs, rtol=1e-4, atol=1e-4), (float(lhs), float(rhs))


@pytest.mark.parametrize(("spec", "shape"), IMAGE_SPECS, ids=[s["kind"] for s, _ in IMAGE_SPECS])
def test_observe_is_reproducible_with_a_seed(spec, shape):
    op = build_operator(spec)
    x = torch.rand(3, *shape) * 2 - 1

    def run(seed):
        gen = torch.Generator().manual_seed(seed)
        state = op.sample_state(3, shape, gen)
        return op.observe(x, state, gen), state

    (y1, s1), (y2, s2), (y3, _) = run(7), run(7), run(8)
    assert y1.dtype == torch.float32
    assert torch.equal(y1, y2) and all(torch.equal(s1[k], s2[k]) for k in s1)
    if op.state_keys or op.sigma_n > 0:
        assert not torch.equal(y1, y3)


def test_inpaint_mask_is_shared_across_channels_and_has_rate_p():
    op = build_operator({"kind": "inpaint", "p": 0.6})
    gen = torch.Generator().manual_seed(0)
    state = op.sample_state(64, (3, 32, 32), gen)
    y = op.forward(torch.ones(64, 3, 32, 32), state)
    erased = y == 0
    assert torch.equal(erased[:, 0], erased[:, 1]) and torch.equal(erased[:, 0], erased[:, 2])
    assert abs(erased.float().mean().item() - 0.6) < 0.01
    further = op.further_mask(state["mask"], gen)
    assert torch.all(further <= state["mask"])
    assert abs(further.mean().item() - 0.4 * 0.9) < 0.01


def test_blur_preserves_constants_and_shape():
    op = build_operator({"kind": "blur", "kernel_size": 9, "std": 2.0})
    assert abs(op.kernel.sum().item() - 1.0) < 1e-6
    x = torch.full((2, 3, 20, 20), 0.3)
    assert torch.allclose(op.forward(x, {}), x, atol=1e-6)


@pytest.mark.parametrize(("kernel_size", "std"), [(9, 2.0), (5, 1.0), (3, 3.0), (15, 2.5)])
def test_reference_blur_kernel_is_a_delta_through_scipy_gaussian_filter(kernel_size, std):
    ndimage = pytest.importorskip("scipy.ndimage")  # scikit-image's dependency: installed with the project
    delta = torch.zeros(kernel_size, kernel_size, dtype=torch.float64)
    delta[kernel_size // 2, kernel_size // 2] = 1.0
    expected = torch.from_numpy(ndimage.gaussian_filter(delta.numpy(), std, mode="reflect")).float()
    op = build_operator({"kind": "blur", "kernel_size": kernel_size, "std": std, "kernel": "scipy-reflect"})
    assert torch.allclose(op.kernel, expected, atol=1e-7)
    # the operator blurs with it: a delta image comes out as the kernel (away from the border)
    image = torch.zeros(1, 1, 3 * kernel_size, 3 * kernel_size)
    image[..., 3 * kernel_size // 2, 3 * kernel_size // 2] = 1.0
    lo, hi = kernel_size, 2 * kernel_size
    assert torch.allclose(op.forward(image, {})[0, 0, lo:hi, lo:hi], expected, atol=1e-7)
    # and it is not the sampled Gaussian, the default, whose taps differ once the filter's tails fold back
    sampled = build_operator({"kind": "blur", "kernel_size": kernel_size, "std": std}).kernel
    assert (sampled - expected).abs().max() > 1e-4


def test_superres_is_a_projection_onto_block_constants():
    op = build_operator({"kind": "superres", "factor": 2})
    x = torch.randn(2, 1, 8, 8)
    y = op.forward(x, {})
    assert torch.allclose(op.forward(y, {}), y, atol=1e-6)
    assert torch.allclose(y[..., 0, 0], y[..., 1, 1])


def test_mri_masks_acs_and_further_mask_subset():
    op = build_operator({"kind": "mri", "R": 4, "n_coils": 4, "acs_fraction": 0.125})
    gen = torch.Generator().manual_seed(0)
    state = op.sample_state(8, (2, 32, 32), gen)
    mask = state["mask"].view(8, 32)
    assert torch.all(mask.sum(1) == 8)  # floor(32 / 4) lines
    assert torch.all(mask[:, 14:18] == 1)  # 4 ACS lines at the centre
    further = op.further_mask(state["mask"], gen).view(8, 32)
    assert torch.all(further <= mask) and torch.all(further.sum(1) == 6)  # floor(32 / 5)
    assert torch.all(further[:, 14:18] == 1)
    # fully sampled k-space with RSS-normalised maps: A^H A = I
    full = {"mask": torch.ones(8, 1, 1, 32), "maps_index": state["maps_index"]}
    x = torch.randn(8, 2, 32, 32)
    assert torch.allclose(op.normal(x, full), x, atol=1e-4)


@pytest.mark.parametrize(("spec", "shape"), IMAGE_SPECS, ids=[s["kind"] for s, _ in IMAGE_SPECS])
def test_split_observation_is_the_further_masks_observation_and_the_rest(spec, shape):
    """y~ = A~(x) exactly (what the operator would have measured through the further mask, nothing it
    drops), and held marks exactly A's measurements that y~ lacks, so a network fed y~ cannot see what it
    is scored on; operators without a further mask refuse by name."""
    op = build_operator(spec)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand((4, *shape), generator=gen) * 2 - 1
    state = op.sample_state(4, shape, gen)
    y = op.forward(x, state)
    if not op.splits_observations:
        with pytest.raises(NotImplementedError, match=type(op).__name__):
            op.split_observation(y, state, gen)
        return
    y_in, state_in, held = op.split_observation(y, state, gen)
    assert torch.all(state_in["mask"] <= state["mask"]) and held.sum() > 0
    torch.testing.assert_close(held + state_in["mask"], state["mask"])
    torch.testing.assert_close(y_in, op.forward(x, state_in), atol=1e-5, rtol=0)
    assert torch.all(y_in * held == 0)
    assert state_in.keys() == state.keys()


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"kind": "inpaint", "p": 1.0}, "p"),
        ({"kind": "inpaint", "p": -0.1}, "p"),
        ({"kind": "inpaint", "p": 0.5, "delta": 1.5}, "delta"),
        ({"kind": "identity", "sigma_n": -0.1}, "sigma_n"),
        ({"kind": "blur", "kernel_size": 4}, "kernel_size"),
        ({"kind": "blur", "std": 0.0}, "std"),
        ({"kind": "superres", "factor": 1}, "factor"),
        ({"kind": "mri", "R": 0.5}, "R"),
    ],
)
def test_invalid_parameters_name_the_parameter_and_range(spec, field):
    with pytest.raises(ValueError) as err:
        parse_operator_spec(spec)
    assert isinstance(err.value, ValidationError)
    text = str(err.value)
    assert field in text and "must be" in text


def test_unknown_kind_is_rejected():
    with pytest.raises(ValueError, match="kind"):
        parse_operator_spec({"kind": "swirl"})
