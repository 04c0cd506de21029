"""SynthVQA generator, tokenizer, processor and patch labels."""

import itertools
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from tokenprune.synth.batches import make_batch
from tokenprune.synth.model import TINY, build_model
from tokenprune.synth.patch_labels import BASE_VIEW_TOKENS, IGNORE, KIND_CLASSES, packed_owners, patch_labels
from tokenprune.synth.processor import GRID_PINPOINTS, build_processor, num_image_tokens, prompt
from tokenprune.synth.questions import (
    ANSWERS,
    HELDOUT_BASE,
    QUESTION_TYPES,
    ask,
    heldout_split,
    rng_for,
    training_item,
    validation_split,
)
from tokenprune.synth.scenes import (
    IMAGE_SIZES,
    QUADRANTS,
    SHAPE_COLOURS,
    SHAPE_KINDS,
    SHAPE_TINTS,
    Scene,
    SceneObject,
    render,
)
from tokenprune.synth.tokenizer import IMAGE_TOKEN_ID, build_tokenizer, vocabulary


@pytest.fixture(scope="module")
def processor():
    return build_processor()


def test_generator_is_deterministic():
    a, b = heldout_split(4), heldout_split(4)
    assert a == b
    for x, y in zip(a, b, strict=True):
        assert np.array_equal(render(x.scene)[0], render(y.scene)[0])
    assert training_item(123) == training_item(123)
    assert training_item(123) != training_item(124)


@pytest.mark.parametrize("sample_id", [3, 77, 1234])
def test_extra_exists_questions_leave_the_rest_of_the_item_alone(sample_id):
    scene, plain = training_item(sample_id)
    scene_x, more = training_item(sample_id, extra_exists=3)
    assert scene_x == scene
    assert [qa for qa in more if qa not in plain] == [qa for qa in more if qa.qtype == "exists" and qa not in plain]
    # the plain questions keep their order; three more existence questions were inserted
    it = iter(more)
    assert all(qa in it for qa in plain)
    assert sum(qa.qtype == "exists" for qa in more) == sum(qa.qtype == "exists" for qa in plain) + 3
    assert more[-1].qtype == "describe" or all(qa.qtype != "describe" for qa in more)
    present = {(o.colour, o.kind) for o in scene.shapes}
    for qa in more:
        if qa.qtype == "exists":
            colour, kind = qa.question.split()[3:5]
            assert qa.answer == ("yes" if (colour, kind) in present else "no")


def test_extra_exists_rejects_a_negative_number():
    with pytest.raises(ValueError, match="extra_exists"):
        training_item(1, extra_exists=-1)


def test_smaller_split_is_a_prefix_per_type():
    small, big = heldout_split(3), heldout_split(6)
    assert small == big[: len(small)]


def test_answers_are_balanced_per_type():
    split = heldout_split(60)
    for qtype in QUESTION_TYPES:
        counts = Counter(s.qa.answer for s in split if s.qa.qtype == qtype)
        assert set(counts) == set(ANSWERS[qtype])
        assert len(set(counts.values())) == 1, (qtype, counts)


def test_answers_are_true_of_the_scene():
    for s in heldout_split(20):
        scene, qa = s.scene, s.qa
        if qa.qtype == "count":
            assert int(qa.answer) == len(scene.shapes)
        elif qa.qtype == "text":
            assert scene.text is not None and scene.text.digit == qa.answer
        elif qa.qtype == "position":
            kind = qa.question.split()[-2]
            assert next(o for o in scene.shapes if o.kind == kind).quadrant == qa.answer.replace(" ", "-")
        elif qa.qtype == "exists":
            colour, kind = qa.question.split()[3:5]
            present = any(o.kind == kind and o.colour == colour for o in scene.shapes)
            assert present == (qa.answer == "yes")


def test_exists_negatives_are_mostly_hard():
    negatives = [s for s in heldout_split(100) if s.qa.qtype == "exists" and s.qa.answer == "no"]
    hard = 0
    for s in negatives:
        colour, kind = s.qa.question.split()[3:5]
        hard += any(o.kind == kind or o.colour == colour for o in s.scene.shapes)
    assert hard / len(negatives) >= 0.7


