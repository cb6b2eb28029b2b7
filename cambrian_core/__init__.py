"""cambrian: build, train, evaluate and serve Cambrian-style multi-encoder multimodal LLMs.

The core holds the contracts (registries, plugin hooks, configs, base classes); every concrete encoder,
connector, LLM and dataset converter is a plugin found through the ``cambrian.plugins`` entry points.
"""

from cambrian_core.hookspecs import hookimpl
from cambrian_core.registry import (
    CHECKPOINTS,
    CONNECTORS,
    DATASETS,
    ENCODERS,
    GENERATORS,
    LLMS,
    METRICS,
    MODELS,
    REGISTRIES,
    RUNNERS,
    TEMPLATES,
    build,
)

__version__ = "0.1.0"

__all__ = [
    "CHECKPOINTS",
    "CONNECTORS",
    "DATASETS",
    "ENCODERS",
    "GENERATORS",
    "LLMS",
    "METRICS",
    "MODELS",
    "REGISTRIES",
    "RUNNERS",
    "TEMPLATES",
    "__version__",
    "build",
    "hookimpl",
]
