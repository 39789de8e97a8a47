"""Deployment-time settings the task decorators need: image, resources, cache version.

Flyte fixes a task's image and resource requests when the workflow is *registered*, before any
config input exists, so they are read here at import time:

* ``RSD_IMAGE``: the image of every task (unset: pyflyte's ``--image`` / default image);
  ``RSD_GPU_IMAGE``: the image of the two training tasks (defaults to ``RSD_IMAGE``);
* ``RSD_PRESET`` (default ``cpu-demo``) and optional ``RSD_CONFIG`` (a YAML file): the pipeline
  config whose ``resources`` section becomes the requests, and which launch plans default to.

Locally none of this matters (tasks run in-process); on a cluster register with, e.g.,
``RSD_PRESET=celeba64-inpaint-gpu`` to request GPUs for pretraining and distillation.
"""

from __future__ import annotations

import os

from flytekit import Resources
from flytekitplugins.kfpytorch import Elastic

from rsd_core.config import PipelineConfig, TaskResources
from rsd_core.presets import build_config, for_existing_dataset
from tasks.tracking import source_hash

IMAGE_ENV = "RSD_IMAGE"
GPU_IMAGE_ENV = "RSD_GPU_IMAGE"
PRESET_ENV = "RSD_PRESET"
CONFIG_ENV = "RSD_CONFIG"


def image(gpu: bool = False) -> str | None:
    if gpu:
        return os.environ.get(GPU_IMAGE_ENV) or os.environ.get(IMAGE_ENV) or None
    return os.environ.get(IMAGE_ENV) or None


def deployment_config() -> PipelineConfig:
    """The config named by ``RSD_PRESET`` / ``RSD_CONFIG``: the registered defaults and resources."""
    return build_config(os.environ.get(PRESET_ENV, "cpu-demo"), os.environ.get(CONFIG_ENV) or None)


def requests(spec: TaskResources) -> Resources:
    if spec.gpu > 0:
        return Resources(cpu=spec.cpu, mem=spec.mem, gpu=str(spec.gpu))
    return Resources(cpu=spec.cpu, mem=spec.mem)


def elastic(spec: TaskResources) -> Elastic | None:
    """Torch elastic data parallelism when a training task asks for several processes or nodes.

    gloo on CPU, NCCL on GPU (chosen in rsd_core.train.loop from the device); with one node the
    plugin launches the workers inside the task's pod, with several it becomes a PyTorchJob for
    the Kubeflow training operator.
    """
    if spec.nproc_per_node == 1 and spec.nnodes == 1:
        return None
    return Elastic(nnodes=spec.nnodes, nproc_per_node=spec.nproc_per_node, start_method="fork",
                   increase_shared_mem=False)


def cache_version() -> str:
    """A hash of the science and task code: editing either invalidates every cached result.

    The config that matters is not part of it because it is a task *input*, and Flyte's cache
    key already covers inputs; each task receives only its own config section.
    """
    return source_hash()


DEPLOYMENT = deployment_config()
# The data team's re-run names its model and run after its dataset, not after the preset's data.
RERUN_DEPLOYMENT = for_existing_dataset(DEPLOYMENT, os.environ.get(PRESET_ENV, "cpu-demo"))
CACHE_VERSION = cache_version()
