"""The composed model: splicing, unpadding, in-LLM samplers, stages, generation and config checks."""

from __future__ import annotations

import threading

import cambrian_parts as P
import numpy as np
import pytest
import torch
from PIL import Image

from cambrian_core import CONNECTORS, ENCODERS, LLMS, MODELS, build
from cambrian_core.config import ConfigError, load_config
from cambrian_core.model.encoder import StagedTokens, expand_to_square
from cambrian_core.model.masks import grid_masks, real_extents
from cambrian_core.model.tokenize import IGNORE_INDEX, IMAGE_TOKEN_INDEX, tokenize_conversation

# f = 4: a 64x32 (wide) image keeps rows 1..2 -> 2 x (4+1) = 10 tokens; 32x64 (tall) keeps columns 1..2
# -> 4 x (2+1) = 12; a square image keeps the whole grid -> 4 x 5 = 20.
SIZES = torch.tensor([[64, 32], [32, 64], [40, 40]])
BLOCKS = [10, 12, 20]
TEXTS = [
    "USER : what is in the image ? ASSISTANT : no",  # no image
    "USER : <image> what is this ? ASSISTANT : a lung",  # one
    "USER : <image> left <image> right ASSISTANT : yes",  # two
]


@pytest.fixture(autouse=True)
def _parts() -> None:
    P.register()


def make(seed: int = 0, **overrides):
    torch.manual_seed(seed)
    return build(MODELS, P.model_config(**overrides))


def encode(tok, text: str) -> list[int]:
    return [IMAGE_TOKEN_INDEX if w == "<image>" else tok.convert_tokens_to_ids(w) for w in text.split()]


def batch(tok, texts: list[str], side: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
    seqs = [encode(tok, t) for t in texts]
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), tok.pad_token_id)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, s in enumerate(seqs):
        sl = slice(width - len(s), width) if side == "left" else slice(0, len(s))
        ids[i, sl], mask[i, sl] = torch.tensor(s), 1
    return ids, mask


def pixels(n: int, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 3, 32, 32, generator=g), torch.randn(n, 3, 32, 32, generator=g)]


def inputs(model, texts=TEXTS, sizes=SIZES, side="right"):
    ids, mask = batch(model.tokenizer, texts, side)
    labels = ids.masked_fill((ids < 0) | (mask == 0), IGNORE_INDEX)
    n = int((ids == IMAGE_TOKEN_INDEX).sum())
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "labels": labels,
        "pixel_values": pixels(n),
        "image_sizes": sizes,
    }


# ------------------------------------------------------------------------------------------------ unpadding
@pytest.mark.parametrize("size", [(64, 32), (32, 64), (40, 40), (100, 7), (3, 50), (333, 200), (17, 18)])
@pytest.mark.parametrize("side", [4, 5, 24])
def test_real_cells_are_the_cells_that_overlap_the_pasted_image(size, side):
    w, h = size
    white = expand_to_square(Image.new("RGB", (w, h), (255, 255, 255)), (0, 0, 0))
    real = np.asarray(white)[..., 0] > 0  # [S, S]
    fine = np.kron(real, np.ones((side, side), bool))  # S*side: every cell is an integer block
    s = real.shape[0]
    cells = fine.reshape(side, s, side, s).any(axis=(1, 3)).reshape(-1)
    got = grid_masks(real_extents(torch.tensor([size]), side), side)[0].numpy()
    np.testing.assert_array_equal(got, cells)


def test_real_extents_of_square_images_are_the_whole_grid():
    assert real_extents(None, 6, n=2).tolist() == [[0, 6, 0, 6]] * 2
    with pytest.raises(ValueError, match="positive"):
        real_extents(torch.tensor([[0, 5]]), 4)


# ------------------------------------------------------------------------------------------------ splicing
def test_forward_with_zero_one_and_two_images_per_sample():
    model = make()
    x = inputs(model)
    spliced, ctx = model.prepare_inputs(**x)
    text_lens = [len(t.split()) for t in TEXTS]
    assert spliced.attention_mask.sum(1).tolist() == [
        text_lens[0],
        text_lens[1] - 1 + BLOCKS[0],
        text_lens[2] - 2 + BLOCKS[1] + BLOCKS[2],
    ]
    # image tokens carry no loss; the text labels survive in order
    assert (spliced.labels[spliced.image_batch, spliced.image_pos] == IGNORE_INDEX).all()
    is_image = torch.zeros_like(spliced.attention_mask, dtype=torch.bool)
    is_image[spliced.image_batch, spliced.image_pos] = True
    for b in range(3):
        kept = spliced.labels[b][spliced.attention_mask[b].bool() & ~is_image[b]]
        text = x["attention_mask"][b].bool() & (x["input_ids"][b] != IMAGE_TOKEN_INDEX)
        assert kept.tolist() == x["labels"][b][text].tolist()
    # every row of every block ends with the learned newline
    tokens = spliced.inputs_embeds[spliced.image_batch, spliced.image_pos]
    newlines = (tokens == model.image_newline.detach()).all(-1)
    assert newlines.sum().item() == 2 + 4 + 4  # rows of the wide, tall and square image
    ends = torch.cumsum(torch.tensor(BLOCKS), 0) - 1
    assert newlines[ends].all()
    assert ctx.seq_pos.numel() == 8 + 8 + 16  # real grid cells that the samplers refine
    out = model(**x)
    assert torch.isfinite(out.loss)
    assert out.logits.shape[:2] == spliced.attention_mask.shape


