"""What each training stage trains, and a table of trainable parameters per module (reference §C.3)."""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

__all__ = ["group_of", "parameter_table"]


def group_of(name: str) -> str:
    """The module prefix a parameter is reported and optimised under.

    ``towers.<i>`` per tower, ``connector.<child>`` per direct child of the connector (e.g.
    ``connector.projector``, ``connector.sva``, ``connector.samplers``; the connector's own parameters such as
    queries fall under ``connector``), ``image_newline`` and ``llm``.
    """
    parts = name.split(".")
    if parts[0] == "towers":
        return ".".join(parts[:2])
    if parts[0] == "connector":
        return ".".join(parts[:2]) if len(parts) > 2 else "connector"
    return parts[0]


def parameter_table(named: Iterable[tuple[str, nn.Parameter]]) -> str:
    """A text table: module prefix, trainable and total parameter counts."""
    rows: dict[str, list[int]] = {}
    for name, p in named:
        row = rows.setdefault(group_of(name), [0, 0])
        row[0] += p.numel() if p.requires_grad else 0
        row[1] += p.numel()
    order = ("towers", "connector", "image_newline", "llm")
    rows = dict(
        sorted(
            rows.items(),
            key=lambda kv: (next((i for i, o in enumerate(order) if kv[0].startswith(o)), 9), kv[0]),
        )
    )
    total = [sum(r[0] for r in rows.values()), sum(r[1] for r in rows.values())]
    width = max([len(k) for k in rows] + [len("module")])
    lines = [f"{'module':<{width}}  {'trainable':>13}  {'total':>13}"]
    lines += [f"{k:<{width}}  {t:>13,}  {n:>13,}" for k, (t, n) in rows.items()]
    lines.append(f"{'all':<{width}}  {total[0]:>13,}  {total[1]:>13,}")
    return "\n".join(lines)
