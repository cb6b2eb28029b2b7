"""Conversation tokenisation with exact target masking, shared by training and inference.

A chat template renders a conversation as ``Segment`` s; the text between ``<image>`` markers is tokenised as
a whole (no special tokens added; as upstream LLaVA does), each marker becomes one ``IMAGE_TOKEN_INDEX``
sentinel (the model expands a sentinel into its image tokens later), and the labels are the ids of the tokens
that cover characters of the segments that train (assistant replies and their end token), ``IGNORE_INDEX``
everywhere else. A conversation whose masking cannot be computed
raises ``MaskingError`` with the reason: training reports and skips such a sample, it never masks it
silently or replaces it by another one.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cambrian_core.model.template import IMAGE_TOKEN, ChatTemplate, Message

__all__ = [
    "IGNORE_INDEX",
    "IMAGE_TOKEN_INDEX",
    "MaskingError",
    "TokenizedConversation",
    "check_conversation",
    "count_images",
    "llava_image_paths",
    "messages_from_llava",
    "to_messages",
    "tokenize_conversation",
    "tokenizer_adds_bos",
]

#: input id standing for one image (expanded into its image tokens by the model)
IMAGE_TOKEN_INDEX = -200
#: label of a token that carries no loss
IGNORE_INDEX = -100

_LLAVA_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}
_NO_IMAGE = ("", "none", "nan")


class MaskingError(ValueError):
    """The target mask of a conversation cannot be computed; the message says why (training skips it)."""


@dataclass(frozen=True)
class TokenizedConversation:
    """Token ids (``IMAGE_TOKEN_INDEX`` per image), labels (``IGNORE_INDEX`` where no loss) and image count."""

    input_ids: list[int]
    labels: list[int]
    num_images: int

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_trainable(self) -> int:
        """How many tokens carry loss."""
        return sum(label != IGNORE_INDEX for label in self.labels)


def count_images(text: str) -> int:
    """Number of ``<image>`` markers in ``text``."""
    return text.count(IMAGE_TOKEN)


def to_messages(messages: Sequence[Message | Mapping[str, Any]]) -> list[Message]:
    """Accept ``Message`` s or ``{"role", "content"}`` dicts (OpenAI style); return ``Message`` s."""
    out = []
    for i, m in enumerate(messages):
        if isinstance(m, Message):
            out.append(m)
            continue
        if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
            raise MaskingError(f"turn {i} must be a Message or a dict with `role` and `content`, got {m!r}")
        if not isinstance(m["content"], str):
            raise MaskingError(f"turn {i} content must be a string, got {type(m['content']).__name__}")
        out.append(Message(role=m["role"], content=m["content"]))
    return out


def check_conversation(messages: Sequence[Message], add_generation_prompt: bool = False) -> None:
    """Raise ``MaskingError`` unless ``messages`` is [system] user, assistant, user, ... in that order.

    Training conversations (``add_generation_prompt=False``) must end with an assistant turn; prompts for
    generation must end with a user turn. Images may only appear in user turns.
    """
    if not messages:
        raise MaskingError("empty conversation")
    start = 0
    for i, m in enumerate(messages):
        if m.role not in ("system", "user", "assistant"):
            raise MaskingError(f"turn {i} has role {m.role!r}; roles are 'system', 'user' and 'assistant'")
        if m.role == "system":
            if i != 0:
                raise MaskingError(f"turn {i} is a system turn; only the first turn may be one")
            start = 1
        elif m.role == "assistant" and not m.content.strip():
            raise MaskingError(f"turn {i} is an empty assistant reply")
        if IMAGE_TOKEN in m.content and m.role != "user":
            raise MaskingError(
                f"turn {i} ({m.role}) contains {IMAGE_TOKEN}; images may only appear in user turns"
            )
    turns = messages[start:]
    if not turns:
        raise MaskingError("the conversation has only a system turn")
    for k, m in enumerate(turns):
        expected = "user" if k % 2 == 0 else "assistant"
        if m.role != expected:
            what = "the first turn after the system prompt" if k == 0 and start else f"turn {k + start}"
            raise MaskingError(
                f"{what} is {m.role!r} but {expected!r} was expected: roles must alternate user/assistant, "
                "starting with user"
            )
    if add_generation_prompt:
        if turns[-1].role != "user":
            raise MaskingError("a prompt for generation must end with a user turn")
    elif turns[-1].role != "assistant":
        if len(turns) == 1:
            raise MaskingError("no assistant turn: a training conversation needs at least one reply to learn")
        raise MaskingError("the conversation ends with a user turn that has no assistant reply")


def tokenizer_adds_bos(tokenizer: Any) -> bool:
    """Whether ``tokenizer`` puts its BOS token in front of the text when asked for special tokens."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    return len(with_special) > len(plain) and with_special[0] == bos