def test_labels_positions_and_padding_of_the_expanded_batch():
    model = make()
    x = inputs(model)
    right, _ = model.prepare_inputs(**x)
    left, _ = model.prepare_inputs(**x, padding_side="left")
    lengths = right.attention_mask.sum(1)
    width = right.attention_mask.shape[1]
    for b, n in enumerate(lengths.tolist()):
        assert right.attention_mask[b, :n].all() and not right.attention_mask[b, n:].any()
        assert left.attention_mask[b, width - n :].all() and not left.attention_mask[b, : width - n].any()
        assert right.position_ids[b, :n].tolist() == list(range(n))
        assert left.position_ids[b, width - n :].tolist() == list(range(n))
        assert torch.equal(right.inputs_embeds[b, :n], left.inputs_embeds[b, width - n :])


def test_training_and_inference_layouts_give_the_same_logits():
    """The same unpadded blocks in training (right padding) and generation (left padding): §G.1.10 fixed."""
    model = make().eval()
    x = inputs(model)
    with torch.no_grad():
        right = model(**x).logits
        left = model(**x, padding_side="left").logits
    lengths = model.prepare_inputs(**x)[0].attention_mask.sum(1).tolist()
    for b, n in enumerate(lengths):
        torch.testing.assert_close(right[b, :n], left[b, left.shape[1] - n :], atol=1e-5, rtol=1e-5)


def test_without_unpadding_every_block_is_the_full_grid():
    model = make(unpad=False)
    spliced, ctx = model.prepare_inputs(**inputs(model))
    assert spliced.image_pos.numel() == 3 * 4 * 5
    assert ctx.seq_pos.numel() == 3 * 16
    assert ctx.grid_mask.sum().item() == 8 + 8 + 16  # the samplers still know which cells are real


def test_packed_position_ids_restart_at_each_segment():
    model = make()
    tok = model.tokenizer
    seg_a, seg_b = encode(tok, "USER : <image> yes"), encode(tok, "USER : no <image> ASSISTANT : left")
    ids = torch.tensor([seg_a + seg_b])
    pos = torch.tensor([list(range(len(seg_a))) + list(range(len(seg_b)))])
    spliced, _ = model.prepare_inputs(ids, position_ids=pos, pixel_values=pixels(2), image_sizes=SIZES[:2])
    n_a = len(seg_a) - 1 + BLOCKS[0]
    n_b = len(seg_b) - 1 + BLOCKS[1]
    assert spliced.position_ids[0].tolist() == list(range(n_a)) + list(range(n_b))


def test_precomputed_tower_features_bypass_the_towers():
    model = make().eval()
    x = inputs(model)
    with torch.no_grad():
        feats = [t(px) for t, px in zip(model.towers, x["pixel_values"], strict=True)]
        a = model(**x).logits
        b = model(**{**x, "pixel_values": None}, tower_features=feats).logits
    torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match=r"tower_features\[1\] has shape \(3, 16, 20\).*\[N_img, 64, 20\]"):
        model(**{**x, "pixel_values": None}, tower_features=[feats[0], feats[1][:, :16]])
    with pytest.raises(ValueError, match="not both"):
        model(**x, tower_features=feats)


def test_sentinel_and_image_counts_must_agree():
    model = make()
    x = inputs(model)
    with pytest.raises(ValueError, match=r"3 <image> sentinels \(per sample: \[0, 1, 2\]\) but 2 images"):
        model(**{**x, "pixel_values": [p[:2] for p in x["pixel_values"]], "image_sizes": SIZES[:2]})
    with pytest.raises(ValueError, match="image_sizes has 2 rows but the batch has 3 images"):
        model(**{**x, "image_sizes": SIZES[:2]})
    with pytest.raises(ValueError, match="0 images"):
        model(**{**x, "pixel_values": None})


def test_text_only_batch_needs_no_image():
    model = make()
    ids, mask = batch(model.tokenizer, [TEXTS[0], "USER : yes ASSISTANT : no"])
    out = model(ids, mask, labels=ids.masked_fill(mask == 0, IGNORE_INDEX))
    assert torch.isfinite(out.loss)


