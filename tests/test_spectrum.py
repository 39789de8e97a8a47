"""The phase-encode spectrum benchmark: the energy per frequency in closed form, on real brain slices, and its
refusals."""

import json
import math

import pytest
import torch

from benchmarks import spectrum
from rsd_core.config import NetworkConfig
from rsd_core.data.sources import corrupt
from rsd_core.operators import InpaintSpec
from rsd_core.presets import cpu_mri_operator
from rsd_core.stages import ModelCard, build_network, save_model


def test_a_pure_frequency_puts_all_its_energy_in_its_bin():
    """x = exp(2 pi i f0 w / W) along the width: energy |x|^2 = 1 per pixel, all at f0 (Parseval, orthonormal DFT)."""
    width, f0 = 16, 3
    w = torch.arange(width, dtype=torch.float64)
    phase = 2 * math.pi * f0 * w / width
    x = torch.stack([torch.cos(phase), torch.sin(phase)]).expand(5, 4, 2, width).permute(0, 2, 1, 3)  # (N, 2, H, W)
    energy = spectrum.phase_encode_spectrum(x.float())
    freqs = spectrum.frequencies(width)
    assert float(energy.sum()) == pytest.approx(width, rel=1e-5)  # sum_k |X_k|^2 = sum_w |x_w|^2 = W per row
    assert float(energy[freqs.index(f0)]) == pytest.approx(width, rel=1e-5)
    band = torch.tensor([abs(f) <= 1 for f in freqs])
    assert spectrum.outside_share(energy, band) == pytest.approx(1.0)
    assert spectrum.outside_share(energy, ~band) == pytest.approx(0.0, abs=1e-9)


@pytest.fixture(scope="module")
def brain(tmp_path_factory):
    """16 corrupted brain slices (R = 4) with 16 clean evaluation slices, and an untrained MRI teacher."""
    root = tmp_path_factory.mktemp("spectrum")
    operator = cpu_mri_operator(4.0)
    corrupt("brain-mri", operator, seed=0, out_uri=str(root / "data"), limit=16, clean_eval_count=16,
            image_size=32)
    network = NetworkConfig(img_resolution=32, img_channels=2, model_channels=8, channel_mult=(1, 2),
                            attn_resolutions=())
    card = ModelCard(kind="teacher", network=network, operator=operator, image_shape=(2, 32, 32), objective="")
    net, objective = build_network(card)
    teacher = save_model(root / "teacher", net, card.model_copy(update={"objective": objective.name}))
    return root / "data", teacher


def test_the_cli_measures_clean_slices_and_a_model_on_real_data(brain, tmp_path, capsys):
    data, teacher = brain
    out = tmp_path / "spectrum.json"
    result = spectrum.main(["--data", str(data), "--model", f"untrained={teacher}@0.5", "--threads", "1",
                            "--json", str(out), "--plot", str(tmp_path / "spectrum.png")])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert result["n"] == 16 and result["acs_frequencies"] == [-1, 0]  # cpu-mri: 2 ACS lines at 32 px
    clean, model = result["rows"]["clean"], result["rows"]["untrained"]
    # brain slices hold most of their energy at the lowest frequencies; an untrained network's output does not
    assert clean["outside_acs"] < 0.5 and model["outside_acs"] > clean["outside_acs"]
    assert len(clean["energy"]) == 32 and (tmp_path / "spectrum.png").stat().st_size > 0
    assert "outside the 2 ACS lines" in capsys.readouterr().out


def test_a_dataset_other_than_mri_is_refused_naming_its_operator(tmp_path):
    corrupt("fashion-mnist", InpaintSpec(p=0.8), seed=0, out_uri=str(tmp_path / "d"), limit=8, clean_eval_count=8)
    with pytest.raises(SystemExit):
        spectrum.main(["--data", str(tmp_path / "d")])
    with pytest.raises(ValueError, match="operator is 'inpaint'"):
        spectrum.measure(str(tmp_path / "d"), [])


@pytest.mark.parametrize("text", ["teacher", "=folder", "name=folder@fast"])
def test_a_malformed_model_is_refused_naming_it(text):
    with pytest.raises(ValueError, match="--model"):
        spectrum.parse_model(text)


def test_a_model_folder_without_a_saved_model_is_refused_before_sampling(brain, tmp_path):
    data, _ = brain
    with pytest.raises(ValueError, match=f"--model gone: {tmp_path / 'gone'} holds no saved model"):
        spectrum.measure(str(data), [f"gone={tmp_path / 'gone'}"])
