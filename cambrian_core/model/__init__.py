"""The composed model: the encoder / connector / LLM contracts, masks, splicing, samplers, checkpoints and I/O.

Submodules are imported on use (``cambrian_core.model.io``, ``cambrian_core.model.cambrian``, ...) so that
``import cambrian_core.model`` stays light.
"""
