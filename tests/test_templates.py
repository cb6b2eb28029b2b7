"""Chat templates and conversation tokenisation: golden masking tables, Cambrian-1 compatibility, hf_chat
segments, masking errors and image-safe truncation."""

from __future__ import annotations

import pickle

import pytest
from cambrian_plugins.llms._tiny_tokenizer import tiny_tokenizer
from cambrian_plugins.llms.hermes_yi import HermesYiLM
from cambrian_plugins.llms.llama3 import Llama3LM
from cambrian_plugins.llms.smollm2 import SmolLM2
from cambrian_plugins.llms.templates import CAMBRIAN_SYSTEM, CAMBRIAN_SYSTEM_LLAMA3, VICUNA_SYSTEM
from cambrian_plugins.llms.vicuna import VicunaLM

from cambrian_core.model.template import Message
from cambrian_core.model.tokenize import (
    IGNORE_INDEX,
    IMAGE_TOKEN_INDEX,
    MaskingError,
    llava_image_paths,
    messages_from_llava,
    tokenize_conversation,
    tokenizer_adds_bos,
)
from cambrian_core.registry import TEMPLATES, accepted_kwargs, build

U1 = "<image>\nWhat does the chest X-ray show?"
A1 = "No acute abnormality."
U2 = "Is the heart enlarged?"
A2 = "No, the heart size is normal."
CONV = [Message("user", U1), Message("assistant", A1), Message("user", U2), Message("assistant", A2)]

SH, EH = "<|start_header_id|>", "<|end_header_id|>"


@pytest.fixture(scope="module")
def toks():
    """Each family's tiny tokenizer: llama3 and vicuna add BOS, hermes_yi does not. The golden tables decode
    runs of tokens exactly, so vicuna's is byte-level here; its SentencePiece-style tokenizer (spaces merged
    into the next word) is checked in ``test_sentencepiece_conversations_tokenise_as_the_whole_text``."""
    return {
        "llama3": Llama3LM.tiny_tokenizer(),
        "vicuna": tiny_tokenizer(["<unk>", "<s>", "</s>"], bos="<s>", eos="</s>", unk="<unk>", add_bos=True),
        "hermes_yi": HermesYiLM.tiny_tokenizer(),
        "smollm2": SmolLM2.tiny_tokenizer(),
    }


def template(name, **kw):
    return build(TEMPLATES, {"type": name, **kw})


def runs(tokenizer, tc):
    """The tokenised conversation as (decoded text, trains) runs; an image sentinel reads ``<image>``."""
    out: list[list] = []
    chunk: list[int] = []
    flag = None

    def flush():
        if chunk:
            out[-1][0] += tokenizer.decode(chunk)
            chunk.clear()

    for tid, label in zip(tc.input_ids, tc.labels, strict=True):
        train = label != IGNORE_INDEX
        if train:
            assert label == tid, "a trainable label must be its input id"
        if train != flag:
            flush()
            out.append(["", train])
            flag = train
        if tid == IMAGE_TOKEN_INDEX:
            flush()
            out[-1][0] += "<image>"
        else:
            chunk.append(tid)
    flush()
    return [tuple(r) for r in out]


