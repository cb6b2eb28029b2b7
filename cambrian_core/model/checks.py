"""Cross-field checks of a composed-model config, run before anything is built or any weight loads.

They catch what each part cannot see alone: token counts that are not squares, list lengths that disagree,
a connector that does not fit the towers' token grids (the connector's own ``check_config`` runs with the
dims filled in), and a connector width that differs from the LLM's hidden size.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from cambrian_core.model.encoder import is_square
from cambrian_core.registry import CONNECTORS, ENCODERS, LLMS, BuildError, check_kwargs

__all__ = ["CONNECTOR_DIMS", "STAGES", "check_model_config", "connector_config"]

#: keywords the composed model fills in for its connector
CONNECTOR_DIMS = ("in_channels", "in_token_lens", "out_dim", "token_len")
#: training stages and what each trains
STAGES = {
    "pretrain": "connector + newline",
    "finetune": "connector + newline + LLM (+ towers built with freeze=False)",
    "full": "everything, towers included",
}


def connector_config(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The connector dict from ``connector=`` or the ``mm_projector_type=`` shortcut.

    Raises:
        ValueError: neither is given, or both name different types.
    """
    cfg, shortcut = kwargs.get("connector"), kwargs.get("mm_projector_type")
    if cfg is None and shortcut is None:
        raise ValueError("no connector: set `connector=dict(type=...)` or `mm_projector_type=...`")
    if cfg is None:
        return _shortcut_config(shortcut)
    if not isinstance(cfg, Mapping) or "type" not in cfg:
        raise ValueError(f"`connector` must be a dict with a `type`, got {cfg!r}")
    if shortcut is not None and shortcut != cfg["type"]:
        raise ValueError(
            f"mm_projector_type={shortcut!r} contradicts connector type {cfg['type']!r}; set only one of them"
        )
    return dict(cfg)


def _shortcut_config(name: str) -> dict[str, Any]:
    """Cambrian's ``mm_projector_type`` grammar: ``mlp<N>x_gelu`` is ``mlp_gelu`` of depth N unless registered."""
    match = re.fullmatch(r"mlp(\d+)x_gelu", name)
    if match and name not in CONNECTORS.names() and "mlp_gelu" in CONNECTORS.names():
        return {"type": "mlp_gelu", "depth": int(match.group(1))}
    return {"type": name}


def _lookup(registry: Any, cfg: Mapping[str, Any]) -> Any:
    try:
        return registry.lookup(cfg["type"])
    except BuildError:
        return None  # the schema (or the build) reports unknown types with suggestions


def _tower_dims(
    towers: list[Any], lens: list[Any] | None
) -> tuple[list[int | None], list[int | None], list[str]]:
    channels: list[int | None] = []
    token_lens: list[int | None] = []
    problems = []
    for i, tower in enumerate(towers):
        cls = _lookup(ENCODERS, tower)
        args = {k: v for k, v in tower.items() if k != "type"}
        if lens is not None:
            args["token_len"] = lens[i]
        dims = cls.config_dims(args) if cls is not None and hasattr(cls, "config_dims") else {}
        tlen = lens[i] if lens is not None else dims.get("token_len")
        if tlen is not None and not (isinstance(tlen, int) and is_square(tlen)):
            where = "vision_tower_aux_token_len_list" if lens is not None else "token_len"
            problems.append(
                f"tower {i} ({tower['type']}): {where}={tlen} is not a perfect square; a tower's tokens form a "
                "square grid (e.g. 576 = 24x24, 9216 = 96x96)"
            )
            tlen = None
        channels.append(dims.get("hidden_size"))
        token_lens.append(tlen)
    return channels, token_lens, problems


