"""Training: lazy data, batching, samplers, optimisation, checkpoints, feature cache, metrics, runners, recipe.

The entry point is :class:`cambrian_core.train.recipe.TrainRecipe` (``cambrian train CONFIG``). Submodules are
imported on use so that ``import cambrian_core.train`` stays light.
"""