def test_heldout_split_is_disjoint_from_training():
    held = heldout_split(30) + validation_split(30)
    assert all(s.sample_id >= HELDOUT_BASE for s in held)
    assert len({s.sample_id for s in held}) == len(held)
    with pytest.raises(ValueError, match="training ids"):
        training_item(HELDOUT_BASE)
    held_images = {render(s.scene)[0].tobytes() for s in held}
    for i in range(300):
        assert render(training_item(i)[0])[0].tobytes() not in held_images


def _one_shape(kind: str, box: tuple[int, int, int, int] = (37, 38, 14, 14)) -> tuple[np.ndarray, np.ndarray]:
    obj = SceneObject(kind=kind, colour="green", quadrant="bottom-right", box=box)
    scene = Scene(height=64, width=64, background="black", texture="plain", texture_seed=0, objects=(obj,))
    return render(scene)


def test_shapes_are_drawn_in_their_colour_and_fill_pattern():
    colour = np.array(SHAPE_COLOURS["green"], dtype=np.float32)
    for kind in SHAPE_KINDS:
        tint = np.clip((1 - SHAPE_TINTS[kind]) * colour + SHAPE_TINTS[kind] * 255, 0, 255).astype(np.uint8)
        img, omap = _one_shape(kind)
        inside = omap == 1
        is_tint = (img == tint).all(-1) & ~(img == colour.astype(np.uint8)).all(-1)
        assert ((img == colour.astype(np.uint8)).all(-1) | is_tint)[inside].all(), kind
        yy, xx = np.nonzero(inside)
        on = is_tint[yy, xx]
        if kind == "circle":
            assert not on.any()
        elif kind == "square":
            assert np.array_equal(on, yy % 2 == 1)
        elif kind == "triangle":
            assert np.array_equal(on, xx % 2 == 1)
        else:
            assert np.array_equal(on, (yy + xx) % 2 == 1)


def test_kinds_differ_in_average_tint_so_the_base_view_keeps_them():
    whiteness = []
    for kind in SHAPE_KINDS:
        img, omap = _one_shape(kind)
        pixels = img[omap == 1].astype(np.float32)
        whiteness.append(float(pixels.min(-1).mean()))  # the white share lifts the smallest channel
    assert all(b - a > 15 for a, b in itertools.pairwise(whiteness)), whiteness


def test_every_full_patch_of_a_shape_shows_its_kind():
    """The design premise: a 4x4 patch fully inside a shape tells the kind by itself.

    The tinted-pixel layouts that full patches of different kinds can show are disjoint, for
    every placement of the shape relative to the patch grid.
    """
    layouts: dict[str, set[bytes]] = {k: set() for k in SHAPE_KINDS}
    for kind in SHAPE_KINDS:
        for dy in range(4):
            for dx in range(4):
                img, omap = _one_shape(kind, box=(33 + dy, 33 + dx, 14, 14))
                bright = img.astype(np.int32).sum(-1)
                for r in range(0, 64, 4):
                    for c in range(0, 64, 4):
                        if (omap[r : r + 4, c : c + 4] == 1).all():
                            block = bright[r : r + 4, c : c + 4]
                            layouts[kind].add((block > block.min()).tobytes())
        assert layouts[kind], f"no full patch inside a {kind}"
    for i, a in enumerate(SHAPE_KINDS):
        for b in SHAPE_KINDS[i + 1 :]:
            assert not layouts[a] & layouts[b], (a, b)


def test_objects_stay_inside_their_quadrant():
    for i in range(200):
        scene, _ = training_item(i)
        for obj in scene.objects:
            y, x, h, w = obj.box
            row, col = divmod(QUADRANTS.index(obj.quadrant), 2)
            assert row * scene.height // 2 <= y and y + h <= (row + 1) * scene.height // 2
            assert col * scene.width // 2 <= x and x + w <= (col + 1) * scene.width // 2


