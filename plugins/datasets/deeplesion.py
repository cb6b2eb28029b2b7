"""``deeplesion``: NIH DeepLesion CT key slices with their RECIST lesion annotations.

Layout (source_layouts.md §3)::

    DL_info.csv                                  one row per lesion, 18 columns
    Images_png/<patient>_<study>_<series>/<NNN>.png   16-bit, HU = value - 32768 (NNN: 3-digit slice, 1-based)
    Key_slices/<File_name>                       MVD's variant (bit depth detected when read)

One case per key slice (``File_name``), with every lesion annotated on it. ``--views multi`` adds the
``neighbors`` slices on each side (from ``Images_png``). Each slice is windowed with its row's
``DICOM_windows`` unless ``--window`` says otherwise. No free text ships: captions and QA are built from the
lesion type (when labelled), diameters x pixel spacing (mm), and the box (as fractions of the image size).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar, Literal

from cambrian_core.data.case import Case, ImageRef, Reject
from cambrian_core.data.converter import Converter, LayoutError

from ._cells import CellError, csv_header, float_list, is_missing, open_csv, to_float

COLUMNS = (
    "File_name",
    "Patient_index",
    "Study_index",
    "Series_ID",
    "Key_slice_index",
    "Measurement_coordinates",
    "Bounding_boxes",
    "Lesion_diameters_Pixel_",
    "Normalized_lesion_location",
    "Coarse_lesion_type",
    "Possibly_noisy",
    "Slice_range",
    "Spacing_mm_px_",
    "Image_size",
    "DICOM_windows",
    "Patient_gender",
    "Patient_age",
    "Train_Val_Test",
)
#: Coarse_lesion_type -> organ / region (DeepLesion README order; -1 = not labelled)
LESION_TYPES = {
    1: "bone",
    2: "abdomen",
    3: "mediastinum",
    4: "liver",
    5: "lung",
    6: "kidney",
    7: "soft tissue",
    8: "pelvis",
}
SPLITS = {1: "train", 2: "val", 3: "test"}
_SEX = {"M": "male", "F": "female"}


def _lesion(row: dict[str, str]) -> dict[str, Any]:
    """The lesion fields of one row (raises CellError naming the column)."""
    kind = int(to_float(row.get("Coarse_lesion_type"), "Coarse_lesion_type") or -1)
    spacing = float_list(row.get("Spacing_mm_px_"), 3, "Spacing_mm_px_")
    long_px, short_px = float_list(row.get("Lesion_diameters_Pixel_"), 2, "Lesion_diameters_Pixel_")
    return {
        "type": kind,
        "type_name": LESION_TYPES.get(kind),
        "box": float_list(row.get("Bounding_boxes"), 4, "Bounding_boxes"),
        "diameters_px": [long_px, short_px],
        "diameters_mm": [round(long_px * spacing[0], 1), round(short_px * spacing[0], 1)],
        "location": float_list(row.get("Normalized_lesion_location"), 3, "Normalized_lesion_location"),
        "noisy": int(to_float(row.get("Possibly_noisy"), "Possibly_noisy") or 0) == 1,
        "spacing": spacing,
        "window": float_list(row.get("DICOM_windows"), 2, "DICOM_windows"),
        "slice_range": [int(v) for v in float_list(row.get("Slice_range"), 2, "Slice_range")],
        "size": [int(v) for v in float_list(row.get("Image_size"), 2, "Image_size")],
    }


def _and(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


class DeepLesion(Converter):
    """DeepLesion (see the module docstring).

    Options:
        neighbors: slices on each side of the key slice in ``--views multi`` samples (default 1).
        drop_noisy: drop lesions flagged ``Possibly_noisy`` (default True).
    """

    name: ClassVar[str] = "deeplesion"
    prompt_name: ClassVar[str] = "deeplesion"
    license: ClassVar[str | None] = "DeepLesion (NIH Clinical Center) terms of use"

    def __init__(
        self,
        src: str,
        views: Literal["single", "multi"] = "single",
        neighbors: int = 1,
        drop_noisy: bool = True,
        **options: Any,
    ) -> None:
        super().__init__(src, views, **options)
        self.neighbors = int(neighbors)
        self.drop_noisy = bool(drop_noisy)
        self.root = Path(src)

    def _layout(self) -> str:
        return (
            f"expected {self.root}/DL_info.csv (18 columns: {', '.join(COLUMNS)}) and "
            f"{self.root}/Images_png/<patient>_<study>_<series>/<NNN>.png or {self.root}/Key_slices/<File_name>"
        )

    def check_layout(self) -> None:
        if not self.root.is_dir():
            raise LayoutError(f"deeplesion: --src {self.root} is not a folder; {self._layout()}")
        info = self.root / "DL_info.csv"
        if not info.is_file():
            raise LayoutError(f"deeplesion: {info} not found; {self._layout()}")
        missing = [c for c in COLUMNS if c not in csv_header(info)]
        if missing:
            raise LayoutError(
                f"deeplesion: {info} lacks the column(s) {', '.join(missing)}; {self._layout()}"
            )
        if not (self.root / "Images_png").is_dir() and not (self.root / "Key_slices").is_dir():
            raise LayoutError(
                f"deeplesion: neither Images_png/ nor Key_slices/ in {self.root}; {self._layout()}"
            )

    def _slice_path(self, file_name: str, index: int) -> Path | None:
        series = file_name.rsplit("_", 1)[0]
        full = self.root / "Images_png" / series / f"{index:03d}.png"
        if full.is_file():
            return full
        key = self.root / "Key_slices" / file_name
        if key.is_file() and file_name == f"{series}_{index:03d}.png":
            return key
        return None

    def iter_cases(self) -> Iterator[Case | Reject]:
        slices: dict[str, list[dict[str, str]]] = {}
        for row in open_csv(self.root / "DL_info.csv"):
            slices.setdefault((row.get("File_name") or "").strip(), []).append(row)
        for file_name, rows in slices.items():
            yield self._case(file_name, rows)

    def _case(self, file_name: str, rows: list[dict[str, str]]) -> Case | Reject:
        case_id = file_name.removesuffix(".png")
        try:
            key = int(to_float(rows[0].get("Key_slice_index"), "Key_slice_index") or -1)
            lesions = [_lesion(r) for r in rows]
            age = to_float(rows[0].get("Patient_age"), "Patient_age")
            split = to_float(rows[0].get("Train_Val_Test"), "Train_Val_Test")
        except CellError as exc:
            return Reject(self.name, case_id, f"DL_info.csv row {file_name}: {exc}")
        if self.drop_noisy:
            lesions = [le for le in lesions if not le["noisy"]]
            if not lesions:
                return Reject(self.name, case_id, f"{file_name}: every lesion is flagged Possibly_noisy")
        key_path = self._slice_path(file_name, key)
        if key_path is None:
            return Reject(
                self.name, case_id, f"{file_name}: key slice {key} not found in Images_png/ or Key_slices/"
            )
        low, high = lesions[0]["window"]
        opts = self.image_options(window=((low + high) / 2, max(high - low, 1.0)))
        refs = [ImageRef(str(key_path), kind="png16_hu", options=opts, view="key slice")]
        if self.views == "multi" and self.neighbors > 0:
            first, last = lesions[0]["slice_range"]
            before, after = [], []
            for d in range(1, self.neighbors + 1):
                for index, side, sign in ((key - d, before, "-"), (key + d, after, "+")):
                    path = self._slice_path(file_name, index) if first <= index <= last else None
                    if path is not None and path != key_path:
                        spacing = lesions[0]["spacing"][2]
                        side.append(
                            ImageRef(str(path), "png16_hu", dict(opts), f"slice {sign}{d * spacing:g} mm")
                        )
            refs = before[::-1] + refs + after
        gender = (rows[0].get("Patient_gender") or "").strip()
        labels = {
            "modality": "CT",
            "lesions": lesions,
            "key_slice": key,
            "window_hu": [low, high],
            "sex": None if is_missing(gender) else _SEX.get(gender),
            "age": None if age is None else int(age),
            "split": SPLITS.get(int(split)) if split is not None else None,
        }
        return Case(self.name, case_id, refs, labels=labels)

    # ------------------------------------------------------------------------------------------- text

    @staticmethod
    def _describe(le: dict[str, Any]) -> str:
        long_mm, short_mm = le["diameters_mm"]
        kind = f"{le['type_name']} lesion" if le["type_name"] else "lesion (type not labelled)"
        return f"a {long_mm:.1f} x {short_mm:.1f} mm {kind}"

    def caption(self, case: Case) -> str | None:
        lesions = case.labels["lesions"]
        low, high = case.labels["window_hu"]
        age, sex = case.labels.get("age"), case.labels.get("sex")
        who = (
            f" of a {age}-year-old {sex or 'patient'}"
            if age is not None
            else (f" of a {sex} patient" if sex else "")
        )
        n = len(lesions)
        head = f"Axial CT slice{who} (window {low:g} to {high:g} HU) with {n} annotated lesion{'s' * (n > 1)}"
        return f"{head}: {_and([self._describe(le) for le in lesions])}."

    def offline_qa(self, case: Case) -> list[tuple[str, str]]:
        lesions = case.labels["lesions"]
        qa = [("How many lesions are annotated on this CT slice?", f"{len(lesions)}.")]
        typed = [le["type_name"] for le in lesions if le["type_name"]]
        if typed and len(typed) == len(lesions):
            qa.append(
                (
                    "Which organ or region do the lesions involve?"
                    if len(lesions) > 1
                    else "Which organ or region does the lesion involve?",
                    f"{_and(typed)[:1].upper()}{_and(typed)[1:]}.",
                )
            )
        sizes, boxes = [], []
        for i, le in enumerate(lesions, 1):
            tag = f"Lesion {i}: " if len(lesions) > 1 else ""
            long_mm, short_mm = le["diameters_mm"]
            sizes.append(
                f"{tag}about {long_mm:.1f} mm on the long axis and {short_mm:.1f} mm on the short axis."
            )
            rows, cols = le["size"]
            x1, y1, x2, y2 = le["box"]
            frac = [x1 / cols, y1 / rows, x2 / cols, y2 / rows]
            boxes.append(f"{tag}[{', '.join(f'{v:.2f}' for v in frac)}]")
        qa.append(
            (
                "What is the size of the lesion?"
                if len(lesions) == 1
                else "What are the sizes of the lesions?",
                " ".join(sizes),
            )
        )
        qa.append(
            (
                "Where is the lesion in the image? Give its bounding box as fractions of the width and height "
                "(x1, y1, x2, y2).",
                "; ".join(boxes) + ".",
            )
        )
        return qa


def register(registries: Any) -> None:
    registries.datasets.register_module(name=DeepLesion.name, module=DeepLesion)