def tokenize_conversation(
    tokenizer: Any,
    template: ChatTemplate,
    messages: Sequence[Message | Mapping[str, Any]],
    add_generation_prompt: bool = False,
    max_length: int | None = None,
    num_images: int | None = None,
    image_seq_len: int = 1,
) -> TokenizedConversation:
    """Render ``messages`` with ``template`` and tokenise it with exact target masking.

    Args:
        tokenizer: the LLM's Hugging Face tokenizer.
        template: the chat template (its ``add_bos`` says whether BOS is added here).
        messages: the conversation (``Message`` s or role/content dicts).
        add_generation_prompt: end with the assistant header (inference); no trainable token is required.
        max_length: truncate to this many positions, counting each image as ``image_seq_len``; an image
            is never cut (``MaskingError`` instead).
        num_images: the number of images that come with the sample; must equal the ``<image>`` count.
        image_seq_len: positions one image occupies once the model expands its sentinel.

    Raises:
        MaskingError: bad role order, no assistant turn, image-count mismatch, nothing left to train, or a
            truncation that would cut an image.
    """
    msgs = to_messages(messages)
    check_conversation(msgs, add_generation_prompt)
    given = sum(count_images(m.content) for m in msgs)
    if num_images is not None and given != num_images:
        raise MaskingError(
            f"the text has {given} {IMAGE_TOKEN} marker(s) but {num_images} image(s) came with it; put one "
            f"{IMAGE_TOKEN} where each image belongs"
        )
    try:
        segments = template.render(msgs, add_generation_prompt=add_generation_prompt)
    except MaskingError:
        raise
    except ValueError as exc:
        raise MaskingError(f"template `{template.name}` cannot render this conversation: {exc}") from exc

    # the text between image markers is tokenised as a whole (as upstream's ``tokenizer_image_token`` does):
    # segment by segment, a SentencePiece tokenizer would put a word-start marker at every segment start
    # (e.g. after each ``</s>``) that the whole text does not have. Labels follow the characters each token
    # covers: a token is trained when it covers a character of a trainable segment. Where one token would
    # cover both sides of a reply's start or end (e.g. a header's "\n" merged with a reply's leading spaces),
    # the text is cut there, so that a generation prompt stays a prefix of the training ids.
    chunks: list[tuple[str, list[tuple[int, int]]] | None] = [("", [])]  # None stands for an image
    for seg in segments:
        parts = seg.text.split(IMAGE_TOKEN)
        if len(parts) > 1 and seg.train:
            raise MaskingError(f"template `{template.name}` put {IMAGE_TOKEN} inside a trainable segment")
        for k, part in enumerate(parts):
            if k:
                chunks += [None, ("", [])]
            text, spans = chunks[-1]
            if part and seg.train:
                spans.append((len(text), len(text) + len(part)))
            chunks[-1] = (text + part, spans)
    texts = [c[0] for c in chunks if c is not None and c[0]]
    encoded = iter(_encode_with_offsets(tokenizer, texts))

    input_ids: list[int] = []
    labels: list[int] = []
    if template.add_bos and tokenizer_adds_bos(tokenizer):
        input_ids.append(int(tokenizer.bos_token_id))
        labels.append(IGNORE_INDEX)
    for chunk in chunks:
        if chunk is None:
            input_ids.append(IMAGE_TOKEN_INDEX)
            labels.append(IGNORE_INDEX)
            continue
        text, spans = chunk
        if not text:
            continue
        ids, chunk_labels = _label_chunk(tokenizer, text, spans, next(encoded))
        input_ids += ids
        labels += chunk_labels

    rendered_images = input_ids.count(IMAGE_TOKEN_INDEX)
    if rendered_images != given:
        raise MaskingError(
            f"template `{template.name}` rendered {rendered_images} image(s) for {given} {IMAGE_TOKEN} marker(s)"
        )
    if max_length is not None:
        input_ids, labels = _truncate(input_ids, labels, max_length, image_seq_len, add_generation_prompt)
    if not add_generation_prompt and all(label == IGNORE_INDEX for label in labels):
        raise MaskingError("no trainable token: every assistant reply is empty")
    return TokenizedConversation(input_ids=input_ids, labels=labels, num_images=given)


def _label_chunk(
    tokenizer: Any,
    text: str,
    spans: list[tuple[int, int]],
    encoded: tuple[list[int], list[tuple[int, int]]] | None = None,
) -> tuple[list[int], list[int]]:
    """Ids and labels of one image-free text whose characters ``spans`` train; cut where a token would cover
    both sides of a span's start or end, and each part tokenised on its own."""
    ids, offsets = encoded if encoded is not None else _encode_with_offsets(tokenizer, [text])[0]
    trains = bytearray(len(text) + 1)  # 1 where the character trains (one spare byte past the end)
    for a, b in spans:
        trains[a:b] = b"\x01" * (b - a)
    before = list(itertools.accumulate(trains, initial=0))  # trainable characters before each position
    labels, cuts = [], set()
    for t, (lo, hi) in zip(ids, offsets, strict=True):
        n = before[hi] - before[lo] if hi > lo else trains[lo]
        if 0 < n < hi - lo:  # the token straddles a reply's start or end: cut the text there
            cuts.update(p for p in range(lo + 1, hi) if trains[p] != trains[p - 1])
        labels.append(t if n else IGNORE_INDEX)
    if not cuts:
        return ids, labels
    out_ids: list[int] = []
    out_labels: list[int] = []
    for lo, hi in itertools.pairwise([0, *sorted(cuts), len(text)]):
        part = [(max(a, lo) - lo, min(b, hi) - lo) for a, b in spans if a < hi and b > lo]
        part_ids, part_labels = _label_chunk(tokenizer, text[lo:hi], part)
        out_ids += part_ids
        out_labels += part_labels
    return out_ids, out_labels