def test_tokenizer_round_trip():
    tok = build_tokenizer()
    vocab = vocabulary()
    assert tok.convert_tokens_to_ids(vocab) == list(range(len(vocab)))
    for s in heldout_split(5):
        text = f"{s.qa.question} {s.qa.answer}"
        ids = tok(text)["input_ids"]
        assert ids[0] == tok.bos_token_id and tok.unk_token_id not in ids
        assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok.convert_tokens_to_ids("<image>") == IMAGE_TOKEN_ID


@pytest.mark.parametrize("size", IMAGE_SIZES)
def test_processor_image_tokens(processor, size):
    """The processor inserts as many <image> ids as the model makes features, and >= 150."""
    h, w = size
    assert [h, w] in GRID_PINPOINTS
    img = Image.fromarray(np.zeros((h, w, 3), dtype=np.uint8))
    enc = processor(images=img, text=prompt("what is written ?"), return_tensors="pt")
    n = int((enc["input_ids"] == IMAGE_TOKEN_ID).sum())
    assert n == num_image_tokens(h, w) >= 150
    model = build_model(TINY)
    feats = model.model.get_image_features(pixel_values=enc["pixel_values"], image_sizes=enc["image_sizes"])
    assert feats.pooler_output[0].shape[0] == n


def test_image_sizes_give_different_grids(processor):
    shapes = set()
    for h, w in IMAGE_SIZES:
        enc = processor.image_processor(images=Image.new("RGB", (w, h)), return_tensors="pt")
        shapes.add(tuple(enc["pixel_values"].shape))
    assert len(shapes) >= 3


def test_patch_labels_follow_the_object():
    obj = SceneObject(kind="square", colour="red", quadrant="bottom-right", box=(40, 40, 12, 12))
    scene = Scene(height=64, width=64, background="navy", texture="plain", texture_seed=0, objects=(obj,))
    _img, omap = render(scene)
    labels = patch_labels(scene, omap)
    assert labels.shape == (5, 64, 4)
    square = KIND_CLASSES.index("square")
    # high-res tile 4 is the bottom-right one; the square covers pixels 41..50 of the image,
    # i.e. pixels 9..18 of that tile: patches 2..4 in each direction
    tile = labels[4, :, 0].reshape(8, 8)
    assert set(zip(*np.nonzero(tile == square), strict=True)) <= {(r, c) for r in range(2, 5) for c in range(2, 5)}
    assert (tile == square).sum() >= 4
    assert (labels[1:4, :, 0] == 0).all()
    base = labels[0, :, 0].reshape(8, 8)
    assert (base[5:7, 5:7] == square).any() and (base[:4] == 0).all()


@pytest.mark.parametrize("size", IMAGE_SIZES)
def test_quadrant_labels_cover_the_base_view_only(size):
    scene, _ = training_item(5, size=size)
    _img, omap = render(scene)
    labels = patch_labels(scene, omap)
    quadrant = labels[0, :, 3].reshape(8, 8)
    assert (quadrant[:4, :4] == QUADRANTS.index("top-left")).all()
    assert (quadrant[:4, 4:] == QUADRANTS.index("top-right")).all()
    assert (quadrant[4:, :4] == QUADRANTS.index("bottom-left")).all()
    assert (quadrant[4:, 4:] == QUADRANTS.index("bottom-right")).all()
    assert (labels[1:, :, 3] == IGNORE).all()
    # every shape's base-view patches carry its own quadrant
    owners = packed_owners(scene, omap)[:BASE_VIEW_TOKENS]
    for i, obj in enumerate(scene.objects):
        assert (labels[0, owners == i + 1, 3] == QUADRANTS.index(obj.quadrant)).all()


def test_make_batch_is_deterministic_and_masks_answers(processor):
    a = make_batch(processor.image_processor, seed=1, step=7, batch_size=3)
    b = make_batch(processor.image_processor, seed=1, step=7, batch_size=3)
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.pixel_values, b.pixel_values)
    vocab = vocabulary()
    answers = {w for t in ANSWERS.values() for w in t}
    supervised = a.labels[a.labels != -100]
    assert len(supervised) >= 3 * 6
    # every target is the token that follows in the sequence
    pos = (a.labels != -100).nonzero()
    for i, p in pos.tolist():
        assert a.input_ids[i, p + 1] == a.labels[i, p]
    assert any(vocab[t] in answers for t in supervised.tolist())
    assert (a.input_ids == IMAGE_TOKEN_ID).sum(1).unique().numel() == 1


