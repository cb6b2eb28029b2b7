"""Keyword classification of medical figure captions: modality, body part, disease keywords, medical or not.

The PMC-Cambrian recipe asked a GPT model to put each PMC figure on three axes (reference §A.1.4). This is the
offline stand-in: transparent keyword rules over the caption, good for filtering and for seeding questions, and
pluggable (give a converter or the filter your own callable, e.g. one that wraps an LLM or an image classifier).
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "BODY_PARTS",
    "MODALITIES",
    "CaptionClass",
    "KeywordClassifier",
    "load_callable",
    "medical_domain",
]

#: words that make an "angiography" CT, MR or optical (fluorescein, ICG, OCT-A) rather than catheter angiography
_NOT_CATHETER_ANGIO = (
    r"\bct\b|\bcta\b|computed tomograph|\bmri?\b|\bmra\b|magnetic resonance|fluoresce|indocyanine|\bicga?\b|"
    r"\bocta?\b|optical coherence|fundus"
)

#: modality vocabulary of §A.1.4 (spelling fixed) with keyword patterns; first match wins, so order matters
MODALITIES: list[tuple[str, str]] = [
    ("PET/SPECT", r"\bpet\b|positron emission|\bspect\b|fdg|\bpet[/-]ct\b"),
    (  # explicit DSA / catheter wording, or an angiogram that names no other modality
        "DSA",
        r"\bdsa\b|digital[- ]subtraction|\bcatheter(?:[- ]based)? angiogra|"
        rf"^(?![\s\S]*(?:{_NOT_CATHETER_ANGIO}))[\s\S]*angiogra",
    ),
    ("OCT", r"\bocta?\b|optical coherence tomograph"),
    ("CT", r"\bct\b|\bcta\b|\bhrct\b|computed tomograph|\bcbct\b|\bmdct\b|hounsfield"),
    (
        "MR",
        r"\bmri?\b|\bmra\b|magnetic resonance|t1[- ]?weighted|t2[- ]?weighted|\bflair\b|\bdwi\b|diffusion[- ]weighted|\badc map",
    ),
    (
        "Ultrasound",
        r"ultrasound|ultrasonograph|sonograph|\bdoppler\b|echocardiogra|\bultrasonic\b|\bus image",
    ),
    ("Radioisotope", r"scintigra|bone scan|radionuclide|\bmibg\b|technetium|\b99m\s*tc"),
    ("X-ray", r"x-?ray|radiograph|\bcxr\b|mammogra|fluoroscop|\bkub\b|panoramic radiograph"),
    ("Colonoscopy", r"colonoscop|endoscop|gastroscop|bronchoscop|cystoscop|laparoscop"),
    ("Dermatology", r"dermoscop|dermatoscop|skin lesion|cutaneous lesion"),
    ("EM", r"electron micro(?:scop|graph)|\btem\b|\bsem\b|ultrastructur"),
    ("Mitotic", r"mitotic figure|\bmitos[ie]s\b"),
    (
        "Pathology",
        r"\bh\s*&\s*e\b|\bhe stain|hematoxylin|haematoxylin|eosin|immunohistochem|\bihc\b|histolog|"
        r"histopatholog|biopsy|cytolog|stained|staining|magnification|micrograph|\bx\s?\d{2,3}\b|\d{2,3}\s?x\b",
    ),
    ("gross pathology", r"gross (?:specimen|appearance|pathology)|resected specimen|macroscopic|cut surface"),
    ("Optical Image", r"fluoresce|indocyanine|\bicga\b|confocal|fundus|slit[- ]lamp|microscop"),
    ("Electrophoresis", r"western blot|immunoblot|electrophores|\bgel\b|\bpcr\b product"),
    ("Camera", r"photograph|clinical photo|intraoperative|intra-operative|clinical appearance"),
    (
        "Simulated illustration",
        r"schematic|illustration|diagram|cartoon|flow ?chart|drawing|graph|plot|"
        r"\bbar chart|histogram|kaplan|\bcurve\b",
    ),
]

#: body-part vocabulary of §A.1.4 with keyword patterns; first match wins. Every keyword starts at a word start
#: (with the usual prefixes spelled out), so "incidental" is not dental, "outer" not uterine, "correct" not rectal
BODY_PARTS: list[tuple[str, str]] = [
    (
        "Head & neck",
        r"\bbrain|\b(?:intra)?cerebr|\b(?:intra)?cranial|\bskull|\bhead\b|\bneck\b|\bthyroid|\borbit|"
        r"\bsinus(?:es|itis)?\b|\bparanasal|\bpituitar|\bcerebell|\bretina|\beyes?\b|\b(?:intra)?ocular|\bears?\b|"
        r"\blaryn[gx]|\bpharyn|\bjaws?\b|\bmandib|\bmaxill|\bdental|\btooth|\bteeth",
    ),
    (
        "Thorax",
        r"\bchest|\blungs?\b|\b(?:cardio)?pulmonar|\b(?:intra)?thora|\b(?:peri|endo|myo)?cardi(?:ac|al|um)\b|"
        r"\bheart|\bmediastin|\bpleura|\bbreasts?\b|\bcoronary|\baort(?:a|ic) arch|\bbronch|\btrache|\besophag|"
        r"\boesophag|\bribs?\b",
    ),
    (
        "Abdomen",
        r"\babdom|\bliver|\b(?:intra|peri)?hepat|\bkidneys?\b|\b(?:ad)?renal\b|\bpancrea|\bbowel|\bcolon(?:ic)?\b|"
        r"\bcolorectal|\brect(?:um|al)\b|\bstomach|\bgastr(?!ocnem)|\bspleen|\bsplen|\bgallbladder|\bbiliar|"
        r"\bpelvi|\bbladder|\buter(?:us|ine)\b|\bovar|\bprostat|\bperiton|\bappendi",
    ),
    (
        "Upper",
        r"\bshoulder|\bhumer|\belbow|\bforearm|\bwrist|\bhands?\b|\bfinger|\bradius\b|\bulna|\bclavic|\bscapul",
    ),
    (
        "Lower",
        r"\bhips?\b|\bfemur|\bfemoral|\bknee|\btibia|\bfibula|\bankle|\bfoot\b|\bfeet\b|\btoes?\b|\bcalcane|\bpatell|\bthighs?\b|\bcal(?:f|ves)\b|\blegs?\b",
    ),
    (
        "Extremity",
        r"\bextremit|\blimbs?\b|\bbones?\b|\bjoints?\b|\b(?:musculo)?skelet|\bspine|\bspinal\b|\bvertebr|\blumbar|"
        r"\bcervical spine|\bsoft tissue",
    ),
]

_DISEASE_TERMS = (
    "adenocarcinoma",
    "carcinoma",
    "cancer",
    "tumor",
    "tumour",
    "neoplasm",
    "lymphoma",
    "leukemia",
    "sarcoma",
    "melanoma",
    "glioma",
    "glioblastoma",
    "meningioma",
    "metastasis",
    "metastases",
    "adenoma",
    "cyst",
    "abscess",
    "pneumonia",
    "tuberculosis",
    "fibrosis",
    "emphysema",
    "effusion",
    "pneumothorax",
    "edema",
    "oedema",
    "hemorrhage",
    "haemorrhage",
    "hematoma",
    "infarct",
    "infarction",
    "ischemia",
    "stroke",
    "aneurysm",
    "thrombosis",
    "embolism",
    "stenosis",
    "occlusion",
    "dissection",
    "fracture",
    "dislocation",
    "arthritis",
    "osteomyelitis",
    "necrosis",
    "inflammation",
    "infection",
    "cirrhosis",
    "hepatitis",
    "steatosis",
    "colitis",
    "appendicitis",
    "cholecystitis",
    "pancreatitis",
    "obstruction",
    "hernia",
    "hydronephrosis",
    "calculus",
    "stone",
    "nodule",
    "mass",
    "lesion",
    "malformation",
    "dysplasia",
    "hyperplasia",
    "atrophy",
    "calcification",
    "covid-19",
    "sclerosis",
    "cardiomegaly",
    "atelectasis",
    "consolidation",
    "hemangioma",
    "haemangioma",
    "cholangiocarcinoma",
    "osteoma",
    "osteosarcoma",
    "lipoma",
    "fibroma",
    "myeloma",
    "granuloma",
    "sarcoidosis",
    "bronchiectasis",
    "pneumatosis",
    "diverticulitis",
    "endometriosis",
)
_DISEASE_RE = re.compile(
    r"\b(" + "|".join(sorted(map(re.escape, _DISEASE_TERMS), key=len, reverse=True)) + r")\b", re.I
)
_ANATOMY_RE = re.compile("|".join(p for _, p in BODY_PARTS), re.I)


@dataclass
class CaptionClass:
    """The three axes of §A.1.4. ``diseases`` is empty when the caption names none ("other")."""

    modality: str = "Other"
    body_part: str = "Other"
    diseases: list[str] = field(default_factory=list)

    def as_labels(self) -> dict[str, Any]:
        return {"modality": self.modality, "body_part": self.body_part, "diseases": list(self.diseases)}


class KeywordClassifier:
    """Rule-based caption classifier. Pass your own ``modalities`` / ``body_parts`` rule lists to extend it."""

    def __init__(
        self,
        modalities: Sequence[tuple[str, str]] = tuple(MODALITIES),
        body_parts: Sequence[tuple[str, str]] = tuple(BODY_PARTS),
        max_diseases: int = 3,
    ) -> None:
        self.modalities = [(name, re.compile(p, re.I)) for name, p in modalities]
        self.body_parts = [(name, re.compile(p, re.I)) for name, p in body_parts]
        self.max_diseases = max_diseases

    @staticmethod
    def _first(rules: list[tuple[str, re.Pattern[str]]], text: str) -> str:
        return next((name for name, rx in rules if rx.search(text)), "Other")

    def __call__(self, text: str) -> CaptionClass:
        diseases: list[str] = []
        for m in _DISEASE_RE.finditer(text):
            term = m.group(1).lower()
            if term not in diseases:
                diseases.append(term)
        return CaptionClass(
            modality=self._first(self.modalities, text),
            body_part=self._first(self.body_parts, text),
            diseases=diseases[: self.max_diseases],
        )


_NON_IMAGE = {"Simulated illustration", "Electrophoresis"}


def medical_domain(text: str, classifier: Callable[[str], CaptionClass] | None = None) -> tuple[bool, str]:
    """Default medical-domain check: ``(keep, reason)``.

    Kept when the text names a medical image modality, or names anatomy together with a disease term. Dropped
    when it names none of these, or only a non-image figure type (plot, diagram, blot) without anatomy.
    """
    cls = (classifier or _DEFAULT)(text)
    if cls.modality != "Other" and cls.modality not in _NON_IMAGE:
        return True, f"modality {cls.modality}"
    has_anatomy = bool(_ANATOMY_RE.search(text))
    if has_anatomy and cls.diseases and cls.modality not in _NON_IMAGE:
        return True, f"anatomy + disease ({', '.join(cls.diseases)})"
    if cls.modality in _NON_IMAGE:
        return False, f"looks like a non-image figure ({cls.modality}) with no imaging modality named"
    return False, "names no imaging modality and no anatomy with a disease term"


_DEFAULT = KeywordClassifier()


def load_callable(spec: str | Callable[..., Any]) -> Callable[..., Any]:
    """Resolve ``"package.module:function"`` (or a callable, returned as is)."""
    if callable(spec):
        return spec
    module, sep, attr = str(spec).partition(":")
    if not sep or not module or not attr:
        raise ValueError(f"expected 'package.module:function', got {spec!r}")
    try:
        target = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"cannot load {spec!r}: {exc}") from exc
    if not callable(target):
        raise ValueError(f"{spec!r} is not callable")
    return target
