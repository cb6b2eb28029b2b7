"""``pmc_oa``: biomedical figures and their captions from PubMed Central (reference §A.1, layouts §1a/§1b).

Three input layouts, detected in this order:

1. the PMC-OA release of PMC-CLIP: ``pmc_oa.jsonl`` (or ``pmc_oa_beta.jsonl``, or ``train/valid/test.jsonl``), one
   ``{"image", "caption", ...}`` per line, images in ``caption_T060_filtered_top4_sep_v0_subfigures/`` (also
   accepted under ``images/``, or a flat ``images/``);
2. PMC Open Access article packages, ``PMC<n>.tar.gz`` anywhere below the root (``oa_package/<xx>/<yy>/``, unpacked
   once into ``extract_dir``) or extracted ``PMC<n>/<stem>.nxml`` (JATS XML) next to the figure files (preferred
   when both exist); each ``<fig>`` gives a caption (the full ``<caption>`` text, title included) and an image (``<graphic xlink:href>`` without
   extension, resolved by trying ``.jpg .jpeg .png .gif .tif .tiff .bmp``);
3. the reference scripts' intermediate form: ``captions/<PMCID>.json`` (lists of ``{image_filename, label, title,
   caption}``) + ``images2/<PMCID>/<figure>.<ext>``; its captions went through ``unicode_escape`` decoding, which
   is undone where it garbled them. With PMC-OA's ``train/valid/test.jsonl`` beside them (and no subfigure
   folder), only the whole figures those files name (distinct ``pmcid`` + ``url_name``) are read, as MVD does.

Captions shorter than ``min_caption_words`` (20, the recipe's stage-1 rule) become rejects. Each caption is
classified into modality / body part / disease keywords (§A.1.4) by a pluggable classifier (default: keyword
rules); the labels seed offline QA and can exclude modalities (``exclude_modalities``).
"""

from __future__ import annotations

import json
import os
import shutil
import tarfile
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, ClassVar, Literal

from cambrian_core.data.case import Case, ImageRef, Reject
from cambrian_core.data.classify import CaptionClass, KeywordClassifier, load_callable
from cambrian_core.data.converter import Converter, LayoutError
from cambrian_core.data.sources import IMAGE_EXTENSIONS, clean_text, find_image, unique_id, word_count
from cambrian_core.fileio import jsonl_lines

PMC_CLIP_IMAGES = "caption_T060_filtered_top4_sep_v0_subfigures"
METAFILES = ("pmc_oa.jsonl", "pmc_oa_beta.jsonl")
SPLIT_FILES = ("train.jsonl", "valid.jsonl", "test.jsonl")
XLINK_HREF = "{http://www.w3.org/1999/xlink}href"
BODY_PART_NAMES = {
    "Head & neck": "the head and neck",
    "Thorax": "the thorax",
    "Abdomen": "the abdomen and pelvis",
    "Upper": "the upper limb",
    "Lower": "the lower limb",
    "Extremity": "the musculoskeletal system",
}
MODALITY_NAMES = {
    "X-ray": "an X-ray radiograph",
    "DSA": "a digital subtraction angiogram",
    "CT": "a CT image",
    "MR": "an MR image",
    "PET/SPECT": "a PET/SPECT image",
    "Ultrasound": "an ultrasound image",
    "Pathology": "a histopathology micrograph",
    "Camera": "a clinical photograph",
    "gross pathology": "a gross pathology specimen photograph",
    "Dermatology": "a dermatology image",
    "OCT": "an optical coherence tomography image",
    "EM": "an electron micrograph",
    "Colonoscopy": "an endoscopy image",
    "Radioisotope": "a scintigraphy image",
    "Optical Image": "an optical microscopy or fundus image",
    "Mitotic": "a micrograph showing mitotic figures",
}


def _text(elem: ET.Element | None) -> str:
    return clean_text("".join(elem.itertext())) if elem is not None else ""


def _caption(elem: ET.Element | None) -> str:
    """Full ``<caption>`` text; block children (``<title>``, ``<p>``) are separated by a space."""
    if elem is None:
        return ""
    parts = [clean_text(elem.text)] + [_text(child) + " " + clean_text(child.tail) for child in elem]
    return clean_text(" ".join(parts))


def undo_unicode_escape(text: str) -> str:
    """Text that went through MVD's ``unicode_escape`` decoding (UTF-8 bytes read as Latin-1: "Ã¶" for "ö") with
    its characters restored; text that does not decode that way (ASCII, or never garbled) is returned as is."""
    try:
        return text.encode("latin-1").decode("utf-8")
    except UnicodeError:
        return text