# ------------------------------------------------------------------------------------------------ samplers
def manual_samplers(model, x, raw: torch.Tensor, index: int, original) -> torch.Tensor:
    """The reference computation, one image and one cell at a time."""
    f = model.grid
    feats = [t(px) for t, px in zip(model.towers, x["pixel_values"], strict=True)]
    masks = [grid_masks(real_extents(x["image_sizes"], t.grid), t.grid) for t in model.towers]
    state = model.connector(feats, masks).state
    ext = real_extents(x["image_sizes"], f).tolist()
    places = []  # (sample, start of block) per image, walking each sample's tokens
    img = 0
    for b in range(x["input_ids"].shape[0]):
        pos = 0
        for tok, m in zip(x["input_ids"][b].tolist(), x["attention_mask"][b].tolist(), strict=True):
            if not m:
                continue
            if tok == IMAGE_TOKEN_INDEX:
                places.append((b, pos))
                r0, r1, c0, c1 = ext[img]
                pos += (r1 - r0) * (c1 - c0 + 1)
                img += 1
            else:
                pos += 1
    grids = torch.zeros(len(places), f * f, raw.shape[-1])
    for k, (b, start) in enumerate(places):
        r0, r1, c0, c1 = ext[k]
        for r in range(r1 - r0):
            for c in range(c1 - c0):
                grids[k, (r0 + r) * f + c0 + c] = raw[b, start + r * (c1 - c0 + 1) + c]
    out = original(index, grids, state, grid_masks(real_extents(x["image_sizes"], f), f))
    expected = raw.clone()
    for k, (b, start) in enumerate(places):
        r0, r1, c0, c1 = ext[k]
        for r in range(r1 - r0):
            for c in range(c1 - c0):
                expected[b, start + r * (c1 - c0 + 1) + c] = out[k, (r0 + r) * f + c0 + c]
    return expected


def test_in_llm_samplers_run_after_exactly_the_scheduled_layers():
    model = make().eval()  # samplers after layers 0 and 2 of 4
    x = inputs(model)
    layers = model.llm.decoder_layers
    raw, seen = {}, {}
    for i, layer in enumerate(layers):
        layer.register_forward_hook(
            lambda m, a, o, i=i: raw.__setitem__(i, (o[0] if isinstance(o, tuple) else o).detach().clone()),
            prepend=True,
        )
        layer.register_forward_pre_hook(
            lambda m, a, kw, i=i: seen.__setitem__(i, (a[0] if a else kw["hidden_states"]).detach().clone()),
            with_kwargs=True,
        )
    calls, original = [], model.connector.llm_sample

    def counted(index, *args):
        calls.append((index, len(raw)))  # which sampler, and how many layers had run
        return original(index, *args)

    model.connector.llm_sample = counted
    with torch.no_grad():
        model(**x)
        assert calls == [(0, 1), (1, 3)]
        assert torch.equal(seen[2], raw[1])  # layer 1 is not scheduled: its output passes untouched
        for k, i in enumerate((0, 2)):
            expected = manual_samplers(model, x, raw[i], k, original)
            torch.testing.assert_close(seen[i + 1], expected, atol=1e-6, rtol=1e-6)
            assert not torch.equal(seen[i + 1], raw[i])  # the sampler did change the image cells


def test_samplers_act_on_the_prefill_only_and_never_on_text_only_calls():
    model = make().eval()
    calls, original = [], model.connector.llm_sample
    model.connector.llm_sample = lambda index, *a: calls.append(index) or original(index, *a)
    x = inputs(model)
    model.generate(x["input_ids"], x["attention_mask"], x["pixel_values"], SIZES, max_new_tokens=4)
    assert calls == [0, 1]
    calls.clear()
    ids, mask = batch(model.tokenizer, [TEXTS[0]])
    model.generate(ids, mask, max_new_tokens=3)
    model(ids, mask)
    assert calls == []


def test_sampler_schedule_must_fit_the_llm():
    with pytest.raises(ValueError, match=r"after decoder layers \[0, 3, 6\] but the LLM has 4 layers"):
        make(connector={"type": "test_grid", "num_samplers": 3, "start": 0, "stride": 3})


# ------------------------------------------------------------------------------------------------ stages
@pytest.mark.parametrize(
    ("stage", "trained"),
    [
        ("pretrain", {"connector", "image_newline"}),
        ("finetune", {"connector", "image_newline", "llm"}),
        ("full", {"connector", "image_newline", "llm", "towers"}),
    ],
)
def test_gradients_reach_exactly_the_trainable_parameters(stage, trained):
    model = make(stage=stage).train()
    model(**inputs(model)).loss.backward()
    params = dict(model.named_parameters())
    trainable = {n for n, p in params.items() if p.requires_grad}
    with_grad = {n for n, p in params.items() if p.grad is not None}
    assert with_grad == trainable
    assert {n.split(".")[0] for n in trainable} == trained
    assert all(params[n].grad.abs().sum() > 0 for n in trainable if "samplers" in n)


