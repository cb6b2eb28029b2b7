"""``quilt``: Quilt-1M histopathology image-text pairs (reference §A.5, layout §2).

Input: ``quilt_1M_lookup.csv`` (any ``quilt_1M_lookup*.csv``, e.g. the reference scripts' renamed
``quilt_1M_lookup-001.csv``) and the images unpacked into ``quilt_1m/`` (also accepted: ``images/quilt_1m/``,
``images/``). One sample per CSV row (``image_path`` is not unique: the same frame has several texts). The
row index (the CSV's blank first header) is the case id; images keep their real names (the reference scripts
renamed them by row index and lost the path, §A.5). List cells (``pathology``, ``roi_text``, ``med_umls_ids``)
are parsed as Python literals, never evaluated.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar, Literal

from cambrian_core.data.case import Case, ImageRef, Reject
from cambrian_core.data.converter import Converter, LayoutError
from cambrian_core.data.sources import clean_text, literal_list, read_csv

REQUIRED = ("caption", "image_path")
MAGNIFICATION = {"0": "low", "0.0": "low", "1": "medium", "1.0": "medium", "2": "high", "2.0": "high"}


class QuiltConverter(Converter):
    """Quilt-1M rows. Options: ``csv`` (file name), ``image_dir``, ``caption_field`` (``caption`` or
    ``corrected_text``), ``split`` (keep only ``train``/``val``), ``drop_not_histology`` (reject rows flagged
    ``not_histology=1``, default True), ``max_caption_words`` (truncate longer captions)."""

    name: ClassVar[str] = "quilt"
    prompt_name: ClassVar[str] = "quilt"
    license: ClassVar[str | None] = "Quilt-1M: research use only, no redistribution (see the dataset terms)"

    def __init__(
        self,
        src: str,
        views: Literal["single", "multi"] = "single",
        csv: str | None = None,
        image_dir: str | None = None,
        caption_field: str = "caption",
        split: str | None = None,
        drop_not_histology: bool = True,
        max_caption_words: int | None = None,
        **options: Any,
    ) -> None:
        super().__init__(src, views, **options)
        self.root = Path(src)
        self.csv_name = csv
        self.image_dir_name = image_dir
        self.caption_field = caption_field
        self.split = split
        self.drop_not_histology = bool(drop_not_histology)
        self.max_caption_words = max_caption_words

    def csv_path(self) -> Path | None:
        if self.csv_name:
            return self.root / self.csv_name
        found = sorted(self.root.glob("quilt_1M_lookup*.csv")) or sorted(
            self.root.glob("*/quilt_1M_lookup*.csv")
        )
        return found[0] if found else None

    def image_dir(self) -> Path:
        if self.image_dir_name:
            return self.root / self.image_dir_name
        for cand in (self.root / "quilt_1m", self.root / "images" / "quilt_1m", self.root / "images"):
            if cand.is_dir():
                return cand
        return self.root / "quilt_1m"

    def check_layout(self) -> None:
        csv_path = self.csv_path()
        if not self.root.is_dir() or csv_path is None or not csv_path.is_file():
            raise LayoutError(
                f"quilt: no quilt_1M_lookup*.csv in {self.root}; expected the Quilt-1M release: "
                "quilt_1M_lookup.csv + quilt_1m/<image_path> (unzipped images_part_*.zip)"
            )
        header, _ = read_csv(csv_path)
        missing = [c for c in (*REQUIRED, self.caption_field) if c not in header]
        if missing:
            raise LayoutError(
                f"quilt: {csv_path.name} lacks column(s) {missing}; its header is {header[:12]}"
            )
        if not self.image_dir().is_dir():
            raise LayoutError(
                f"quilt: image folder {self.image_dir()} not found (unzip images_part_*.zip there)"
            )

    def iter_cases(self) -> Iterator[Case | Reject]:
        csv_path = self.csv_path()
        assert csv_path is not None
        header, rows = read_csv(csv_path)
        index_col = header[0] if header and header[0] in ("", "Unnamed: 0") else None
        images = self.image_dir()
        for n, row in rows:
            cid = str(row.get(index_col) or n) if index_col is not None else str(n)
            where = f"{csv_path.name} row {n + 1}"
            if self.split and row.get("split") and row["split"] != self.split:
                continue
            if self.drop_not_histology and str(row.get("not_histology", "")).strip() in ("1", "1.0", "True"):
                yield Reject(self.name, cid, f"{where}: flagged not_histology=1 (not a histology image)")
                continue
            caption = clean_text(row.get(self.caption_field))
            if not caption:
                yield Reject(self.name, cid, f"{where}: empty `{self.caption_field}`")
                continue
            if self.max_caption_words and len(caption.split()) > self.max_caption_words:
                caption = " ".join(caption.split()[: self.max_caption_words])
            rel = str(row.get("image_path") or "").strip()
            path = images / rel
            if not rel or not path.is_file():
                yield Reject(
                    self.name, cid, f"{where}: image {rel or '(empty image_path)'} not found in {images}"
                )
                continue
            yield Case(
                self.name,
                cid,
                [ImageRef(str(path))],
                labels=self._labels(row),
                text={"caption": caption},
                group=f"frame:{rel}",  # the frame's other rows are other texts of it, not duplicates
            )

    @staticmethod
    def _labels(row: dict[str, str]) -> dict[str, Any]:
        labels: dict[str, Any] = {"modality": "histopathology", "image_path": row.get("image_path", "")}
        for key in ("subset", "split"):
            if row.get(key):
                labels[key] = row[key]
        pathology = [str(p) for p in literal_list(row.get("pathology"))]
        if pathology:
            labels["pathology"] = pathology
        mag = MAGNIFICATION.get(str(row.get("magnification", "")).strip())
        if mag:
            labels["magnification"] = mag
        roi = [str(r) for r in literal_list(row.get("roi_text"))]
        if roi:
            labels["roi_text"] = roi
        entities = []
        for group in literal_list(row.get("med_umls_ids")):
            for item in group if isinstance(group, list) else [group]:
                if isinstance(item, dict) and item.get("entity") and item["entity"] not in entities:
                    entities.append(str(item["entity"]))
        if entities:
            labels["umls_entities"] = entities
        return labels

    def offline_qa(self, case: Case) -> list[tuple[str, str]]:
        qa = [("What type of image is this?", "This is a histopathology image (a stained tissue section).")]
        pathology = case.labels.get("pathology")
        if pathology:
            qa.append(("Which pathology subspecialty does this image belong to?", ", ".join(pathology) + "."))
        if case.labels.get("magnification"):
            qa.append(
                (
                    "At what magnification is the tissue shown?",
                    f"At {case.labels['magnification']} magnification.",
                )
            )
        return qa


def register(registries: Any) -> None:
    registries.datasets.register_module(name="quilt", module=QuiltConverter)
