"""The offline ``template`` generator: caption and QA records from a case's structured labels, no API needed.

Stage-1 (``caption``) records pair an instruction with ``converter.caption(case)``; stage-2 (``instruct``)
records hold every ``converter.offline_qa(case)`` pair as one multi-turn conversation, plus DICOM-header
questions (modality, body part examined) when the case's first image is a DICOM file. The wording is fixed per
``prompt_version`` so a record names the exact templates that made it.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from cambrian_core.data.case import Case
from cambrian_core.data.converter import Converter
from cambrian_core.data.generators.base import Generator
from cambrian_core.data.medimage import ImageLoadError, dicom_header, guess_kind
from cambrian_core.model.template import IMAGE_TOKEN

__all__ = ["TemplateGenerator", "image_prefix"]

log = logging.getLogger(__name__)

#: stage-1 instructions (version 1); one is picked per case by a stable hash of its id
CAPTION_PROMPTS_V1 = (
    "Describe the medical image concisely.",
    "Write a short caption for this medical image.",
    "Summarise the key findings visible in the image.",
    "Give a brief description of this image.",
    "What does this medical image show?",
)

_MODALITY_NAMES = {
    "CT": "computed tomography (CT)",
    "MR": "magnetic resonance imaging (MRI)",
    "CR": "computed radiography (X-ray)",
    "DX": "digital radiography (X-ray)",
    "MG": "mammography",
    "US": "ultrasound",
    "NM": "nuclear medicine",
    "PT": "positron emission tomography (PET)",
    "XA": "X-ray angiography",
    "RF": "fluoroscopy",
    "OT": "other",
}


def image_prefix(case: Case, n_images: int) -> str:
    """One ``<image>`` line per image, then a line naming the views of a multi-view sample."""
    prefix = f"{IMAGE_TOKEN}\n" * n_images
    views = [ref.view for ref in case.images if ref.view]
    if n_images > 1 and len(views) == n_images:
        prefix += f"The images are, in order: {', '.join(views)}.\n"
    return prefix


def _pick(options: tuple[str, ...], key: str) -> str:
    return options[int(hashlib.sha1(key.encode("utf-8")).hexdigest(), 16) % len(options)]


class TemplateGenerator(Generator):
    """Caption + QA records from structured labels (and DICOM headers); deterministic, offline."""

    name = "template"
    prompt_version = "template-v1"

    def __init__(self, caption: bool = True, instruct: bool = True, dicom_qa: bool = True) -> None:
        self.caption = caption
        self.instruct = instruct
        self.dicom_qa = dicom_qa

    def generate(self, converter: Converter, case: Case, images: list[Path]) -> list[dict]:
        image = [str(p) for p in images]
        prefix = image_prefix(case, len(images))
        records = []
        caption = converter.caption(case) if self.caption else None
        if caption and caption.strip():
            prompt = _pick(CAPTION_PROMPTS_V1, f"{case.source}:{case.case_id}")
            records.append(_record(image, [(prefix + prompt, caption.strip())], "caption"))
        if self.instruct:
            pairs = [(q.strip(), a.strip()) for q, a in converter.offline_qa(case) if q.strip() and a.strip()]
            if self.dicom_qa:
                asked = " ".join(q.lower() for q, _ in pairs)  # the converter's own questions win
                pairs += [(q, a) for topic, q, a in self.header_qa(case) if topic not in asked]
            if pairs:
                pairs[0] = (prefix + pairs[0][0], pairs[0][1])
                records.append(_record(image, pairs, "instruct"))
        return records

    @staticmethod
    def header_qa(case: Case) -> list[tuple[str, str, str]]:
        """``(topic, question, answer)`` on modality and body part from the first image's DICOM header."""
        if not case.images:
            return []
        ref = case.images[0]
        try:
            if (ref.kind or guess_kind(ref.path)) != "dicom" or Path(ref.path).is_dir():
                return []
            header = dicom_header(ref.path)
        except (OSError, ImageLoadError) as exc:
            log.debug("no DICOM header QA for %s: %s", ref.path, exc)
            return []
        pairs = []
        modality = header.get("Modality")
        if modality:
            name = _MODALITY_NAMES.get(modality.upper(), modality)
            pairs.append(
                (
                    "modality",
                    "Which imaging modality was used for this image?",
                    f"This image was acquired with {name}.",
                )
            )
        body = header.get("BodyPartExamined")
        if body:
            part = body.replace("_", " ").lower()
            pairs.append(("body", "Which body part is examined?", f"The {part} is examined."))
        return pairs


def _record(image: list[str], pairs: list[tuple[str, str]], stage: str) -> dict:
    conversations = []
    for question, answer in pairs:
        conversations += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
    return {"image": image, "conversations": conversations, "stage": stage}
