"""Request fields shared by the LLaVA worker and the OpenAI API: sampling settings and scan options."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from cambrian_core.serve.errors import RequestError
from cambrian_core.serve.images import ScanOptions
from cambrian_core.serve.request import MAX_NEW_TOKENS_CAP, SamplingParams

__all__ = ["sampling_from", "scan_options"]


def _number(params: Mapping[str, Any], key: str, default: float) -> float:
    value = params.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RequestError(f"`{key}` must be a number, got {value!r}", param=key)
    return float(value)


def _integer(params: Mapping[str, Any], key: str, default: Any) -> Any:
    value = params.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(f"`{key}` must be an integer, got {value!r}", param=key)
    return value


def sampling_from(
    params: Mapping[str, Any],
    max_tokens_key: str,
    default_max: int,
    default_temperature: float,
    cap: int = MAX_NEW_TOKENS_CAP,
) -> SamplingParams:
    """Sampling settings from a request body (LLaVA or OpenAI key names)."""
    stop = params.get("stop")
    if stop is None:
        stops: tuple[str, ...] = ()
    elif isinstance(stop, str):
        stops = (stop,) if stop else ()
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stops = tuple(s for s in stop if s)
    else:
        raise RequestError(f"`stop` must be a string or a list of strings, got {stop!r}", param="stop")
    budget = _integer(params, max_tokens_key, default_max)
    if budget < 1:
        raise RequestError(
            f"`{max_tokens_key}` must be an integer >= 1, got {budget!r}", param=max_tokens_key
        )
    return SamplingParams(
        max_new_tokens=min(budget, cap),
        temperature=_number(params, "temperature", default_temperature),
        top_p=_number(params, "top_p", 1.0),
        stop=stops,
        min_tokens=_integer(params, "min_tokens", 0),
        repetition_penalty=_number(params, "repetition_penalty", 1.0),
        frequency_penalty=_number(params, "frequency_penalty", 0.0),
        presence_penalty=_number(params, "presence_penalty", 0.0),
        logit_bias=_logit_bias(params.get("logit_bias")),
        seed=_integer(params, "seed", None),
    )


def _logit_bias(value: Any) -> tuple[tuple[int, float], ...]:
    """OpenAI's ``{"token id": bias}`` map as pairs (checked by :class:`SamplingParams`)."""
    if value is None:
        return ()
    if not isinstance(value, Mapping):
        raise RequestError(
            f"`logit_bias` must be an object of token id -> bias, got {value!r:.80}", param="logit_bias"
        )
    try:
        return tuple((int(k), float(v)) for k, v in value.items())
    except (TypeError, ValueError):
        raise RequestError(
            f"`logit_bias` keys must be token ids and values numbers, got {dict(value)!r:.80}",
            param="logit_bias",
        ) from None


def scan_options(params: Mapping[str, Any]) -> ScanOptions:
    """Window / slice options of a request, for DICOM and NIfTI images."""
    window = params.get("window")
    if isinstance(window, list):
        window = tuple(window)
    for key in ("slice_index", "frame"):
        if params.get(key) is not None and not isinstance(params[key], (int, str)):
            raise RequestError(f"`{key}` must be an integer or 'middle'", param=key)
    return ScanOptions(
        window=window,
        slice_axis=params.get("slice_axis"),
        slice_index=params.get("slice_index"),
        frame=params.get("frame"),
    )