def test_finetune_trains_towers_built_unfrozen_and_logs_a_table(caplog):
    towers = [
        {"type": "test_patch", "width": 24, "patch": 8},
        {"type": "test_patch", "width": 20, "patch": 4, "freeze": False},
    ]
    model = make(vision_tower_aux_list=towers)
    groups = model.param_groups()
    assert "towers.1" in groups and "towers.0" not in groups
    assert {
        "connector.proj",
        "connector.projector",
        "connector.samplers",
        "connector",
        "image_newline",
        "llm",
    } <= set(groups)
    with caplog.at_level("INFO", logger="cambrian_core.model.cambrian"):
        table = model.set_stage("pretrain")
    assert "stage pretrain trains connector + newline" in caplog.text
    row = next(line for line in table.splitlines() if line.startswith("llm "))
    assert row.split()[1] == "0"
    assert set(model.param_groups()) == {
        "connector.proj",
        "connector.projector",
        "connector.samplers",
        "connector",
        "image_newline",
    }
    with pytest.raises(ValueError, match="stage='warmup' is unknown; stages: pretrain, finetune, full"):
        model.set_stage("warmup")


def test_gradient_checkpointing_gives_the_same_gradients_and_recomputes_samplers():
    grads = []
    for ckpt in (False, True):
        model = make(gradient_checkpointing=ckpt).train()
        calls, original = [], model.connector.llm_sample
        model.connector.llm_sample = lambda index, *a, c=calls, o=original: c.append(index) or o(index, *a)
        model(**inputs(model)).loss.backward()
        assert calls == ([0, 1, 1, 0] if ckpt else [0, 1])  # recomputed in backward, last first
        assert model.gradient_checkpointing == ckpt
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], atol=1e-6, rtol=1e-5, msg=n)


# ------------------------------------------------------------------------------------------------ generation
def stepwise(model, ids, mask, px, sizes, steps: int) -> torch.Tensor:
    """Greedy decoding by re-running the whole sequence (no cache) at every step."""
    tok = model.tokenizer
    done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    out = []
    for _ in range(steps):
        with torch.no_grad():
            logits = model(ids, mask, pixel_values=px, image_sizes=sizes, padding_side="left").logits[:, -1]
        nxt = torch.where(done, torch.full_like(done, tok.pad_token_id, dtype=torch.long), logits.argmax(-1))
        out.append(nxt)
        done |= nxt == tok.eos_token_id
        ids = torch.cat([ids, nxt[:, None]], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    return torch.stack(out, 1)


def test_greedy_generate_with_cache_equals_stepwise_decoding():
    model = make(seed=3).eval()
    x = inputs(model)
    new = model.generate(x["input_ids"], x["attention_mask"], x["pixel_values"], SIZES, max_new_tokens=6)
    assert new.shape[0] == 3 and 1 <= new.shape[1] <= 6
    ref = stepwise(model, x["input_ids"], x["attention_mask"], x["pixel_values"], SIZES, new.shape[1])
    assert torch.equal(new, ref)


def test_concurrent_generation_matches_sequential_calls():
    model = make(seed=4).eval()
    tok = model.tokenizer
    a_ids, a_mask = batch(tok, [TEXTS[2]])
    b_ids, b_mask = batch(tok, [TEXTS[0]])  # text only: must not see the other call's images
    a = {
        "input_ids": a_ids,
        "attention_mask": a_mask,
        "pixel_values": pixels(2, seed=7),
        "image_sizes": SIZES[1:],
    }
    b = {"input_ids": b_ids, "attention_mask": b_mask}
    want = [model.generate(**a, max_new_tokens=8), model.generate(**b, max_new_tokens=8)]
    got: dict[int, list[torch.Tensor]] = {0: [], 1: []}
    barrier = threading.Barrier(2)
    errors = []

    def run(k, kwargs):
        try:
            barrier.wait()
            for _ in range(3):
                got[k].append(model.generate(**kwargs, max_new_tokens=8))
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(0, a)), threading.Thread(target=run, args=(1, b))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for k in (0, 1):
        assert all(torch.equal(g, want[k]) for g in got[k])


def test_chat_renders_the_template_and_answers_about_images():
    model = make(seed=5).eval()
    images = [Image.new("RGB", (64, 32), (200, 10, 10)), Image.new("RGB", (30, 30), (0, 90, 0))]
    pixel_values, sizes = model.prepare_images(images)
    assert [tuple(p.shape) for p in pixel_values] == [(2, 3, 32, 32), (2, 3, 32, 32)]
    assert sizes.tolist() == [[64, 32], [30, 30]]
    answer = model.chat("what is in the image ?", images, max_new_tokens=5)
    ids = torch.tensor([encode(model.tokenizer, "USER : <image> <image> what is in the image ? ASSISTANT :")])
    new = model.generate(
        ids, torch.ones_like(ids), pixel_values, sizes, max_new_tokens=5, stop_strings=["</s>"]
    )
    expected = model.tokenizer.decode(new[0], skip_special_tokens=True).split("</s>")[0].strip()
    assert answer == expected


