"""How Ray Train hands the datasets to its workers (TorchTrainer's dataset_config).

A module of its own, importing Ray alone: Ray Train's controller and dataset manager
actors unpickle this class, and, defined in fer_ray.trainer, it made each of them import
torch, timm and scikit-learn first (~3.5 and ~5.5 s of CPU per training run on a 2-core VM).
"""

from __future__ import annotations

import copy

import ray.data
import ray.train

from fer_ray.constants import TRAIN, VAL


class ShardedValConfig(ray.train.DataConfig):
    """Train split in equal shares (every worker takes the same number of steps); val split
    unevenly, because validation must see every image exactly once.

    The execution options are the driver's Ray Data options, copied. Left to Ray, its
    `DataConfig.default_ingest_options()` builds them with the deprecated
    `exclude_resources` argument, and every training job printed a RayDeprecationWarning
    from Ray Train's dataset manager (Ray 2.60)."""

    def __init__(self) -> None:
        options = copy.deepcopy(ray.data.DataContext.get_current().execution_options)
        super().__init__(datasets_to_split=[TRAIN], execution_options=options)

    def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
        output = super().configure(
            {k: v for k, v in datasets.items() if k != VAL},
            world_size, worker_handles, worker_node_ids, **kwargs,
        )
        if VAL in datasets:
            val = datasets[VAL].copy(datasets[VAL])
            val.context.execution_options = self._resolve_execution_options(VAL)
            for i, split in enumerate(val.streaming_split(world_size, equal=False)):
                output[i][VAL] = split
        return output
