"""The registry tree: building from config dicts and the errors users see when they get it wrong."""

from __future__ import annotations

import pytest
from mmengine.registry import DATASETS as MM_DATASETS
from mmengine.registry import METRICS as MM_METRICS
from mmengine.registry import MODELS as MM_MODELS
from mmengine.registry import RUNNERS as MM_RUNNERS

from cambrian_core.registry import REGISTRIES, BuildError, CambrianRegistry, build, suggest


@pytest.fixture
def reg() -> CambrianRegistry:
    r = CambrianRegistry("widget_test", kind="widget")

    class Widget:
        def __init__(self, depth: int, width: int = 8) -> None:
            self.depth, self.width = depth, width

    def make_gadget(size: int = 1, **extra: object) -> dict:
        return {"size": size, **extra}

    r.register_module(name="widget", module=Widget)
    r.register_module(name="gadget", module=make_gadget)
    return r


def test_every_kind_exists_and_roots_are_mmengine() -> None:
    assert set(REGISTRIES) >= {
        "encoders",
        "connectors",
        "llms",
        "models",
        "templates",
        "datasets",
        "generators",
        "runners",
        "metrics",
    }
    assert REGISTRIES["models"].parent is MM_MODELS
    assert REGISTRIES["datasets"].parent is MM_DATASETS
    assert REGISTRIES["runners"].parent is MM_RUNNERS
    assert REGISTRIES["metrics"].parent is MM_METRICS


def test_build_class_and_function(reg: CambrianRegistry) -> None:
    w = build(reg, {"type": "widget", "depth": 3})
    assert (w.depth, w.width) == (3, 8)
    assert build(reg, {"type": "gadget", "size": 2, "colour": "red"}) == {"size": 2, "colour": "red"}
    assert build(reg, {"type": "widget"}, depth=5).depth == 5  # default_args fill in


def test_unknown_type_lists_names_and_suggests(reg: CambrianRegistry) -> None:
    with pytest.raises(
        BuildError, match=r"Unknown widget type `widgit`.*Did you mean `widget`\?.*gadget, widget"
    ):
        build(reg, {"type": "widgit", "depth": 1})
    with pytest.raises(KeyError):  # still a KeyError for mmengine-style callers
        build(reg, {"type": "nothing_like_it"})


def test_wrong_keyword_names_component_key_and_accepted(reg: CambrianRegistry) -> None:
    with pytest.raises(
        BuildError,
        match=r"`widget widget` got an unexpected keyword `dpth` \(did you mean `depth`\?\); accepted: depth, width",
    ):
        build(reg, {"type": "widget", "dpth": 3})
    with pytest.raises(TypeError, match="missing the required keyword `depth`"):
        build(reg, {"type": "widget"})


def test_missing_type_and_non_dict(reg: CambrianRegistry) -> None:
    with pytest.raises(BuildError, match="needs a `type` key naming one of: gadget, widget"):
        build(reg, {"depth": 3})
    with pytest.raises(BuildError, match="must be a dict"):
        reg.build(["widget"])


def test_suggest() -> None:
    assert suggest("conector_depth", ["connector_depth", "num_query_group"]) == "connector_depth"
    assert suggest("zzz", ["connector_depth"]) is None


def test_registration_records_provider(reg: CambrianRegistry) -> None:
    assert reg.providers["widget"] == "<direct registration>"


def test_unregistered_name_never_resolves_to_an_importable_module(reg: CambrianRegistry) -> None:
    # mmengine's Registry.get falls back to importing dotted paths; a config type must be registered.
    with pytest.raises(BuildError, match="Unknown widget type `json`"):
        build(reg, {"type": "json"})