@pytest.mark.parametrize("kwargs", [{"do_sample": True, "num_return_sequences": 2}, {"num_beams": 2}])
def test_repeated_rows_in_generate_get_their_own_prompts_samplers(kwargs):
    torch.manual_seed(3)
    m = build(MODELS, P.model_config()).eval()  # in-LLM samplers after layers 0 and 2
    x = inputs(m, texts=TEXTS[1:], sizes=SIZES)  # one prompt with 1 image, one with 2
    args = (x["input_ids"], x["attention_mask"], x["pixel_values"], SIZES)
    one = m.generate(*args, max_new_tokens=1, output_scores=True, return_dict_in_generate=True).scores[0]
    two = m.generate(*args, max_new_tokens=1, output_scores=True, return_dict_in_generate=True, **kwargs)
    first = two.scores[0]  # rows: prompt 0 twice, then prompt 1 twice
    if "num_beams" in kwargs:  # beam scores are log-softmaxed
        one = torch.log_softmax(one, dim=-1)
        first = first.view(2, 2, -1)[:, 0]  # the beams start identical: compare the first of each prompt
        assert torch.allclose(first, one, atol=1e-5)
    else:
        assert torch.allclose(first, one.repeat_interleave(2, dim=0), atol=1e-5)


def test_16_bit_greyscale_images_are_rescaled_not_clipped_white():
    import numpy as np

    m = build(MODELS, P.model_config()).eval()
    ramp = np.linspace(0, 4095, 64 * 64).reshape(64, 64)  # a 12-bit radiograph in a 16-bit PNG
    im16 = Image.fromarray(ramp.astype(np.uint16))
    im8 = Image.fromarray(np.rint(ramp * 255 / 4095).astype(np.uint8)).convert("RGB")
    assert im16.mode.startswith("I")
    got, _ = m.prepare_images([im16])
    want, _ = m.prepare_images([im8])
    assert all(torch.allclose(g, w, atol=0.05) for g, w in zip(got, want, strict=True))


def test_only_special_tokens_become_stop_ids_other_stop_strings_match_as_text():
    from cambrian_core.model.cambrian import _single_token

    tok = make(seed=5).tokenizer
    word = next(w for w in ("the", "image", "what") if w in tok.get_vocab())
    assert _single_token(tok, word) is None  # a vocabulary word also comes inside other tokens
    eos = tok.eos_token
    assert _single_token(tok, eos) == tok.eos_token_id


# ------------------------------------------------------------------------------------------------ configs
BAD = [
    ({"image_token_len": 15}, r"image_token_len=15 is not a perfect square"),
    (
        {"vision_tower_aux_token_len_list": [16, 50]},
        r"tower 1 \(test_patch\): vision_tower_aux_token_len_list=50 is not a perfect square",
    ),
    (
        {"vision_tower_aux_token_len_list": [16]},
        r"`vision_tower_aux_token_len_list` has 1 entries but `vision_tower_aux_list` has 2 towers",
    ),
    (
        {"vision_tower_aux_token_len_list": [16, 36]},
        r"connector test_grid: tower 1: grid side 6 is not a multiple of the output grid side 4",
    ),
    (
        {"connector": {"type": "test_grid", "out_dim": 99}},
        r"width out_dim=99 does not match the LLM hidden size 32",
    ),
    (
        {"mm_projector_type": "linear_x"},
        r"mm_projector_type='linear_x' contradicts connector type 'test_grid'",
    ),
    ({"connector": None}, r"no connector: set `connector=dict\(type=...\)` or `mm_projector_type=...`"),
    ({"stage": "warmup"}, r"stage='warmup' is unknown"),
]