# ------------------------------------------------------------------------------------------ golden tables
GOLDEN = {
    ("llama_3", False): (
        "llama3",
        [
            (f"<|begin_of_text|>{SH}user{EH}\n\n{U1}<|eot_id|>{SH}assistant{EH}\n\n", False),
            (f"{A1}<|eot_id|>", True),
            (f"{SH}user{EH}\n\n{U2}<|eot_id|>{SH}assistant{EH}\n\n", False),
            (f"{A2}<|eot_id|>", True),
        ],
    ),
    ("llama_3", True): (
        "llama3",
        [
            (
                f"<|begin_of_text|><|begin_of_text|>{SH}system{EH}{CAMBRIAN_SYSTEM_LLAMA3}<|eot_id|>"
                f"{SH}user{EH}{U1}<|eot_id|>{SH}assistant{EH}",
                False,
            ),
            (f"{A1}<|eot_id|>", True),
            (f"{SH}user{EH}{U2}<|eot_id|>{SH}assistant{EH}", False),
            (f"{A2}<|eot_id|>", True),
        ],
    ),
    ("vicuna_v1", False): (
        "vicuna",
        [
            (f"<s>{VICUNA_SYSTEM} USER: {U1} ASSISTANT:", False),
            (f" {A1}</s>", True),
            (f"USER: {U2} ASSISTANT:", False),
            (f" {A2}</s>", True),
        ],
    ),
    ("chatml_direct", False): (
        "hermes_yi",
        [
            (f"<|im_start|>user\n{U1}<|im_end|>\n<|im_start|>assistant\n", False),
            (f"{A1}<|im_end|>", True),
            (f"\n<|im_start|>user\n{U2}<|im_end|>\n<|im_start|>assistant\n", False),
            (f"{A2}<|im_end|>", True),
            ("\n", False),
        ],
    ),
    ("chatml_direct", True): (
        "hermes_yi",
        [
            (
                f"<|im_start|>system\n{CAMBRIAN_SYSTEM}<|im_end|><|im_start|>user\n{U1}<|im_end|>"
                "<|im_start|>assistant\n",
                False,
            ),
            (f"{A1}<|im_end|>", True),
            (f"<|im_start|>user\n{U2}<|im_end|><|im_start|>assistant\n", False),
            (f"{A2}<|im_end|>", True),
        ],
    ),
}


@pytest.mark.parametrize(("name", "compat"), list(GOLDEN), ids=[f"{n}-compat{c}" for n, c in GOLDEN])
def test_golden_masking_tables(toks, name, compat):
    family, expected = GOLDEN[(name, compat)]
    tok = toks[family]
    tc = tokenize_conversation(tok, template(name, cambrian1_compat=compat), CONV, num_images=1)
    assert runs(tok, tc) == expected
    assert tc.num_images == 1 and tc.input_ids.count(IMAGE_TOKEN_INDEX) == 1
    assert len(tc.input_ids) == len(tc.labels)


def test_plain_golden_table(toks):
    tok = toks["vicuna"]
    conv = [
        Message("user", "<image>\nDescribe the image briefly."),
        Message("assistant", "Chest X-ray, PA view."),
    ]
    tc = tokenize_conversation(tok, template("plain"), conv)
    # the user's words are dropped: image, then caption + "\n" (trains); BOS from the tokenizer
    assert runs(tok, tc) == [("<s><image>", False), ("Chest X-ray, PA view.\n", True)]
    assert tc.input_ids[:2] == [tok.bos_token_id, IMAGE_TOKEN_INDEX]
    gen = tokenize_conversation(tok, template("plain"), conv[:1], add_generation_prompt=True)
    assert gen.input_ids == [tok.bos_token_id, IMAGE_TOKEN_INDEX]
    with pytest.raises(MaskingError, match="one image-caption pair"):
        tokenize_conversation(tok, template("plain"), CONV)


def test_llama3_bos_once_and_compat_twice(toks):
    tok = toks["llama3"]
    assert tokenizer_adds_bos(tok)
    bos = tok.bos_token_id
    official = tokenize_conversation(tok, template("llama_3"), CONV)
    compat = tokenize_conversation(tok, template("llama_3", cambrian1_compat=True), CONV)
    assert official.input_ids[0] == bos and official.input_ids.count(bos) == 1
    assert compat.input_ids[:2] == [bos, bos] and compat.input_ids.count(bos) == 2
    # compat with an empty system prompt: upstream writes no <|begin_of_text|>, so BOS appears once
    bare = tokenize_conversation(tok, template("llama_3", cambrian1_compat=True, system=""), CONV)
    assert bare.input_ids.count(bos) == 1
    official_text = template("llama_3").render_text(CONV)
    compat_text = template("llama_3", cambrian1_compat=True, system="").render_text(CONV)
    assert f"{EH}\n\n" in official_text and f"{EH}\n" not in compat_text


