"""The default Proximal FD features: learnt from the corrupted observations alone, reproducible, cached."""

import pytest
import torch
from safetensors.torch import load_file

from rsd_core.data.reader import open_dataset
from rsd_core.data.sources import corrupt, fashion_mnist
from rsd_core.kinds import build_operator
from rsd_core.select import classifier, frechet
from rsd_core.select.frechet import compute_stats, frechet_distance
from rsd_core.select.selection import corrupted_view, make_extractors, observation_images, proximal_reference
from rsd_core.select.ssl_features import Encoder, SelfSupervisedExtractor, SSLRecipe, augment, nt_xent

TINY = SSLRecipe(max_steps=5, batch_size=32)


@pytest.fixture(scope="module")
def observations():
    clean, _ = fashion_mnist("test").load(0, 128)
    op = build_operator({"kind": "inpaint", "p": 0.6})
    return corrupted_view(clean, op, torch.Generator().manual_seed(0))


def test_training_is_deterministic_and_cached_by_dataset_and_recipe(observations, tmp_path):
    calls = []

    def images():
        calls.append(1)
        return observations

    first = SelfSupervisedExtractor(images, "fingerprint-a", "a", TINY, cache_dir=tmp_path / "one", device="cpu")
    assert first.id.startswith("ssl-") and first.weights_path.is_file() and first.info["steps"] == 5
    assert first.info["n_images"] == 128 and first.info["data_fingerprint"] == "fingerprint-a"

    def no_images():
        raise AssertionError("a cached encoder must not read the dataset")

    cached = SelfSupervisedExtractor(no_images, "fingerprint-a", "a", TINY, cache_dir=tmp_path / "one", device="cpu")
    assert cached.id == first.id and (cached.features(observations) == first.features(observations)).all()

    again = SelfSupervisedExtractor(images, "fingerprint-a", "a", TINY, cache_dir=tmp_path / "two", device="cpu")
    weights = load_file(str(first.weights_path)), load_file(str(again.weights_path))
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])  # same seed, same weights
    assert len(calls) == 2

    other_data = SelfSupervisedExtractor(images, "fingerprint-b", "b", TINY, cache_dir=tmp_path / "one", device="cpu")
    other_seed = SelfSupervisedExtractor(images, "fingerprint-a", "a", SSLRecipe(max_steps=5, batch_size=32, seed=1),
                                         cache_dir=tmp_path / "one", device="cpu")
    assert len({first.id, other_data.id, other_seed.id}) == 3
    features = first.features(observations[:10])
    assert features.shape == (10, first.dim) and features.dtype.name == "float64"


def test_augmentation_shifts_flips_and_erases_a_quarter_of_the_pixels():
    x = torch.rand(512, 1, 32, 32) * 2 - 1 + 3  # no pixel is 0 before augmenting
    view = augment(x, SSLRecipe(), torch.Generator().manual_seed(0))
    assert view.shape == x.shape
    assert abs(float((view == 0).float().mean()) - 0.25) < 0.01
    assert not torch.equal(view, x * (view != 0))  # the kept pixels moved


def test_self_supervised_proximal_fd_ranks_severity_from_corrupted_data_alone(tmp_path, monkeypatch):
    """No clean images and no labels: with Fashion-MNIST unreadable to the classifier, the extractor trains
    on the dataset's observations, has no true-FD partner (no clean split), and its Proximal FD still ranks
    clean < blurred < noise images pushed through the operator."""
    spec = {"kind": "inpaint", "p": 0.6, "delta": 0.1}
    corrupt(fashion_mnist("train"), spec, seed=0, out_uri=str(tmp_path / "data"), limit=600)
    ds = open_dataset(str(tmp_path / "data"))
    monkeypatch.setenv(frechet.CACHE_DIR_ENV, str(tmp_path / "cache"))

    def unreadable(*_, **__):
        raise AssertionError("the self-supervised extractor must not read Fashion-MNIST (clean images, labels)")

    monkeypatch.setattr(classifier, "_split", unreadable)
    prox_ext, true_ext = make_extractors("self-supervised", ds.operator, ds)
    assert true_ext is None
    assert ds.manifest.name in prox_ext.label and "no labels, no clean images" in prox_ext.label
    ref = proximal_reference(str(tmp_path / "data"), prox_ext, 600)

    clean, _ = fashion_mnist("test").load(0, 600)
    blurred = build_operator({"kind": "blur", "kernel_size": 9, "std": 2.0}).forward(clean, {})
    noise = torch.rand_like(clean) * 2 - 1
    fds = [frechet_distance(compute_stats(prox_ext, corrupted_view(x, ds.operator, torch.Generator().manual_seed(1))),
                            ref) for x in (clean, blurred, noise)]
    assert fds == sorted(fds), fds
    # Random conv features rank these three too: what the training bought is measured on its own task, two
    # views of the observations told apart from 2 * 256 - 1 others, against the untrained network.
    images = observation_images(ds, 256)

    def contrastive_loss(net) -> float:
        gen = torch.Generator().manual_seed(7)
        with torch.no_grad():
            return float(nt_xent(net(augment(images, recipe, gen)), net(augment(images, recipe, gen)),
                                 recipe.temperature))

    recipe = prox_ext.recipe
    torch.manual_seed(recipe.seed)
    untrained = Encoder(1, recipe).eval()
    # measured: 4.04 against 6.23 (chance: log 511 = 6.24)
    assert contrastive_loss(prox_ext._net) < 0.8 * contrastive_loss(untrained)


def test_self_supervised_needs_the_dataset():
    with pytest.raises(ValueError, match="self-supervised.*dataset"):
        make_extractors("self-supervised", build_operator({"kind": "inpaint", "p": 0.6}))
