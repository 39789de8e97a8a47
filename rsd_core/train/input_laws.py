"""The generator's random input state (mask, coil maps) as a pure function of U[0, 1) inputs: each objective's
:meth:`~rsd_core.train.objectives.Objective.draw_input_state` restated so that an exported graph keeps the law
inside it and a caller only draws uniforms (:mod:`rsd_core.export.onestep`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rsd_core.operators import Inpaint, State
from rsd_core.operators.mri import MRI


@dataclass(frozen=True)
class UniformInput:
    """A U[0, 1) input of the exported graph (after ``eps``): its shape without the batch axis, and what
    the graph derives from it (recorded in card.json, so a caller knows how to draw it)."""

    name: str
    shape: tuple[int, ...]
    derives: str


class InputLaw:
    """The generator's random input state (mask, coil maps) as a pure function of U[0, 1) inputs, so
    that the exported graph keeps the operator's law and the caller only draws uniforms.
    The base law has no state (identity, blur, super-resolution)."""

    inputs: tuple[UniformInput, ...] = ()

    def state(self, *uniforms: torch.Tensor) -> State:
        return {}


class InpaintLaw(InputLaw):
    """mask = (u < keep) with keep = (1 - p)(1 - delta): the fixed-mask sampler's input mask."""

    def __init__(self, operator: Inpaint, image_shape: tuple[int, ...]):
        self.keep = (1.0 - operator.p) * (1.0 - operator.delta)
        self.inputs = (UniformInput("u", (1, *image_shape[1:]), f"mask = u < {self.keep}"),)

    def state(self, u: torch.Tensor) -> State:
        return {"mask": (u < self.keep).to(u.dtype)}


class MRILaw(InputLaw):
    """M~ and the coil maps of :meth:`FourierAmbientObjective.draw_input_state`, from scores.

    There, M holds the ACS block plus uniformly random other columns and M~ keeps the ACS block plus
    a uniformly random subset of M's random columns, so M~'s non-ACS columns are a uniform random
    subset of all non-ACS columns of a fixed size. Here they are the lowest-scoring non-ACS columns of
    ``u`` (ACS columns score -1, so they always rank first); the ACS block and the line count are read
    off the operator's own mask code, not restated. The maps are bank entry floor(v * K), the bank being the
    birdcage bank or, with observed coil maps, the pool of observed scans' maps saved with the model.
    """

    def __init__(self, operator: MRI, image_shape: tuple[int, ...]):
        width = image_shape[-1]
        # Acceleration 2W leaves floor(W / 2W) = 0 random lines: exactly the ACS block.
        self.acs = operator.column_masks(1, width, 2.0 * width, None).view(width) > 0
        self.lines = int(operator.further_mask(operator.column_masks(1, width, operator.R, None), None).sum())
        self.n_maps = len(operator.maps_bank(*image_shape[-2:]))  # the birdcage bank, or the observed scans' pool
        self.inputs = (
            UniformInput("u", (1, 1, width), f"further mask M~: {self.lines} columns, the ACS block then the "
                                             "lowest-u others"),
            UniformInput("v", (), f"coil maps: bank entry floor(v * {self.n_maps})"),
        )

    def state(self, u: torch.Tensor, v: torch.Tensor) -> State:
        scores = torch.where(self.acs.to(u.device), -1.0, u.flatten(1))
        rank = (scores[:, None, :] < scores[:, :, None]).sum(-1)  # rank[b, j] = #{i : score_i < score_j}
        mask = (rank < self.lines).to(u.dtype).view(u.shape)
        maps_index = (v * self.n_maps).long().clamp(max=self.n_maps - 1)
        return {"mask": mask, "maps_index": maps_index}
