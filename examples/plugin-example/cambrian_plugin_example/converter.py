"""A converter for the simplest private layout: ``DIR/*.png|jpg`` each with a same-named ``.txt`` caption."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from cambrian_core.data.case import Case, ImageRef, Reject
from cambrian_core.data.converter import Converter, LayoutError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


class CaptionedFolder(Converter):
    """Images with sidecar captions; an image without a caption (or an empty one) is rejected with the reason."""

    name = "captioned_folder"

    def check_layout(self) -> None:
        root = Path(self.src)
        if not root.is_dir():
            raise LayoutError(f"{root} is not a folder; expected DIR/<name>.png with DIR/<name>.txt captions")
        if not any(p.suffix.lower() in IMAGE_SUFFIXES for p in root.iterdir()):
            raise LayoutError(
                f"{root} holds no .png/.jpg images; expected DIR/<name>.png with DIR/<name>.txt"
            )

    def iter_cases(self) -> Iterator[Case | Reject]:
        for img in sorted(p for p in Path(self.src).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
            txt = img.with_suffix(".txt")
            if not txt.is_file():
                yield Reject(self.name, img.stem, f"{img.name}: caption file {txt.name} is missing")
                continue
            caption = txt.read_text(encoding="utf-8").strip()
            if not caption:
                yield Reject(self.name, img.stem, f"{txt.name} is empty")
                continue
            yield Case(self.name, img.stem, [ImageRef(str(img))], text={"caption": caption})

    def offline_qa(self, case: Case) -> list[tuple[str, str]]:
        return [("Describe this image.", case.text["caption"])]