def test_position_questions_are_grounded_on_base_view_tokens(processor):
    """`where is ...` looks at the object's base-view tokens; other questions at all its tokens."""
    where = vocabulary().index("where")
    seen = {"position": 0, "other": 0}
    for step in range(6):
        batch = make_batch(processor.image_processor, seed=0, step=step, batch_size=4)
        first_image = int((batch.input_ids[0] == IMAGE_TOKEN_ID).nonzero()[0])
        for row, query, target in zip(
            batch.ground_rows.tolist(), batch.ground_query.tolist(), batch.ground_targets, strict=True
        ):
            ids = batch.input_ids[row, : query + 1].tolist()
            positions = target.nonzero()[:, 0] - first_image
            if where in ids[query - 4 : query + 1]:  # the query sits on the "?" of "where is the X ?"
                seen["position"] += 1
                assert (positions < BASE_VIEW_TOKENS).all()
            elif (positions >= BASE_VIEW_TOKENS).any():
                seen["other"] += 1
    assert seen["position"] > 0 and seen["other"] > 0


def test_ground_absent_points_no_answers_at_the_bos_token(processor):
    yes, no = vocabulary().index("yes"), vocabulary().index("no")
    plain = make_batch(processor.image_processor, seed=0, step=3, batch_size=8)
    sink = make_batch(processor.image_processor, seed=0, step=3, batch_size=8, ground_absent=True)
    assert torch.equal(plain.input_ids, sink.input_ids)
    assert not plain.ground_targets[:, 0].any()
    on_bos = sink.ground_targets[:, 0]
    assert on_bos.any()
    for row, query, target, bos in zip(
        sink.ground_rows.tolist(), sink.ground_query.tolist(), sink.ground_targets, on_bos.tolist(), strict=True
    ):
        # the answer predicted at the query position is "no" exactly when the target is <s> alone
        answer = int(sink.input_ids[row, query + 1])
        is_exists = int(sink.input_ids[row, query - 4]) == vocabulary().index("there")  # is there a C K ?
        assert bos == (is_exists and answer == no)
        if bos:
            assert target.sum() == 1
        elif is_exists:
            assert answer == yes
    assert len(sink.ground_rows) == len(plain.ground_rows) + int(on_bos.sum())


def test_exists_head_moves_every_existence_question_to_its_own_head(processor):
    """With exists_head, `is there ...` goes to that head (object if present, else <s>); the rest stay on head 0."""
    yes, no, there = (vocabulary().index(w) for w in ("yes", "no", "there"))
    plain = make_batch(processor.image_processor, seed=0, step=3, batch_size=8)
    split = make_batch(processor.image_processor, seed=0, step=3, batch_size=8, exists_head=2)
    assert torch.equal(plain.input_ids, split.input_ids)
    assert (plain.ground_heads == 0).all()
    answers = {yes: 0, no: 0}
    for row, head, query, target in zip(
        split.ground_rows.tolist(),
        split.ground_heads.tolist(),
        split.ground_query.tolist(),
        split.ground_targets,
        strict=True,
    ):
        is_exists = int(split.input_ids[row, query - 4]) == there  # is there a C K ?
        assert head == (2 if is_exists else 0)
        if is_exists:
            answer = int(split.input_ids[row, query + 1])
            answers[answer] += 1
            assert bool(target[0]) == (answer == no)  # <s> exactly for "no"
            assert (target.sum() == 1) == (answer == no)
    assert answers[yes] > 0 and answers[no] > 0
    # the other questions keep their head-0 targets, in the same order
    plain_exists = plain.input_ids[plain.ground_rows, plain.ground_query - 4] == there
    assert int(plain_exists.sum()) == answers[yes]
    assert torch.equal(split.ground_targets[split.ground_heads == 0], plain.ground_targets[~plain_exists])