def _encode_with_offsets(tokenizer: Any, texts: list[str]) -> list[tuple[list[int], list[tuple[int, int]]]]:
    """Token ids and character offsets of each text (no special tokens added), in one batched call."""
    if not texts:
        return []
    try:
        out = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
        offsets = out["offset_mapping"]
    except (NotImplementedError, KeyError, TypeError, ValueError) as exc:
        raise MaskingError(
            f"the tokenizer {type(tokenizer).__name__} gives no character offsets ({exc}); cambrian needs a fast "
            "(Rust `tokenizers`) tokenizer to mask targets exactly"
        ) from None
    return [
        ([int(t) for t in ids], [(int(a), int(b)) for a, b in offs])
        for ids, offs in zip(out["input_ids"], offsets, strict=True)
    ]


def _truncate(
    ids: list[int], labels: list[int], max_length: int, image_seq_len: int, generation: bool
) -> tuple[list[int], list[int]]:
    """Cut to ``max_length`` expanded positions; never through an image."""
    if max_length <= 0:
        raise ValueError(f"max_length must be positive, got {max_length}")
    total, cut = 0, None
    for pos, t in enumerate(ids):
        total += image_seq_len if t == IMAGE_TOKEN_INDEX else 1
        if total > max_length:
            cut = pos
            break
    if cut is None:
        return ids, labels
    if generation:
        raise MaskingError(
            f"the prompt needs more than max_length={max_length} positions; shorten it or raise max_length"
        )
    if IMAGE_TOKEN_INDEX in ids[cut:]:
        k = ids[:cut].count(IMAGE_TOKEN_INDEX) + 1
        raise MaskingError(
            f"truncating to max_length={max_length} would cut image {k} (each image takes {image_seq_len} "
            "positions); raise max_length or shorten the conversation"
        )
    ids, labels = ids[:cut], labels[:cut]
    if all(label == IGNORE_INDEX for label in labels):
        raise MaskingError(
            f"no trainable token left after truncating to max_length={max_length}; raise max_length"
        )
    return ids, labels


def llava_image_paths(record: Mapping[str, Any]) -> list[str]:
    """Image paths of a LLaVA record (``image`` may be missing, a string, a list, or a 'none'-like value)."""
    image = record.get("image")
    if image is None:
        return []
    if isinstance(image, str):
        return [] if image.strip().lower() in _NO_IMAGE else [image]
    if isinstance(image, (list, tuple)):
        return [str(p) for p in image]
    raise MaskingError(f"`image` must be a path or a list of paths, got {type(image).__name__}")


def messages_from_llava(record: Mapping[str, Any]) -> list[Message]:
    """Convert a LLaVA record (``conversations`` of ``{"from": "human"|"gpt", "value": ...}``) to messages.

    The first turn must be human (after an optional system turn) and roles must alternate; the number of
    ``<image>`` markers must equal the number of images in ``record["image"]``. Otherwise ``MaskingError``.
    """
    conv = record.get("conversations")
    if not isinstance(conv, Sequence) or isinstance(conv, str) or not conv:
        raise MaskingError("the record has no `conversations` list")
    msgs = []
    for i, turn in enumerate(conv):
        if not isinstance(turn, Mapping) or "from" not in turn or "value" not in turn:
            raise MaskingError(f"conversations[{i}] needs `from` and `value` keys, got {turn!r}")
        role = _LLAVA_ROLES.get(str(turn["from"]).lower())
        if role is None:
            raise MaskingError(
                f"conversations[{i}] has from={turn['from']!r}; expected 'human' or 'gpt' (or 'system' first)"
            )
        if not isinstance(turn["value"], str):
            raise MaskingError(
                f"conversations[{i}].value must be a string, got {type(turn['value']).__name__}"
            )
        msgs.append(Message(role=role, content=turn["value"]))
    first = 1 if msgs[0].role == "system" else 0
    if len(msgs) > first and msgs[first].role != "user":
        raise MaskingError(
            f"conversations[{first}] is from {conv[first]['from']!r}; the first turn must be human"
        )
    check_conversation(msgs)
    markers = sum(count_images(m.content) for m in msgs)
    paths = llava_image_paths(record)
    if markers != len(paths):
        raise MaskingError(
            f"the conversation has {markers} {IMAGE_TOKEN} marker(s) but the record lists {len(paths)} image(s)"
        )
    return msgs
