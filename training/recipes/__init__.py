"""Training methods as recipes (``training.recipes.base.Recipe``), picked by ``spec.method``.

A new method is a ``Recipe`` subclass and one entry in ``RECIPES``.
"""

from __future__ import annotations

from service.core.storage.config import StorageConfig
from training.recipes.base import Recipe, WorkerContext
from training.recipes.dpo import DPORecipe
from training.recipes.grpo import GRPORecipe
from training.recipes.sft import SFTRecipe
from training.spec import TrainSpec

RECIPES: dict[str, type[Recipe]] = {"supervised": SFTRecipe, "dpo": DPORecipe,
                                    "reinforcement": GRPORecipe}
"""``spec.method`` → the recipe that trains it."""


def run_recipe(spec: TrainSpec, storage_config: StorageConfig,
               context: WorkerContext | None = None) -> Recipe:
    """Train ``spec`` from setup to cleanup; without ``context``, as rank 0 of 1 in this process."""
    recipe = RECIPES[spec.method](spec, storage_config, context)
    recipe.setup()
    recipe.train()
    recipe.cleanup()
    return recipe