def test_question_labels_name_the_colour_and_kind_of_each_existence_question(processor):
    from tokenprune.synth.scenes import SHAPE_COLOURS, SHAPE_KINDS

    words = vocabulary()
    one = make_batch(processor.image_processor, seed=0, step=4, batch_size=6)
    four = make_batch(processor.image_processor, seed=0, step=4, batch_size=6, extra_exists=3)
    assert len(four.question_rows) == len(one.question_rows) + 3 * 6
    for batch in (one, four):
        for row, query, (colour, kind) in zip(
            batch.question_rows.tolist(), batch.question_query.tolist(), batch.question_labels.tolist(), strict=True
        ):
            tail = [words[i] for i in batch.input_ids[row, query - 4 : query + 1].tolist()]
            assert tail == ["there", "a", list(SHAPE_COLOURS)[colour], SHAPE_KINDS[kind], "?"]


def test_exists_head_and_ground_absent_exclude_each_other(processor):
    with pytest.raises(ValueError, match="choose one"):
        make_batch(processor.image_processor, seed=0, step=0, batch_size=2, ground_absent=True, exists_head=1)


def test_ask_rejects_text_question_without_plate():
    rng = rng_for(0)
    scene = Scene(height=64, width=64, background="black", texture="plain", texture_seed=0, objects=())
    with pytest.raises(ValueError, match="text plate"):
        ask(scene, "text", rng)