@pytest.mark.parametrize(("override", "message"), BAD)
def test_bad_configs_fail_before_anything_is_built(override, message, monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("a part was built although the config is bad")

    monkeypatch.setattr(P.PatchTower, "__init__", refuse)
    monkeypatch.setattr(P.TinyLlama, "__init__", refuse)
    with pytest.raises(ConfigError, match=message):
        build(MODELS, P.model_config(**override))


@pytest.mark.parametrize(("override", "message"), BAD)
def test_bad_configs_fail_in_load_config(override, message, tmp_path):
    path = tmp_path / "bad.py"
    path.write_text(f"model = {P.model_config(**override)!r}\n")
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_a_sampler_schedule_past_the_llms_last_layer_fails_in_load_config(tmp_path):
    from serve_helpers import tiny_config

    cfg = tiny_config()
    cfg["connector"] = {
        **cfg["connector"],
        "num_of_vision_sampler_layers": 3,
        "stride_of_vision_sampler_layers": 20,
    }
    layers = cfg["llm"]["config"]["num_hidden_layers"]
    path = tmp_path / "late.py"
    path.write_text(f"model = {cfg!r}\n")
    with pytest.raises(
        ConfigError, match=rf"decoder layers \[\d+, \d+, \d+\] but the LLM has {layers} layers"
    ):
        load_config(path)


def test_a_good_config_passes_load_config(tmp_path):
    path = tmp_path / "good.py"
    path.write_text(f"model = {P.model_config()!r}\n")
    assert load_config(path).model["image_token_len"] == 16


def test_model_filled_connector_dims_are_refused_in_load_config(tmp_path):
    path = tmp_path / "bad.py"
    cfg = P.model_config(connector={"type": "test_grid", "token_len": 16})
    path.write_text(f"model = {cfg!r}\n")
    with pytest.raises(
        ConfigError, match=r"model: connector test_grid: `token_len` is filled in by the model"
    ):
        load_config(path)


REAL_BAD = [
    (
        {
            "connector": {"type": "sva", "vision_hidden_size": 32, "num_heads": 4},
            "vision_tower_aux_token_len_list": [16, 36],
        },
        r"connector sva: tower 1 has a 6x6 grid \(36 tokens\) that query group 0 \(16 queries\) on a 4x4 grid "
        r"cannot split into windows",
    ),
    (
        {"connector": None, "mm_projector_type": "mlp2x_gelu"},
        r"connector mlp2x_gelu: mlp2x_gelu needs every tower at image_token_len tokens; tower 1 has 64, expected 16",
    ),
    (
        {"connector": {"type": "identity"}, "vision_tower_aux_token_len_list": [16, 16]},
        r"connector identity: identity needs the towers' hidden sizes to add up to the LLM width: .* 44 != 32",
    ),
]


@pytest.mark.parametrize(
    ("override", "message"), REAL_BAD, ids=["sva-window", "mlp2x-token-lens", "identity-width"]
)
def test_registered_connectors_refuse_bad_configs_before_anything_is_built(
    override, message, tmp_path, monkeypatch
):
    path = tmp_path / "bad.py"
    path.write_text(f"model = {P.model_config(**override)!r}\n")
    with pytest.raises(ConfigError, match=message):
        load_config(path)
    monkeypatch.setattr(P.PatchTower, "__init__", lambda *a, **k: pytest.fail("a tower was built"))
    with pytest.raises(ConfigError, match=message):
        build(MODELS, P.model_config(**override))


# ------------------------------------------------------------------------------------------------ registry
def registered(registry) -> list[str]:
    return [n for n in registry.names() if not n.startswith("test_")]


@pytest.mark.parametrize("name", registered(CONNECTORS))
def test_every_registered_connector_composes_trains_and_generates(name):
    """Two 16-token towers of width 16 (identity: 16 + 16 = the LLM's 32); pretrain stage."""
    towers = [
        {"type": "test_patch", "width": 16, "patch": 8},
        {"type": "test_patch", "width": 16, "patch": 8},
    ]
    connector = {"type": name, **CONNECTORS.get(name).tiny_config()}
    model = make(seed=6, vision_tower_aux_list=towers, connector=connector, stage="pretrain").train()
    model(**inputs(model)).loss.backward()
    params = dict(model.named_parameters())
    assert {n for n, p in params.items() if p.grad is not None} == {
        n for n, p in params.items() if p.requires_grad
    }
    model.eval()
    x = inputs(model)
    new = model.generate(x["input_ids"], x["attention_mask"], x["pixel_values"], SIZES, max_new_tokens=3)
    assert new.shape[0] == 3
    if model.connector.sampler_layers:  # the KV-cache path must match full recomputation with samplers too
        ref = stepwise(model, x["input_ids"], x["attention_mask"], x["pixel_values"], SIZES, new.shape[1])
        assert torch.equal(new, ref)


@pytest.mark.parametrize("name", registered(LLMS))
def test_every_registered_llm_composes_and_chats(name):
    llm = {"type": name, **LLMS.get(name).tiny_config()}
    model = make(seed=7, llm=llm, connector={"type": "test_grid", "num_samplers": 2}).eval()
    conv = tokenize_conversation(
        model.tokenizer,
        model.llm.template,
        [{"role": "user", "content": "<image>\nWhat is shown?"}, {"role": "assistant", "content": "A lung."}],
        num_images=1,
    )
    ids = torch.tensor([conv.input_ids])
    out = model(ids, labels=torch.tensor([conv.labels]), pixel_values=pixels(1), image_sizes=SIZES[:1])
    assert torch.isfinite(out.loss)
    answer = model.chat("What is shown?", [Image.new("RGB", (48, 32), (90, 90, 90))], max_new_tokens=3)
    assert isinstance(answer, str)


@pytest.mark.gpu
def test_forward_and_cached_generation_on_cuda():
    model = make(seed=8).to("cuda").eval()
    x = inputs(model)
    x = {k: ([t.cuda() for t in v] if isinstance(v, list) else v.cuda()) for k, v in x.items()}
    with torch.no_grad():
        assert torch.isfinite(model(**x).loss)
    new = model.generate(
        x["input_ids"], x["attention_mask"], x["pixel_values"], x["image_sizes"], max_new_tokens=4
    )
    assert new.device.type == "cuda"
    ref = stepwise(
        model, x["input_ids"], x["attention_mask"], x["pixel_values"], x["image_sizes"], new.shape[1]
    )
    assert torch.equal(new, ref.to(new.device))


def test_mm_projector_type_shortcut_follows_cambrian_grammar():
    from cambrian_core.model.checks import connector_config

    assert connector_config({"mm_projector_type": "mlp4x_gelu"}) == {"type": "mlp_gelu", "depth": 4}
    assert connector_config({"mm_projector_type": "mlp2x_gelu"}) == {"type": "mlp2x_gelu"}
    assert connector_config({"mm_projector_type": "sva"}) == {"type": "sva"}


# ------------------------------------------------------------------------------------------------ fast paths
def test_few_image_extents_equal_the_vectorised_ones():
    g = torch.Generator().manual_seed(3)
    sizes = torch.randint(1, 400, (40, 2), generator=g)  # > 8 images: the vectorised path
    for side in (4, 5, 24):
        every = real_extents(sizes, side)
        one_by_one = torch.cat([real_extents(sizes[i : i + 1], side) for i in range(len(sizes))])
        assert torch.equal(every, one_by_one)
    with pytest.raises(ValueError, match="must be positive"):
        real_extents(torch.tensor([[0, 5]]), 4)


def test_sliced_image_blocks_equal_the_vectorised_ones(monkeypatch):
    import cambrian_core.model.splice as S

    g = torch.Generator().manual_seed(4)
    tokens, newline = torch.randn(3, 16, 8, generator=g), torch.randn(8, generator=g)
    extents = real_extents(SIZES, 4)
    fast = S.build_image_blocks(tokens, newline, extents)
    monkeypatch.setattr(S, "_FEW", 0)
    slow = S.build_image_blocks(tokens, newline, extents)
    assert torch.equal(fast.embeds, slow.embeds) and torch.equal(fast.cells, slow.cells)
    assert fast.lengths.tolist() == slow.lengths.tolist() == BLOCKS
    assert S.build_image_blocks(tokens, newline, extents, with_cells=False).cells is None


@pytest.mark.parametrize("text", TEXTS)
def test_one_sequence_splice_equals_the_batched_one(text):
    from cambrian_core.model.splice import build_image_blocks, splice

    model = make()
    ids, _ = batch(model.tokenizer, [text])
    n = int((ids == IMAGE_TOKEN_INDEX).sum())
    g = torch.Generator().manual_seed(5)
    embeds = torch.randn(1, ids.shape[1], 8, generator=g)
    blocks = None
    if n:
        tokens = torch.randn(n, 16, 8, generator=g)
        blocks = build_image_blocks(tokens, torch.zeros(8), real_extents(SIZES[:n], 4))
    one = splice(ids, embeds, None, blocks=blocks, padding_side="left")
    # the same sequence twice takes the general, vectorised path
    two = splice(ids.repeat(2, 1), embeds.repeat(2, 1, 1), None, blocks=_twice(blocks), padding_side="left")
    assert torch.equal(one.inputs_embeds[0], two.inputs_embeds[0])
    assert torch.equal(one.position_ids[0], two.position_ids[0])
    assert torch.equal(one.attention_mask[0], two.attention_mask[0])
    first = two.image_batch == 0
    assert torch.equal(one.image_pos, two.image_pos[first]) and not one.image_batch.any()
    with pytest.raises(ValueError, match=r"has \d+ <image> sentinels .* but 5 images"):
        tokens = torch.randn(5, 16, 8)
        splice(ids, embeds, None, blocks=build_image_blocks(tokens, torch.zeros(8), real_extents(None, 4, 5)))


def _twice(blocks):
    from cambrian_core.model.splice import ImageBlocks

    if blocks is None:
        return None
    return ImageBlocks(blocks.embeds.repeat(2, 1), blocks.lengths.repeat(2), blocks.cells.repeat(2))


# ------------------------------------------------------------------------------------------- staged towers
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_multi_stage_tower_reaches_sva_staged_with_the_loss_of_its_tokens(device):
    """With SVA, a multi-stage tower hands the connector ``StagedTokens`` (its small stages projected before
    they are enlarged); the loss and gradients are those of the same model fed the tower's tokens."""
    towers = [
        {"type": "test_patch", "width": 24, "patch": 8},
        {"type": "convnext", **ENCODERS.get("convnext").tiny_config(), "image_size": 32, "freeze": False},
    ]
    sva = {"type": "sva", **CONNECTORS.get("sva").tiny_config()}
    model = make(seed=2, vision_tower_aux_list=towers, connector=sva, stage="finetune").double().to(device)
    params = dict((n, p) for n, p in model.named_parameters() if p.requires_grad)
    seen = []
    model.connector.register_forward_pre_hook(lambda mod, args: seen.append([type(f) for f in args[0]]))
    batch_in = inputs(model)
    batch_in = {
        k: ([t.to(device) for t in v] if isinstance(v, list) else v.to(device)) for k, v in batch_in.items()
    }
    batch_in["pixel_values"] = [p.double() for p in batch_in["pixel_values"]]
    staged_loss = model(**batch_in).loss
    staged_grads = torch.autograd.grad(staged_loss, list(params.values()), allow_unused=True)
    feats = [tower(px) for tower, px in zip(model.towers, batch_in.pop("pixel_values"), strict=True)]
    loss = model(**batch_in, tower_features=feats).loss
    grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    assert seen == [[torch.Tensor, StagedTokens], [torch.Tensor, torch.Tensor]]
    torch.testing.assert_close(staged_loss, loss, rtol=1e-10, atol=1e-10)
    names = list(params)
    assert any(n.startswith("towers.1.") and g is not None for n, g in zip(names, staged_grads, strict=True))
    for n, a, b in zip(names, staged_grads, grads, strict=True):
        if a is None or b is None:
            assert a is None and b is None, n
        else:
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=n)


