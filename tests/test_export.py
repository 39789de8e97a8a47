"""Export: the ONNX and .pt2 generators reproduce the torch generator, with a dynamic batch."""

import json

import numpy as np
import pytest
import torch

from rsd_core.config import NetworkConfig
from rsd_core.export.onestep import (
    CARD_FILE,
    ONNX_FILE,
    PT2_FILE,
    ExportError,
    draw_inputs,
    export_generator,
    load_exportable,
)
from rsd_core.operators import BlurSpec, InpaintSpec
from rsd_core.stages import ModelCard, build_network, save_model

TINY = NetworkConfig(img_resolution=8, img_channels=1, model_channels=8, channel_mult=(1, 2), attn_resolutions=(4,))


def save_tiny_generator(folder, operator, kind="generator", seed=0):
    """A tiny generator with random (non-zero-init) weights, so every layer matters in the parity check."""
    card = ModelCard(kind=kind, network=TINY, operator=operator, image_shape=(1, 8, 8), objective="",
                     dataset_fingerprint="f" * 64, metrics={"loss_generator": 1.5}, code_version="test")
    net, objective = build_network(card)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=gen))
    return save_model(folder, net, card.model_copy(update={"objective": objective.name}))


@pytest.mark.parametrize("operator", [InpaintSpec(p=0.6), BlurSpec()], ids=["inpaint", "blur"])
def test_onnx_and_pt2_match_torch_with_dynamic_batch(tmp_path, operator):
    import onnxruntime as ort

    out = export_generator(save_tiny_generator(tmp_path / "gen", operator), tmp_path / "export", {"proximal_fd": 3.0})
    module, card = load_exportable(out)
    session = ort.InferenceSession(str(out / ONNX_FILE), providers=["CPUExecutionProvider"])
    program = torch.export.load(str(out / PT2_FILE)).module()
    for batch in (1, 5):
        inputs = draw_inputs(module, card.image_shape, batch, seed=batch)
        with torch.no_grad():
            expected = module(*inputs)
            from_pt2 = program(*inputs)
        feeds = {i.name: x.numpy() for i, x in zip(session.get_inputs(), inputs, strict=True)}
        (from_onnx,) = session.run(None, feeds)
        assert from_onnx.shape == (batch, 1, 8, 8)
        assert np.abs(from_onnx - expected.numpy()).max() < 1e-4
        assert (from_pt2 - expected).abs().max() < 1e-4
    exported = json.loads((out / CARD_FILE).read_text())
    assert exported["operator"]["kind"] == operator.kind
    assert exported["sigma_init"] == 2.5 and exported["network_evaluations"] == 1
    assert exported["dataset_fingerprint"] == "f" * 64 and exported["code_version"] == "test"
    assert exported["metrics"] == {"loss_generator": 1.5, "proximal_fd": 3.0}
    assert sorted(exported["inputs"]) == (["eps", "u"] if operator.kind == "inpaint" else ["eps"])


def test_inpaint_export_draws_the_mask_from_u(tmp_path):
    """u below the survival rate keeps a pixel: all-zero u is the full mask, all-one u the empty mask."""
    module, _ = load_exportable(save_tiny_generator(tmp_path / "gen", InpaintSpec(p=0.6, delta=0.1)))
    eps, sigma = torch.randn(2, 1, 8, 8), torch.full((2,), 2.5)
    ones, zeros = torch.ones(2, 1, 8, 8), torch.zeros(2, 1, 8, 8)
    with torch.no_grad():
        full = module.objective.denoise(module.net, 2.5 * eps, sigma, {"mask": ones})
        assert torch.allclose(module(eps, zeros), full)
        empty = module.objective.denoise(module.net, 2.5 * eps, sigma, {"mask": zeros})
        assert torch.allclose(module(eps, ones), empty)


def test_teacher_is_not_exported(tmp_path):
    with pytest.raises(ExportError, match="'teacher'"):
        load_exportable(save_tiny_generator(tmp_path / "teacher", BlurSpec(), kind="teacher"))