def test_compat_moves_images_to_message_start(toks):
    conv = [Message("user", "What does the chest X-ray show? <image>"), Message("assistant", A1)]
    for name in ("llama_3", "vicuna_v1", "chatml_direct"):
        assert "show? <image>" in template(name).render_text(conv)  # the image stays where the user put it
        assert "<image>\nWhat does the chest X-ray show?" in template(
            name, cambrian1_compat=True
        ).render_text(conv)


def test_system_message_overrides_default(toks):
    conv = [Message("system", "You are a radiologist."), *CONV]
    text = template("vicuna_v1").render_text(conv)
    assert text.startswith("You are a radiologist. USER: ") and VICUNA_SYSTEM not in text
    text = template("llama_3").render_text(conv)
    assert text.startswith(f"<|begin_of_text|>{SH}system{EH}\n\nYou are a radiologist.<|eot_id|>")


@pytest.mark.parametrize("name", ["llama_3", "vicuna_v1", "chatml_direct"])
@pytest.mark.parametrize("compat", [False, True])
def test_generation_prompt_is_the_training_prefix(toks, name, compat):
    """Inference sees exactly the tokens training saw before each reply."""
    family = {"llama_3": "llama3", "vicuna_v1": "vicuna", "chatml_direct": "hermes_yi"}[name]
    tok, tmpl = toks[family], template(name, cambrian1_compat=compat)
    train = tokenize_conversation(tok, tmpl, CONV)
    for k in (1, 3):
        prompt = tokenize_conversation(tok, tmpl, CONV[:k], add_generation_prompt=True)
        assert train.input_ids[: len(prompt)] == prompt.input_ids
        assert prompt.labels == train.labels[: len(prompt)]
        assert train.labels[len(prompt)] != IGNORE_INDEX  # the reply starts right after the prompt


@pytest.mark.parametrize("name", TEMPLATES.names())
def test_every_template_contract(toks, name):
    """Registry-driven: replies train, images never do, the template survives pickling (DataLoader workers)."""
    target = TEMPLATES.get(name)
    kw = {"tokenizer": toks["smollm2"]} if "tokenizer" in accepted_kwargs(target)[0] else {}
    tmpl = template(name, **kw)
    conv = CONV[:2]
    segments = tmpl.render(conv)
    assert "".join(s.text for s in segments) == tmpl.render_text(conv)
    trained = "".join(s.text for s in segments if s.train)
    assert A1 in trained and "<image>" not in trained and U1 not in trained
    assert tmpl.stop_strings and trained.endswith(tmpl.stop_strings[0])  # the reply's end token trains
    clone = pickle.loads(pickle.dumps(tmpl))
    assert clone.render(conv) == segments


def test_stop_strings():
    assert template("llama_3").stop_strings == ["<|eot_id|>"]
    assert template("vicuna_v1").stop_strings == ["</s>"]
    assert template("chatml_direct").stop_strings == ["<|im_end|>"]
    assert template("plain").stop_strings == ["\n"]


# ------------------------------------------------------------------------------------------ hf_chat
LLAMA3_JINJA = (
    "{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' "
    "+ m['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
MISTRAL_JINJA = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
    "{% else %}{{ ' ' + m['content'] + eos_token }}{% endif %}{% endfor %}"
)