@pytest.mark.parametrize("connector", ["sva", "mlp2x_gelu"])
def test_precomputed_staged_features_give_the_loss_of_their_tokens(connector):
    """``StagedTokens`` as ``tower_features`` (a staged feature cache) reach SVA as they are and any other
    connector as their tokens; the loss is that of the tokens either way."""
    towers = [
        {"type": "test_patch", "width": 24, "patch": 8},
        {"type": "convnext", **ENCODERS.get("convnext").tiny_config(), "image_size": 32},
    ]
    conn = {"type": connector, **CONNECTORS.get(connector).tiny_config()}
    model = make(seed=3, vision_tower_aux_list=towers, connector=conn).double()
    seen = []
    model.connector.register_forward_pre_hook(lambda mod, args: seen.append(type(args[0][1])))
    batch_in = inputs(model)
    pixels = [p.double() for p in batch_in.pop("pixel_values")]
    staged = [model.towers[0](pixels[0]), model.towers[1].forward_staged(pixels[1])]
    assert isinstance(staged[1], StagedTokens)
    got = model(**batch_in, tower_features=staged).loss
    want = model(**batch_in, tower_features=[staged[0], staged[1].tokens()]).loss
    assert seen == [StagedTokens if connector == "sva" else torch.Tensor, torch.Tensor]
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    bad = StagedTokens(staged[1].parts, 2)  # stages read as a 2x2 grid: a stale cache's layout
    with pytest.raises(
        ValueError, match=r"tower_features\[1\] has shape \(\d+, 4, \d+\); tower 1 \(ConvNextEncoder\) gives"
    ):
        model(**batch_in, tower_features=[staged[0], bad])