class PmcOaConverter(Converter):
    """PMC figures + captions. Options: ``layout`` (auto, pmc_clip, packages, mvd), ``metafile`` (jsonl name(s)),
    ``min_caption_words`` (20), ``classifier`` (callable or ``"module:function"``: caption -> CaptionClass or
    dict with modality/body_part/diseases), ``exclude_modalities`` (classes to reject), ``extract_dir`` (where
    ``PMC<n>.tar.gz`` packages are unpacked, their ``.nxml`` and figures only; default
    ``$CAMBRIAN_CACHE/pmc_oa_packages``)."""

    name: ClassVar[str] = "pmc_oa"
    prompt_name: ClassVar[str] = "pmc_oa"
    license: ClassVar[str | None] = "PMC Open Access subset: per-article licence (see the article)"

    def __init__(
        self,
        src: str,
        views: Literal["single", "multi"] = "single",
        layout: str = "auto",
        metafile: str | list[str] | None = None,
        min_caption_words: int = 20,
        classifier: Callable[[str], Any] | str | None = None,
        exclude_modalities: Iterable[str] = (),
        extract_dir: str | None = None,
        **options: Any,
    ) -> None:
        super().__init__(src, views, **options)
        if layout not in ("auto", "pmc_clip", "packages", "mvd"):
            raise ValueError(f"pmc_oa: layout must be auto, pmc_clip, packages or mvd, got {layout!r}")
        self.root = Path(src)
        self.layout = layout
        self.metafile = [metafile] if isinstance(metafile, str) else metafile
        self.min_caption_words = int(min_caption_words)
        self.classifier = load_callable(classifier) if classifier else KeywordClassifier()
        self.exclude_modalities = set(exclude_modalities)
        self.extract_dir = Path(extract_dir) if extract_dir else None

    # -- layout -------------------------------------------------------------------------------------------------
    def _metafiles(self) -> list[Path]:
        if self.metafile:
            return [self.root / m for m in self.metafile]
        for name in METAFILES:
            if (self.root / name).is_file():
                return [self.root / name]
        return [self.root / n for n in SPLIT_FILES if (self.root / n).is_file()]

    def _image_dir(self) -> Path:
        for cand in (
            self.root / PMC_CLIP_IMAGES,
            self.root / "images" / PMC_CLIP_IMAGES,
            self.root / "images",
        ):
            if cand.is_dir():
                return cand
        return self.root / PMC_CLIP_IMAGES

    def _packages(self) -> list[Path]:
        """Article packages: extracted ``PMC<n>/`` folders, then ``PMC<n>.tar.gz`` archives whose article has no
        extracted folder; both anywhere below the root (``oa_package/<xx>/<yy>/``), one per article."""
        found: dict[str, Path] = {}
        for p in sorted(self.root.rglob("PMC*")):
            if p.is_dir() and p.name not in found and any(p.glob("*.nxml")):
                found[p.name] = p
        folders = sorted(found.values(), key=lambda p: p.name)
        have = set(found)
        tars = {}
        for tar in sorted(self.root.rglob("PMC*.tar.gz")):
            pmcid = tar.name[: -len(".tar.gz")]
            if pmcid not in have:
                tars.setdefault(pmcid, tar)
        return folders + sorted(tars.values(), key=lambda t: t.name)

    def _unpack(self, tar: Path) -> Path:
        """The folder holding ``tar``'s ``.nxml`` and figure files (unpacked once, by name only: no paths, links
        or other members leave the archive)."""
        from cambrian_core.assets import cache_dir

        pmcid = tar.name[: -len(".tar.gz")]
        base = self.extract_dir or cache_dir("pmc_oa_packages")
        dest = base / pmcid
        stamp = dest / ".unpacked"
        if stamp.is_file() and stamp.read_text() == f"{tar.resolve()} {tar.stat().st_size}":
            return dest
        tmp = base / f".{pmcid}.{os.getpid()}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        wanted = {".nxml", *IMAGE_EXTENSIONS}
        with tarfile.open(tar, "r:gz") as archive:
            for member in archive:
                name = Path(member.name).name
                if not member.isfile() or Path(name).suffix.lower() not in wanted or name.startswith("."):
                    continue
                src = archive.extractfile(member)
                if src is not None:
                    with src, open(tmp / name, "wb") as out:
                        shutil.copyfileobj(src, out)
        (tmp / ".unpacked").write_text(f"{tar.resolve()} {tar.stat().st_size}")
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(tmp, dest)
        return dest

    def detect(self) -> str:
        """The layout in use (``pmc_clip``, ``packages`` or ``mvd``); raises LayoutError when none fits."""
        if self.layout != "auto":
            return self.layout
        mvd = (self.root / "captions").is_dir() and (self.root / "images2").is_dir()
        if self._metafiles():
            # MVD's variant: the split files only select whole figures of captions/ + images2/
            return "mvd" if mvd and not self._image_dir().is_dir() else "pmc_clip"
        if mvd:
            return "mvd"
        if self._packages():
            return "packages"
        raise LayoutError(
            f"pmc_oa: {self.root} matches no PMC layout. Expected one of: (1) pmc_oa.jsonl / pmc_oa_beta.jsonl / "
            f"train.jsonl + {PMC_CLIP_IMAGES}/ (PMC-OA release); (2) article packages, PMC<n>.tar.gz (e.g. "
            f"oa_package/<xx>/<yy>/) or extracted PMC<n>/<article>.nxml with figure files; (3) "
            f"captions/<PMCID>.json + images2/<PMCID>/."
        )

    def check_layout(self) -> None:
        if not self.root.is_dir():
            raise LayoutError(f"pmc_oa: --src {self.root} is not a folder (expected a PMC-OA release folder)")
        layout = self.detect()
        if layout == "pmc_clip":
            missing = [m.name for m in self._metafiles() if not m.is_file()]
            if missing or not self._metafiles():
                raise LayoutError(
                    f"pmc_oa: metafile(s) {missing or list(METAFILES)} not found in {self.root}"
                )
            if not self._image_dir().is_dir():
                raise LayoutError(
                    f"pmc_oa: image folder {PMC_CLIP_IMAGES}/ not found in {self.root} (unzip images.zip there)"
                )

    # -- cases ----------------------------------------------------------------------------------------------------
    def classify(self, caption: str) -> dict[str, Any]:
        result = self.classifier(caption)
        if isinstance(result, CaptionClass):
            return result.as_labels()
        if isinstance(result, dict):
            return {"modality": "Other", "body_part": "Other", "diseases": [], **result}
        raise TypeError(f"pmc_oa: classifier returned {type(result).__name__}; expected CaptionClass or dict")

    def _case(self, case_id: str, image: Path | None, caption: str, where: str, extra: dict) -> Case | Reject:
        if image is None:
            return Reject(self.name, case_id, f"{where}: image file not found")
        if not caption:
            return Reject(self.name, case_id, f"{where}: empty caption")
        words = word_count(caption)
        if words < self.min_caption_words:
            return Reject(
                self.name,
                case_id,
                f"{where}: caption has {words} words (< min_caption_words={self.min_caption_words})",
            )
        labels = {**extra, **self.classify(caption)}
        if labels["modality"] in self.exclude_modalities:
            return Reject(self.name, case_id, f"{where}: modality {labels['modality']!r} is excluded")
        return Case(self.name, case_id, [ImageRef(str(image))], labels=labels, text={"caption": caption})

    def _metafile_rows(self, needed: tuple[str, ...]) -> Iterator[Reject | tuple[str, dict[str, Any]]]:
        """``(where, row)`` for each JSON object line of the metafiles holding the ``needed`` fields; a line
        that is not one is a reject naming file and line."""
        for meta in self._metafiles():
            for lineno, line in enumerate(jsonl_lines(meta.read_text(encoding="utf-8-sig")), 1):
                if not line.strip():
                    continue
                where = f"{meta.name} line {lineno}"
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    yield Reject(self.name, f"{meta.stem}:{lineno}", f"{where}: not JSON ({exc.msg})")
                    continue
                if not isinstance(row, dict) or not all(row.get(k) for k in needed):
                    fields = " / ".join(f"`{k}`" for k in needed)
                    yield Reject(self.name, f"{meta.stem}:{lineno}", f"{where}: no {fields} field")
                    continue
                yield where, row

    def _iter_pmc_clip(self) -> Iterator[Case | Reject]:
        images, seen = self._image_dir(), {}
        for item in self._metafile_rows(("image",)):
            if isinstance(item, Reject):
                yield item
                continue
            where, row = item
            cid = unique_id(Path(str(row["image"])).stem, seen)
            extra = {k: row[k] for k in ("pmcid", "url_name") if row.get(k)}
            path = images / str(row["image"])
            yield self._case(
                cid, path if path.is_file() else None, clean_text(row.get("caption")), where, extra
            )

    def _iter_packages(self) -> Iterator[Case | Reject]:
        seen: dict[str, int] = {}
        for package in self._packages():
            folder = package
            if package.is_file():
                try:
                    folder = self._unpack(package)
                except (tarfile.TarError, OSError, EOFError) as exc:
                    yield Reject(self.name, package.name, f"{package}: unreadable package ({exc})")
                    continue
                if not any(folder.glob("*.nxml")):
                    yield Reject(self.name, package.name, f"{package}: no .nxml article in the package")
                    continue
            for nxml in sorted(folder.glob("*.nxml")):
                try:
                    root = ET.parse(nxml).getroot()
                except ET.ParseError as exc:
                    yield Reject(self.name, folder.name, f"{nxml.name}: XML parse error ({exc})")
                    continue
                for n, fig in enumerate(root.iter("fig")):
                    graphic = fig.find(".//graphic")
                    href = graphic.get(XLINK_HREF) if graphic is not None else None
                    cid = unique_id(f"{folder.name}/{fig.get('id') or href or n}", seen)
                    where = f"{folder.name}/{nxml.name} <fig {fig.get('id') or n}>"
                    if not href:
                        yield Reject(self.name, cid, f"{where}: no <graphic xlink:href>")
                        continue
                    extra = {"pmcid": folder.name, "label": _text(fig.find("label")), "figure": href}
                    caption = _caption(fig.find("caption"))
                    yield self._case(cid, find_image(folder, href), caption, where, extra)

    def _mvd_selection(self) -> Iterator[Reject | tuple[str, str]]:
        """MVD's use of the PMC-OA split files: the distinct ``(pmcid, figure)`` pairs they name (``url_name``
        without its image extension: the ``image_filename`` of ``captions/<pmcid>.json``)."""
        for item in self._metafile_rows(("pmcid", "url_name")):
            if isinstance(item, Reject):
                yield item
                continue
            _, row = item
            name = Path(str(row["url_name"])).name
            if Path(name).suffix.lower() in IMAGE_EXTENSIONS:
                name = name[: -len(Path(name).suffix)]
            yield str(row["pmcid"]), name

    def _iter_mvd(self) -> Iterator[Case | Reject]:
        selected: dict[str, set[str]] | None = None
        if self._metafiles():
            selected = {}
            for item in self._mvd_selection():
                if isinstance(item, Reject):
                    yield item
                else:
                    selected.setdefault(item[0], set()).add(item[1])
            for pmcid in sorted(selected):
                if not (self.root / "captions" / f"{pmcid}.json").is_file():
                    for name in sorted(selected.pop(pmcid)):
                        yield Reject(self.name, f"{pmcid}/{name}", f"captions/{pmcid}.json not found")
        seen: dict[str, int] = {}
        for meta in sorted((self.root / "captions").glob("*.json")):
            pmcid = meta.stem
            if selected is not None and pmcid not in selected:
                continue
            try:
                figures = json.loads(meta.read_text(encoding="utf-8-sig"))
            except json.JSONDecodeError as exc:
                yield Reject(self.name, pmcid, f"captions/{meta.name}: not JSON ({exc.msg})")
                continue
            for n, fig in enumerate(figures if isinstance(figures, list) else []):
                name = str(fig.get("image_filename") or "") if isinstance(fig, dict) else ""
                cid = unique_id(f"{pmcid}/{name or n}", seen)
                where = f"captions/{meta.name} item {n}"
                if not name:
                    yield Reject(self.name, cid, f"{where}: no `image_filename`")
                    continue
                if selected is not None:
                    if Path(name).name not in selected[pmcid]:
                        continue
                    selected[pmcid].discard(Path(name).name)
                image = find_image(self.root / "images2" / pmcid, Path(name).name)
                extra = {"pmcid": pmcid, "label": clean_text(fig.get("label")), "figure": name}
                raw = str(fig.get("caption") or "")
                caption = undo_unicode_escape(raw)
                if caption != raw:
                    extra["caption_repaired"] = True
                yield self._case(cid, image, clean_text(caption), where, extra)
            for name in sorted(selected.get(pmcid, ()) if selected is not None else ()):
                yield Reject(self.name, f"{pmcid}/{name}", f"figure {name!r} is not in captions/{meta.name}")

    def iter_cases(self) -> Iterator[Case | Reject]:
        layout = self.detect()
        yield from {"pmc_clip": self._iter_pmc_clip, "packages": self._iter_packages, "mvd": self._iter_mvd}[
            layout
        ]()

    def offline_qa(self, case: Case) -> list[tuple[str, str]]:
        qa = []
        modality = MODALITY_NAMES.get(case.labels.get("modality", ""))
        if modality:
            qa.append(("What kind of image is this?", f"This is {modality}."))
        part = BODY_PART_NAMES.get(case.labels.get("body_part", ""))
        if part:
            qa.append(("Which body region does the figure concern?", f"It concerns {part}."))
        return qa


def register(registries: Any) -> None:
    registries.datasets.register_module(name="pmc_oa", module=PmcOaConverter)