def test_hf_chat_equals_chatml_for_smollm2_template(toks):
    tok = toks["smollm2"]
    hf = template("hf_chat", tokenizer=tok)
    chatml = template(
        "chatml_direct", system="You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    )
    for conv, gen in ((CONV, False), (CONV[:3], True), (CONV[:1], True)):
        assert hf.render(conv, gen) == chatml.render(conv, gen)
    assert hf.end_marker == "<|im_end|>" and hf.stop_strings == ["<|im_end|>"]
    tc = tokenize_conversation(tok, hf, CONV)
    assert [t for t, train in runs(tok, tc) if train] == [f"{A1}<|im_end|>", f"{A2}<|im_end|>"]


def test_hf_chat_equals_llama_3(toks):
    tok = toks["llama3"]
    hf = template("hf_chat", tokenizer=tok, chat_template=LLAMA3_JINJA)
    assert not hf.add_bos  # the Jinja template writes BOS itself
    assert hf.render(CONV) == template("llama_3").render(CONV)
    a = tokenize_conversation(tok, hf, CONV)
    b = tokenize_conversation(tok, template("llama_3"), CONV)
    assert a == b


def test_hf_chat_eos_closed_template_and_bos_once(toks):
    tok = toks["vicuna"]
    hf = template("hf_chat", tokenizer=tok, chat_template=MISTRAL_JINJA)
    assert hf.end_marker == "</s>"
    tc = tokenize_conversation(tok, hf, CONV)
    assert tc.input_ids[0] == tok.bos_token_id and tc.input_ids[1] != tok.bos_token_id
    # a token across the reply's start (" No") is cut there: the prompt "... [/INST] " stays a prefix
    assert runs(tok, tc) == [
        (f"<s>[INST] {U1} [/INST] ", False),
        (f"{A1}</s>", True),
        (f"[INST] {U2} [/INST] ", False),
        (f"{A2}</s>", True),
    ]


def test_hf_chat_refuses_what_it_cannot_mask(toks):
    tok = toks["smollm2"]
    unstable = (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + ' ' + loop.revindex|string + '\\n' + m['content'] "
        "+ '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    with pytest.raises(ValueError, match="not prefix-stable"):
        template("hf_chat", tokenizer=tok, chat_template=unstable)
    no_end = (
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'assistant:' }}{% endif %}"
    )
    with pytest.raises(ValueError, match="does not close an assistant reply with a special token"):
        template("hf_chat", tokenizer=tok, chat_template=no_end)
    with pytest.raises(ValueError, match="through the LLM"):
        template("hf_chat")
    with pytest.raises(ValueError, match="has no chat template"):
        template("hf_chat", tokenizer=toks["vicuna"])
    no_system = (
        "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
        + MISTRAL_JINJA
    )
    hf = template("hf_chat", tokenizer=toks["vicuna"], chat_template=no_system)
    with pytest.raises(MaskingError, match="System role not supported"):
        tokenize_conversation(toks["vicuna"], hf, [Message("system", "x"), *CONV])


# ------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize(
    ("conv", "match"),
    [
        ([Message("user", "hi"), Message("user", "hi")], "roles must alternate"),
        ([Message("assistant", "hi")], "'assistant' but 'user' was expected"),
        ([Message("user", "<image>\nhi")], "no assistant turn"),
        ([*CONV, Message("user", "and?")], "ends with a user turn"),
        ([Message("user", "hi"), Message("assistant", "  ")], "empty assistant reply"),
        (
            [Message("user", "hi"), Message("assistant", "see <image>")],
            "images may only appear in user turns",
        ),
        ([Message("user", "hi"), Message("system", "x"), Message("assistant", "y")], "only the first turn"),
        ([Message("user", "hi"), Message("doctor", "y")], "roles are 'system', 'user' and 'assistant'"),
        ([], "empty conversation"),
    ],
)
def test_masking_errors(toks, conv, match):
    with pytest.raises(MaskingError, match=match):
        tokenize_conversation(toks["llama3"], template("llama_3"), conv)


def test_image_count_mismatch(toks):
    with pytest.raises(MaskingError, match=r"1 <image> marker\(s\) but 2 image\(s\)"):
        tokenize_conversation(toks["llama3"], template("llama_3"), CONV, num_images=2)
    with pytest.raises(MaskingError, match=r"0 <image> marker\(s\) but 1 image"):
        tokenize_conversation(toks["llama3"], template("llama_3"), CONV[2:], num_images=1)


def test_dict_messages_and_generation_requires_user_last(toks):
    dicts = [{"role": m.role, "content": m.content} for m in CONV]
    assert tokenize_conversation(toks["llama3"], template("llama_3"), dicts) == tokenize_conversation(
        toks["llama3"], template("llama_3"), CONV
    )
    with pytest.raises(MaskingError, match="must end with a user turn"):
        tokenize_conversation(toks["llama3"], template("llama_3"), CONV, add_generation_prompt=True)