# ------------------------------------------------------------------------------------------------ torch.compile
@pytest.mark.slow
def test_compiled_connector_gives_the_eager_loss_gradients_and_state_dict():
    """``compile_connector`` changes how the connector runs (its forward and the in-LLM samplers), not the maths
    or the parameter names."""
    import torch._dynamo.utils

    sva = {"type": "sva", **CONNECTORS.get("sva").tiny_config()}  # windows of 1 and 2, 2 in-LLM samplers
    runs = []
    torch._dynamo.utils.counters.clear()
    for compiled in (False, True):
        model = make(seed=5, connector=sva).train()
        if compiled:
            model.compile_connector()
        loss = model(**inputs(model)).loss
        loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        runs.append((loss.detach(), grads, list(model.state_dict())))
    (loss_e, grads_e, keys_e), (loss_c, grads_c, keys_c) = runs
    assert (
        torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 2
    )  # the forward and the samplers compiled
    assert keys_c == keys_e  # no `_orig_mod.` prefixes: checkpoints stay interchangeable
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-6)
    assert grads_c.keys() == grads_e.keys() and any(n.startswith("connector.") for n in grads_c)
    for n in grads_e:
        torch.testing.assert_close(grads_c[n], grads_e[n], rtol=1e-4, atol=1e-5, msg=n)
