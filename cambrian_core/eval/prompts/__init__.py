"""Versioned prompts of the evaluation: how a question is put to the model, and the judge's rubric.

A prompt's tag (``short.v1``, ``judge.v1``) is written into every results file, so a number can always be traced
to the exact wording that produced it. A new wording gets a new version; old versions stay.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources

from cambrian_core.eval.items import VQAItem

__all__ = ["QUESTION_PROMPTS", "JudgePrompt", "load_judge_prompt", "question_prompt", "resolve_style"]

#: style -> version -> {"open": template, "choice": template} per language; ``{question}`` and ``{options}``
QUESTION_PROMPTS: dict[str, dict[str, dict[str, dict[str, str]]]] = {
    "short": {
        "v1": {
            "en": {
                "open": "{question}\nAnswer with one word or a short phrase.",
                "choice": "{question}\n{options}\nAnswer with the letter of the correct option only.",
            },
            "zh": {
                "open": "{question}\n请用一个词或一个短语回答。",
                "choice": "{question}\n{options}\n只回答正确选项的字母。",
            },
        }
    },
    "plain": {
        "v1": {
            "en": {"open": "{question}", "choice": "{question}\n{options}"},
            "zh": {"open": "{question}", "choice": "{question}\n{options}"},
        }
    },
}


def resolve_style(style: str) -> tuple[str, str]:
    """``"short"`` -> ``("short", newest version)``; ``"short.v1"`` -> ``("short", "v1")``."""
    name, _, version = style.partition(".")
    if name not in QUESTION_PROMPTS:
        raise ValueError(f"unknown prompt style {style!r}; styles: {', '.join(QUESTION_PROMPTS)}")
    versions = QUESTION_PROMPTS[name]
    if not version:
        version = max(versions, key=lambda v: int(v.lstrip("v")))
    if version not in versions:
        raise ValueError(f"prompt style {name!r} has no version {version!r}; versions: {', '.join(versions)}")
    return name, version


def question_prompt(item: VQAItem, style: str = "short") -> str:
    """The user message for ``item`` (without image markers; the engine adds one per image)."""
    name, version = resolve_style(style)
    table = QUESTION_PROMPTS[name][version]
    lang = table.get(item.lang, table["en"])
    if item.choices is not None:
        options = "\n".join(f"{k}: {v}" for k, v in item.choices)
        return lang["choice"].replace("{question}", item.question).replace("{options}", options)
    return lang["open"].replace("{question}", item.question)


@dataclass(frozen=True)
class JudgePrompt:
    """The judge's system and user texts; ``{question}``, ``{reference}`` and ``{answer}`` are filled in."""

    name: str
    version: str
    system: str
    user: str

    @property
    def tag(self) -> str:
        return f"{self.name}.{self.version}"

    def render(self, question: str, reference: str, answer: str) -> str:
        # plain replacement: the template's JSON example keeps its braces
        return (
            self.user.replace("{question}", question.strip())
            .replace("{reference}", reference.strip())
            .replace("{answer}", answer.strip() or "(empty answer)")
        )


_FILE = re.compile(r"^(?P<name>[a-z0-9_]+)\.v(?P<version>\d+)\.txt$")


def load_judge_prompt(version: str | None = None, name: str = "judge") -> JudgePrompt:
    """The judge prompt ``name`` at ``version`` (``"v1"`` or ``"1"``; default: the newest shipped)."""
    files = {
        int(m["version"]): entry.name
        for entry in resources.files(__name__).iterdir()
        if (m := _FILE.match(entry.name)) and m["name"] == name
    }
    if not files:
        raise ValueError(f"no prompt named {name!r} is shipped in {__name__}")
    number = max(files) if version is None else int(str(version).lstrip("v") or -1)
    if number not in files:
        raise ValueError(
            f"prompt {name!r} has no version {version!r}; versions: {', '.join(f'v{v}' for v in sorted(files))}"
        )
    text = resources.files(__name__).joinpath(files[number]).read_text(encoding="utf-8")
    sections: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        head = re.fullmatch(r"\[(system|user)\]\s*", line)
        if head:
            current = sections.setdefault(head[1], [])
        elif current is not None:
            current.append(line)
    if "user" not in sections:
        raise ValueError(f"prompt {name}.v{number} has no [user] section")
    return JudgePrompt(
        name, f"v{number}", "\n".join(sections.get("system", [])).strip(), "\n".join(sections["user"]).strip()
    )