# ------------------------------------------------------------------------------------------ LLaVA records
def test_messages_from_llava():
    record = {
        "id": "x",
        "image": "cxr/1.png",
        "conversations": [{"from": "human", "value": U1}, {"from": "gpt", "value": A1}],
    }
    assert messages_from_llava(record) == [Message("user", U1), Message("assistant", A1)]
    assert llava_image_paths(record) == ["cxr/1.png"]
    assert llava_image_paths({"image": "None"}) == [] and llava_image_paths({"image": ""}) == []
    two = {"image": ["a.png", "b.png"], "conversations": [{"from": "human", "value": "<image><image> diff?"}]}
    two["conversations"].append({"from": "gpt", "value": "Same."})
    assert len(messages_from_llava(two)) == 2
    text_only = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}
    assert messages_from_llava(text_only)[0] == Message("user", "hi")


@pytest.mark.parametrize(
    ("record", "match"),
    [
        (
            {"conversations": [{"from": "gpt", "value": "a"}, {"from": "human", "value": "b"}]},
            "must be human",
        ),
        (
            {"conversations": [{"from": "human", "value": "a"}, {"from": "bot", "value": "b"}]},
            "expected 'human'",
        ),
        ({"conversations": [{"from": "human", "value": "a"}, {"from": "human", "value": "b"}]}, "alternate"),
        ({"conversations": []}, "no `conversations`"),
        ({"conversations": [{"from": "human"}]}, "needs `from` and `value`"),
        (
            {
                "image": "a.png",
                "conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}],
            },
            r"0 <image> marker\(s\) but the record lists 1 image",
        ),
        (
            {"conversations": [{"from": "human", "value": "<image>a"}, {"from": "gpt", "value": "b"}]},
            r"1 <image> marker\(s\) but the record lists 0 image",
        ),
    ],
)
def test_messages_from_llava_errors(record, match):
    with pytest.raises(MaskingError, match=match):
        messages_from_llava(record)


# ------------------------------------------------------------------------------------------ truncation
def _expanded(ids, image_seq_len):
    return sum(image_seq_len if t == IMAGE_TOKEN_INDEX else 1 for t in ids)


def test_truncation_never_cuts_an_image(toks):
    tok, tmpl = toks["llama3"], template("llama_3")
    conv = [
        Message("user", "Compare the two studies. <image> then <image>"),
        Message("assistant", A1 + " " + A2),
    ]
    full = tokenize_conversation(tok, tmpl, conv)
    seq = 5
    total = _expanded(full.input_ids, seq)
    outcomes = set()
    for max_length in range(1, total + 2):
        try:
            tc = tokenize_conversation(tok, tmpl, conv, max_length=max_length, image_seq_len=seq)
        except MaskingError as exc:
            assert "would cut image" in str(exc) or "no trainable token left" in str(exc)
            outcomes.add("error")
            continue
        outcomes.add("kept")
        assert tc.input_ids.count(IMAGE_TOKEN_INDEX) == 2 == tc.num_images
        assert _expanded(tc.input_ids, seq) <= max_length
        assert tc.input_ids == full.input_ids[: len(tc.input_ids)]
        assert tc.labels == full.labels[: len(tc.labels)]
    assert outcomes == {"error", "kept"}


def test_truncation_messages(toks):
    tok, tmpl = toks["llama3"], template("llama_3")
    full = tokenize_conversation(tok, tmpl, CONV)
    image_at = full.input_ids.index(IMAGE_TOKEN_INDEX)
    with pytest.raises(MaskingError, match=r"would cut image 1 \(each image takes 1 positions\)"):
        tokenize_conversation(tok, tmpl, CONV, max_length=image_at)
    with pytest.raises(
        MaskingError, match="would cut image 1"
    ):  # the image block itself would straddle the end
        tokenize_conversation(tok, tmpl, CONV, max_length=image_at + 3, image_seq_len=10)
    first_train = next(i for i, label in enumerate(full.labels) if label != IGNORE_INDEX)
    with pytest.raises(MaskingError, match="no trainable token left"):
        tokenize_conversation(tok, tmpl, CONV, max_length=first_train)
    cut = tokenize_conversation(tok, tmpl, CONV, max_length=first_train + 2)
    assert len(cut) == first_train + 2 and cut.num_trainable == 2
    with pytest.raises(MaskingError, match="prompt needs more than max_length"):
        tokenize_conversation(tok, tmpl, CONV[:1], add_generation_prompt=True, max_length=4)
    assert tokenize_conversation(tok, tmpl, CONV, max_length=len(full)) == full


