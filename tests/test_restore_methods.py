"""Restoration methods as named things: every registered method restores on a tiny saved model, RestoreConfig
maps the former encoder/steps combinations onto its ``method``, and a bad name or registration is refused."""

from __future__ import annotations

import pytest
import torch

from rsd_core.config import NetworkConfig
from rsd_core.kinds import build_operator, objective_for
from rsd_core.restore.encoder import EncoderConfig
from rsd_core.restore.estimate import LATENT_OPTIMISATION, METHOD_NAMES, RestoreConfig
from rsd_core.restore.methods import get_method, register_method, registered_methods, restore_with_model
from rsd_core.stages import ModelCard, save_model
from rsd_core.train.pretrain import build_teacher

SHAPE = (1, 8, 8)
TINY_FIT = {"steps": 2, "width": 8, "batch_size": 4}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A tiny untrained inpainting network saved as a one-step generator and as a teacher, and 3 observations."""
    root = tmp_path_factory.mktemp("methods")
    network = NetworkConfig(img_resolution=8, model_channels=8, channel_mult=(1, 2), attn_resolutions=())
    operator = build_operator({"kind": "inpaint", "p": 0.6})
    net = build_teacher(network, objective_for(operator))
    card = ModelCard(kind="generator", network=network, operator=operator.spec, image_shape=SHAPE,
                     objective="ambient_diffusion")
    generator = save_model(root / "generator", net, card)
    teacher = save_model(root / "teacher", net, card.model_copy(update={"kind": "teacher", "sigma_stop": 1.0}))
    rng = torch.Generator().manual_seed(0)
    state = operator.sample_state(3, SHAPE, rng)
    y = operator.forward(torch.rand((3, *SHAPE), generator=rng) * 2 - 1, state)
    return generator, teacher, y, state, operator


CONFIGS = {
    "posterior-net": RestoreConfig(method="posterior-net", encoder=TINY_FIT),
    "latent": RestoreConfig(method="latent", encoder=TINY_FIT, restarts=2),
    "dps": RestoreConfig(method="dps", restarts=2),
    "classical": RestoreConfig(method="classical"),
    "projection": RestoreConfig(method="projection"),
}


def test_every_name_the_config_accepts_is_registered_once_with_a_summary():
    assert tuple(registered_methods()) == tuple(METHOD_NAMES) == tuple(CONFIGS)
    assert all(m.summary and m.name == name for name, m in registered_methods().items())


@pytest.mark.parametrize("name", list(CONFIGS))
def test_every_method_restores_on_a_tiny_saved_model(folders, name):
    generator, teacher, y, state, operator = folders
    config = CONFIGS[name].updated(batch_size=2)
    assert config.method == name
    folder = teacher if get_method(name).model == "teacher" else generator
    restored = restore_with_model(folder, y, state, config)
    assert restored.mean.shape == (3, *SHAPE) and torch.isfinite(restored.mean).all()
    assert restored.mean.abs().max() <= 1.0
    if name in ("classical", "projection"):  # no posterior: no spread
        assert restored.spread is None
    else:
        assert restored.spread.shape == (3, *SHAPE) and (restored.spread >= 0).all()
    if name != "posterior-net":  # noiseless masks: measured pixels kept (the net keeps them too, from its fit)
        torch.testing.assert_close(operator.forward(restored.mean, state), y.clamp(-1, 1))


def test_the_methods_differ_and_projection_is_the_zero_filled_observation(folders):
    generator, _, y, state, _ = folders
    projection = restore_with_model(generator, y, state, CONFIGS["projection"]).mean
    torch.testing.assert_close(projection, (y * state["mask"]).clamp(-1, 1))
    classical = restore_with_model(generator, y, state, CONFIGS["classical"]).mean
    assert not torch.equal(classical, projection)


def test_former_combinations_map_onto_methods():
    assert RestoreConfig().method == "posterior-net" and RestoreConfig().encoder == EncoderConfig()
    assert LATENT_OPTIMISATION.method == "latent" and LATENT_OPTIMISATION.encoder is None
    assert RestoreConfig(encoder=EncoderConfig(target="latent")).method == "latent"
    assert RestoreConfig(encoder={"target": "latent"}).method == "latent"
    assert RestoreConfig(steps=3, encoder=None).method == "latent"
    assert RestoreConfig(method="latent").encoder == EncoderConfig(target="latent")  # the amortised one
    assert RestoreConfig(method="latent", encoder={"steps": 5}).encoder == EncoderConfig(steps=5, target="latent")
    assert RestoreConfig(method="classical").encoder is None
    # a stored config without the field (a registered restorer's tag) reads as before
    stored = RestoreConfig(encoder=EncoderConfig(target="latent")).model_dump(exclude={"method"})
    assert RestoreConfig.model_validate(stored).method == "latent"
    # updating one of the two re-derives the other
    assert RestoreConfig().updated(method="classical").encoder is None
    assert RestoreConfig().updated(encoder=EncoderConfig(target="latent")).method == "latent"
    assert LATENT_OPTIMISATION.updated(method="latent") == LATENT_OPTIMISATION


@pytest.mark.parametrize(("fields", "message"), [
    ({"method": "posterior-net", "encoder": None}, "method 'posterior-net' restores with the posterior-mean network"),
    ({"method": "classical", "encoder": {}}, "method 'classical' fits no network for the dataset: drop encoder"),
    ({"method": "posterior-net", "encoder": {"target": "latent"}}, "set method 'latent'"),
    ({"method": "latent", "encoder": None}, "steps 0 restores nothing without an encoder"),
    ({"method": "wiener"}, "unknown restoration method 'wiener': choose one of posterior-net, latent, dps, classical, "
                           "projection"),
])
def test_contradictory_settings_are_refused_naming_the_fields(fields, message):
    with pytest.raises(ValueError, match=message):
        RestoreConfig(**fields)


def test_an_unknown_method_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="unknown restoration method 'wiener': choose one of posterior-net, latent, "
                                         "dps, classical, projection"):
        get_method("wiener")


def test_a_broken_registration_is_refused():
    with pytest.raises(ValueError, match="'classical' is registered twice: by rsd_core.restore.methods.classical"):
        register_method("classical", "again")(lambda models, y, state, config: None)
    assert get_method("classical").restore.__module__ == "rsd_core.restore.methods.classical"  # unchanged


def test_a_new_method_is_one_function_and_its_registration(folders, monkeypatch):
    """A toy method (the observation itself, zero-filled) registered outside the library: the config accepts its
    name, the registry runs it on a saved generator, and nothing else had to change."""
    from rsd_core.restore import estimate
    from rsd_core.restore.methods import registry

    monkeypatch.setattr(registry, "_METHODS", dict(registry._METHODS))  # the registration ends with the test
    monkeypatch.setattr(estimate, "METHOD_NAMES", list(estimate.METHOD_NAMES))
    monkeypatch.setattr(registry, "METHOD_NAMES", estimate.METHOD_NAMES)
    generator, _, y, state, operator = folders

    @register_method("zero-filled", "the observation itself, zeros where nothing was measured", model=None)
    def zero_filled(models, y, state, config):
        return estimate.Restoration(models.operator.adjoint(y, state), torch.zeros_like(y))

    got = restore_with_model(generator, y, state, RestoreConfig(method="zero-filled"))
    torch.testing.assert_close(got.mean, operator.adjoint(y, state))
    assert "zero-filled" in registered_methods()


def test_a_method_needing_the_teacher_is_refused_on_a_generator_and_back(folders):
    generator, teacher, y, state, _ = folders
    with pytest.raises(ValueError, match="DPS needs the teacher"):
        restore_with_model(generator, y, state, CONFIGS["dps"])
    with pytest.raises(ValueError, match="restoration needs a one-step generator"):
        restore_with_model(teacher, y, state, LATENT_OPTIMISATION.updated(steps=1))


def test_classical_is_projected_onto_the_measurements_with_data_consistency(tmp_path):
    """Bicubic up-sampling does not keep the block means it was given; with data_consistency it does."""
    network = NetworkConfig(img_resolution=8, model_channels=8, channel_mult=(1, 2), attn_resolutions=())
    operator = build_operator({"kind": "superres", "factor": 2})
    card = ModelCard(kind="generator", network=network, operator=operator.spec, image_shape=SHAPE, objective="x")
    folder = save_model(tmp_path / "generator", build_teacher(network, objective_for(operator)), card)
    y = operator.forward(torch.rand((3, *SHAPE), generator=torch.Generator().manual_seed(0)) * 2 - 1, {})
    projected = restore_with_model(folder, y, {}, CONFIGS["classical"]).mean
    plain = restore_with_model(folder, y, {}, CONFIGS["classical"].updated(data_consistency=False)).mean
    torch.testing.assert_close(operator.forward(projected, {}), y)
    assert (operator.forward(plain, {}) - y).abs().max() > 1e-2
