"""``rsd_restore``: clean versions of a corrupted dataset from a registered generator (wiring only).

check model and data, open the run -> fit the restorer network (when the settings have one; or reuse a
registered one) -> restore each
shard (map task) -> write the restored dataset,
its spread, metrics and grid. ``rsd restore`` runs it locally; on a cluster,
``pyflyte run --remote workflows/restore.py rsd_restore --model_uri models:/<name>@champion ...``.
"""

from __future__ import annotations

import functools

from flytekit import map_task, workflow

from rsd_core.restore.estimate import RestoreConfig
from tasks.restore import (
    DEFAULT_EXPERIMENT,
    RestoreResult,
    fit_encoder,
    plan_restoration,
    restore_one_shard,
    write_restoration,
)

DEFAULT_CONFIG = RestoreConfig()  # the posterior-mean network fitted for the dataset, then one pass per row


@workflow
def rsd_restore(model_uri: str, dataset_uri: str, out_uri: str, config: RestoreConfig = DEFAULT_CONFIG,
                experiment: str = DEFAULT_EXPERIMENT, restorer: str = "", refit: bool = False) -> RestoreResult:
    """Restore every observation of ``dataset_uri`` with ``model_uri`` into a new dataset at ``out_uri``
    (with the registered ``restorer`` if given; a registered one of the same generator, dataset and settings
    is reused unless ``refit``)."""
    plan = plan_restoration(model_uri=model_uri, dataset_uri=dataset_uri, out_uri=out_uri, config=config,
                            experiment=experiment)
    encoder = fit_encoder(plan=plan, config=config, restorer=restorer, refit=refit)
    parts = map_task(functools.partial(restore_one_shard, plan=plan, config=config, encoder=encoder))(
        shard=plan.shards)
    return write_restoration(plan=plan, parts=parts)