@pytest.mark.parametrize("compat", [False, True])
def test_sentencepiece_conversations_tokenise_as_the_whole_text(compat):
    """With a LLaMA-2 style tokenizer (a "▁" word-start marker prepended to each text it is given), the ids are
    those of the rendered text tokenised as a whole between images (upstream's ``tokenizer_image_token``): no
    extra "▁" after each ``</s>`` (what tokenising segment by segment gave), and the trained tokens are the
    replies and their ``</s>``; a prompt for generation is the same ids up to the reply."""
    tok = VicunaLM.tiny_tokenizer()
    tpl = template("vicuna_v1", cambrian1_compat=compat)
    tc = tokenize_conversation(tok, tpl, CONV, num_images=1)
    text = tpl.render_text(CONV, False)
    before, after = text.split("<image>")
    bos = [tok.bos_token_id] if tc.input_ids[0] == tok.bos_token_id else []
    whole = [*bos, *tok(before, add_special_tokens=False)["input_ids"], IMAGE_TOKEN_INDEX]
    whole += tok(after, add_special_tokens=False)["input_ids"]
    assert tc.input_ids == whole
    names = tok.convert_ids_to_tokens([t for t in tc.input_ids if t >= 0])
    eos_at = [i for i, n in enumerate(names) if n == "</s>"]
    assert eos_at and all(names[i + 1] != "▁" for i in eos_at if i + 1 < len(names))
    trained = [t for t in tc.labels if t != IGNORE_INDEX]
    assert tok.decode(trained).split() == f"{A1}</s> {A2}</s>".split()
    prompt = tokenize_conversation(tok, tpl, [CONV[0]], add_generation_prompt=True, num_images=1)
    assert tc.input_ids[: len(prompt.input_ids)] == prompt.input_ids
    assert tc.labels[len(prompt.input_ids)] != IGNORE_INDEX  # the reply starts right after the prompt


def test_a_token_across_a_reply_start_is_cut_so_the_prompt_stays_a_prefix():
    """Byte-level BPE may merge a header's "\\n" with a reply's leading space ("ĊĠ", as SmolLM2's real vocabulary
    does): the text is then cut at the reply's start, so the header is not trained and the generation prompt is
    a prefix of the training ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    raw.train_from_iterator(["assistant\n  - effusion\n  - mass"] * 50, trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<|im_start|>", eos_token="<|im_end|>")
    assert "ĊĠ" in tok.get_vocab()  # the merge that crosses the boundary
    tpl = template("chatml_direct")
    msgs = [Message("user", "<image>\nWhat is shown?"), Message("assistant", "  - effusion")]
    tc = tokenize_conversation(tok, tpl, msgs, num_images=1)
    prompt = tokenize_conversation(tok, tpl, msgs[:1], add_generation_prompt=True, num_images=1)
    n = len(prompt.input_ids)
    assert tc.input_ids[:n] == prompt.input_ids
    assert all(label == IGNORE_INDEX for label in tc.labels[:n]) and tc.labels[n] != IGNORE_INDEX
    assert tok.decode([t for t in tc.labels if t != IGNORE_INDEX]) == "  - effusion<|im_end|>"


def test_a_tokenizer_without_character_offsets_is_named(toks):
    class NoOffsets:
        """A Python (slow) tokenizer: transformers raises NotImplementedError for offsets."""

        bos_token_id = None

        def __call__(self, texts, add_special_tokens=False, return_offsets_mapping=False):
            if return_offsets_mapping:
                raise NotImplementedError(
                    "return_offset_mapping is not available when using Python tokenizers"
                )
            return toks["smollm2"](texts, add_special_tokens=add_special_tokens)

    with pytest.raises(MaskingError, match=r"the tokenizer NoOffsets gives no character offsets .* fast"):
        tokenize_conversation(NoOffsets(), template("chatml_direct"), CONV)