@pytest.mark.parametrize("size", IMAGE_SIZES)
def test_packed_owners_follow_llava_next_packing(size):
    """packed_owners agrees with the model's own pack_image_features on (view, row, col) coordinates."""
    from tokenprune.synth.patch_labels import packed_owners, view_owners

    scene, _ = training_item(11, size=size)
    _, omap = render(scene)
    owners = view_owners(scene, omap)  # (n_views, 64)
    n_views = owners.shape[0]
    coords = torch.stack(
        [torch.tensor([v, p // 8, p % 8], dtype=torch.float32) for v in range(n_views) for p in range(64)]
    ).reshape(n_views, 64, 3)
    model = build_model(TINY)
    packed, _ = model.model.pack_image_features(
        [coords], torch.tensor([size]), "default", image_newline=torch.tensor([-1.0, -1.0, -1.0])
    )
    packed = packed[0] if isinstance(packed, (list, tuple)) else packed
    flat = packed_owners(scene, omap)
    assert len(flat) == packed.shape[0] == num_image_tokens(*size)
    for i, (v, r, c) in enumerate(packed.long().tolist()):
        expected = -1 if v < 0 else owners[v, r * 8 + c]
        assert flat[i] == expected


def test_every_answer_is_closed_by_eos_and_position_answers_have_two_words(processor):
    vocab = vocabulary()
    eos = vocab.index("</s>")
    batch = make_batch(processor.image_processor, seed=0, step=11, batch_size=4)
    for row in range(4):
        ids = batch.input_ids[row][batch.attention_mask[row].bool()].tolist()
        words = [vocab[i] for i in ids]
        # "?" or ":" ends a question; the answer follows, then </s>, then the next question or the end
        answers = " ".join(words).split(" </s>")[:-1]
        assert words[-1] == "</s>" and len(answers) >= 6
        for chunk in answers:
            question, _, answer = chunk.rpartition(" ? ") if " ? " in chunk else chunk.rpartition(" : ")
            if question.split()[-4:-1] == ["where", "is", "the"]:
                assert answer in ANSWERS["position"] and len(answer.split()) == 2
        # the loss predicts one </s> per answer
        targets = batch.labels[row][batch.labels[row] != -100].tolist()
        assert targets.count(eos) == len(answers)


def test_both_words_of_a_position_answer_are_grounded(processor):
    vocab = vocabulary()
    where = vocab.index("where")
    checked = 0
    for step in range(4):
        batch = make_batch(processor.image_processor, seed=0, step=step, batch_size=4)
        entries = list(zip(batch.ground_rows.tolist(), batch.ground_query.tolist(), batch.ground_targets, strict=True))
        for row, query, target in entries:
            ids = batch.input_ids[row].tolist()
            if ids[query] == vocab.index("?") and where in ids[query - 4 : query]:
                follow = [t for r, q, t in entries if r == row and q == query + 1]
                assert len(follow) == 1 and torch.equal(follow[0], target)
                assert vocab[ids[query + 1]] in ("top", "bottom")
                checked += 1
    assert checked > 0


def test_layouts_cover_the_heldout_split_and_regions_keep_a_dominant_colour():
    from tokenprune.synth.questions import MIN_DOMINANCE
    from tokenprune.synth.scenes import LAYOUTS, MAX_REGION, MIN_REGION, second_region

    split = heldout_split(40)
    assert {s.scene.layout for s in split} == set(LAYOUTS)
    for s in split:
        scene = s.scene
        region = second_region(scene)
        if scene.layout != "regions":
            assert scene.second is None and not region.any()
            continue
        assert scene.second != scene.background
        assert MIN_REGION - 0.05 <= region.mean() <= MAX_REGION + 0.05
        free = render(scene)[1] == 0
        assert (free & ~region).sum() >= MIN_DOMINANCE * (free & region).sum()


def test_a_regions_background_is_two_colours_under_the_patches():
    """On a two-region scene a background question needs more than one token: patch labels show both colours."""
    from tokenprune.synth.patch_labels import COLOUR_CLASSES
    from tokenprune.synth.scenes import second_region

    scene = Scene(64, 64, "navy", "plain", texture_seed=5, objects=(), layout="regions", second="olive")
    image, omap = render(scene)
    region = second_region(scene)
    assert (image[region] == (95, 95, 20)).all() and (image[~region] == (20, 30, 110)).all()
    colours = patch_labels(scene, omap)[..., 1]
    assert {COLOUR_CLASSES[c] for c in colours.reshape(-1).tolist()} == {"navy", "olive"}
    fine = region[::4, ::4]  # the top-left pixel of every 4x4 patch of a fully covered area
    tiles = colours[1:].reshape(2, 2, 8, 8).transpose(0, 2, 1, 3).reshape(16, 16)
    inside = region.reshape(16, 4, 16, 4).all(axis=(1, 3))
    assert (tiles[inside] == COLOUR_CLASSES.index("olive")).all()
    assert fine.any()


def test_a_gradient_keeps_the_colour_and_changes_the_brightness():
    from tokenprune.synth.scenes import GRADIENT_RANGE

    scene = Scene(64, 64, "teal", "plain", texture_seed=2, objects=(), layout="gradient")
    image = render(scene)[0].astype(float)
    base = np.array((15, 100, 100), dtype=float)
    factor = image[..., 1] / base[1]
    assert factor.min() < 0.75 and factor.max() > 1.25
    assert GRADIENT_RANGE[0] - 0.02 <= factor.min() and factor.max() <= GRADIENT_RANGE[1] + 0.02
    assert np.allclose(image[..., 2], image[..., 1], atol=1)  # teal stays teal: green == blue


def test_a_regions_layout_needs_its_second_colour():
    with pytest.raises(ValueError, match="second colour"):
        render(Scene(64, 64, "navy", "plain", texture_seed=0, objects=(), layout="regions"))
    with pytest.raises(ValueError, match="layout"):
        render(Scene(64, 64, "navy", "plain", texture_seed=0, objects=(), layout="swirl"))


def test_answers_are_read_up_to_eos():
    from tokenprune.synth.evaluate import _until_eos

    tokenizer = build_tokenizer()
    vocab = vocabulary()
    ids = [vocab.index(w) for w in ("bottom", "left", "</s>", "red")]
    assert _until_eos(ids, tokenizer) == ("bottom left", 3)
    assert _until_eos(ids[:2], tokenizer) == ("bottom left", None)
    assert _until_eos([60, vocab.index("</s>")], tokenizer) == ("<unk>", 2)
