"""Versioned LLM prompt templates, one file per dataset and version: ``<name>.v<N>.txt``.

A template file is a few ``# key: value`` header lines, then a ``[system]`` section and a ``[user]`` section. Header
keys: ``output`` (``qa``, ``caption`` or ``caption_qa``: which JSON the model must return) and ``pairs`` (``N`` or
``MIN-MAX``: how many question/answer pairs). The user section may use the placeholders ``{context}`` (the case's
text and labels), ``{references}`` (retrieved passages, possibly empty), ``{n_images}``, ``{min_pairs}`` and
``{max_pairs}``. The template name and version go into every record's provenance, so a sample can always be traced
to the exact wording that produced it.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass
from importlib import resources

__all__ = ["OUTPUT_KINDS", "PromptError", "PromptTemplate", "available_prompts", "load_prompt"]

#: what a template may ask the model to return
OUTPUT_KINDS = ("qa", "caption", "caption_qa")
_PLACEHOLDERS = {"context", "references", "n_images", "min_pairs", "max_pairs"}
_FILE_RE = re.compile(r"^(?P<name>[a-z0-9_]+)\.v(?P<version>\d+)\.txt$")


class PromptError(ValueError):
    """A prompt template is missing or malformed."""


@dataclass(frozen=True)
class PromptTemplate:
    """One parsed prompt template."""

    name: str
    version: str  # "v1", "v2", ...
    output: str
    min_pairs: int
    max_pairs: int
    system: str
    user: str

    @property
    def tag(self) -> str:
        """``<name>.<version>``, the value recorded in provenance."""
        return f"{self.name}.{self.version}"

    def render(self, context: str, references: str = "", n_images: int = 1) -> str:
        """The user message text for one case."""
        return self.user.format(
            context=context.strip(),
            references=references.strip(),
            n_images=n_images,
            min_pairs=self.min_pairs,
            max_pairs=self.max_pairs,
        ).strip()


def _files() -> dict[str, dict[int, str]]:
    out: dict[str, dict[int, str]] = {}
    for entry in resources.files(__name__).iterdir():
        m = _FILE_RE.match(entry.name)
        if m:
            out.setdefault(m["name"], {})[int(m["version"])] = entry.name
    return out


def available_prompts() -> dict[str, list[str]]:
    """``{name: ["v1", ...]}`` for every shipped template."""
    return {name: [f"v{v}" for v in sorted(vs)] for name, vs in sorted(_files().items())}


def _parse_pairs(value: str, where: str) -> tuple[int, int]:
    m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", value)
    if not m:
        raise PromptError(f"{where}: `# pairs:` must be `N` or `MIN-MAX`, got {value!r}")
    lo, hi = int(m[1]), int(m[2] or m[1])
    if not 1 <= lo <= hi:
        raise PromptError(f"{where}: `# pairs:` needs 1 <= MIN <= MAX, got {value!r}")
    return lo, hi


def parse_prompt(text: str, name: str, version: str) -> PromptTemplate:
    """Parse template ``text`` (see the module docstring for the format)."""
    where = f"prompt {name}.{version}"
    header: dict[str, str] = {}
    sections: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        sec = re.fullmatch(r"\[(system|user)\]\s*", line)
        if sec:
            current = sections.setdefault(sec[1], [])
        elif current is not None:
            current.append(line)
        elif line.startswith("#") and ":" in line:
            key, _, value = line[1:].partition(":")
            header[key.strip()] = value.strip()
        elif line.strip():
            raise PromptError(f"{where}: unexpected text before the [system]/[user] sections: {line!r}")
    output = header.get("output", "qa")
    if output not in OUTPUT_KINDS:
        raise PromptError(f"{where}: `# output:` must be one of {', '.join(OUTPUT_KINDS)}, got {output!r}")
    if "user" not in sections:
        raise PromptError(f"{where}: no [user] section")
    lo, hi = _parse_pairs(header.get("pairs", "1"), where)
    user = "\n".join(sections["user"]).strip()
    used = {f for _, f, _, _ in string.Formatter().parse(user) if f is not None}
    unknown = used - _PLACEHOLDERS
    if unknown:
        raise PromptError(
            f"{where}: unknown placeholder(s) {sorted(unknown)}; allowed: {sorted(_PLACEHOLDERS)}"
        )
    return PromptTemplate(name, version, output, lo, hi, "\n".join(sections.get("system", [])).strip(), user)


def load_prompt(name: str, version: str | None = None) -> PromptTemplate:
    """Load template ``name`` at ``version`` (``"v1"``, ``"1"``; default: the newest)."""
    files = _files()
    if name not in files:
        raise PromptError(f"No prompt template named {name!r}; shipped templates: {', '.join(sorted(files))}")
    versions = files[name]
    if version is None:
        number = max(versions)
    else:
        digits = str(version).lstrip("v")
        if not digits.isdigit() or int(digits) not in versions:
            have = ", ".join(f"v{v}" for v in sorted(versions))
            raise PromptError(f"Prompt {name!r} has no version {version!r}; available: {have}")
        number = int(digits)
    text = resources.files(__name__).joinpath(versions[number]).read_text(encoding="utf-8")
    return parse_prompt(text, name, f"v{number}")