def check_model_config(kwargs: Mapping[str, Any]) -> list[str]:
    """Every problem in a ``cambrian`` model config (``type`` excluded); ``[]`` when it is consistent."""
    towers = kwargs.get("vision_tower_aux_list")
    if not isinstance(towers, (list, tuple)) or not towers:
        return ["`vision_tower_aux_list` must be a non-empty list of encoder configs (dicts with `type`)"]
    bad = [i for i, t in enumerate(towers) if not isinstance(t, Mapping) or "type" not in t]
    if bad:
        return [f"`vision_tower_aux_list` entries {bad} are not encoder configs (dicts with `type`)"]
    problems: list[str] = []
    lens = kwargs.get("vision_tower_aux_token_len_list")
    if lens is not None and (not isinstance(lens, (list, tuple)) or len(lens) != len(towers)):
        n = len(lens) if isinstance(lens, (list, tuple)) else "no list of"
        problems.append(
            f"`vision_tower_aux_token_len_list` has {n} entries but `vision_tower_aux_list` has {len(towers)} "
            "towers; give one token count per tower (or leave it out to use each tower's own)"
        )
        lens = None
    image_token_len = kwargs.get("image_token_len", 576)
    if not (isinstance(image_token_len, int) and is_square(image_token_len)):
        problems.append(
            f"image_token_len={image_token_len} is not a perfect square; the image grid is f x f tokens "
            "(e.g. 576 = 24x24)"
        )
        image_token_len = None
    stage = kwargs.get("stage", "finetune")
    if stage not in STAGES:
        problems.append(f"stage={stage!r} is unknown; stages: {', '.join(STAGES)}")
    channels, token_lens, tower_problems = _tower_dims(list(towers), lens)
    problems += tower_problems
    try:
        ccfg = connector_config(kwargs)
    except ValueError as exc:
        return [*problems, str(exc)]
    problems += _check_connector(ccfg, kwargs.get("llm"), channels, token_lens, image_token_len)
    return problems


def _check_connector(
    ccfg: dict[str, Any],
    llm: Any,
    channels: list[int | None],
    token_lens: list[int | None],
    image_token_len: int | None,
) -> list[str]:
    label = f"connector {ccfg['type']}"
    hidden = n_layers = None
    if isinstance(llm, Mapping) and "type" in llm:
        llm_cls = _lookup(LLMS, llm)
        llm_kwargs = {k: v for k, v in llm.items() if k != "type"}
        if llm_cls is not None and hasattr(llm_cls, "config_hidden_size"):
            hidden = llm_cls.config_hidden_size(llm_kwargs)
        if llm_cls is not None and hasattr(llm_cls, "config_num_layers"):
            n_layers = llm_cls.config_num_layers(llm_kwargs)
    problems = []
    for k in CONNECTOR_DIMS:
        if k not in ccfg:
            continue
        if k == "out_dim" and hidden is not None and ccfg[k] != hidden:
            problems.append(
                f"{label}: width out_dim={ccfg[k]} does not match the LLM hidden size {hidden}; the connector "
                "outputs LLM-width tokens (the model fills out_dim in: remove it)"
            )
        else:
            problems.append(
                f"{label}: `{k}` is filled in by the model (from the towers and the LLM); remove it from the config"
            )
    cls = _lookup(CONNECTORS, ccfg)
    if cls is None:
        try:
            CONNECTORS.lookup(ccfg["type"])
        except BuildError as exc:
            problems.append(str(exc))
        return problems
    args = {k: v for k, v in ccfg.items() if k != "type" and k not in CONNECTOR_DIMS}
    problems += check_kwargs(cls, {**dict.fromkeys(CONNECTOR_DIMS), **args}, label)
    if problems:
        return problems
    filled: dict[str, Any] = dict(args)
    if all(c is not None for c in channels):
        filled["in_channels"] = list(channels)
    if all(t is not None for t in token_lens):
        filled["in_token_lens"] = list(token_lens)
    if hidden is not None:
        filled["out_dim"] = hidden
    if image_token_len is not None:
        filled["token_len"] = image_token_len
    checker = getattr(cls, "check_config", None)
    if callable(checker):
        problems += [f"{label}: {m}" for m in checker(filled)]
    scheduled = cls.config_sampler_layers(filled) if hasattr(cls, "config_sampler_layers") else ()
    if not problems and scheduled and n_layers is not None and max(scheduled) >= n_layers:
        problems.append(
            f"{label} schedules in-LLM samplers after decoder layers {list(scheduled)} but the LLM has "
            f"{n_layers} layers (0..{n_layers - 1}); lower start_of_vision_sampler_layers / "
            "stride_of_vision_sampler_layers / num_of_vision_sampler_layers"
        )
    return problems
