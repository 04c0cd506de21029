"""SynthVQA questions: six evaluated question types, training-only naming questions, and splits.

Evaluated types (each balanced over its answers in the held-out split):

=============  =====================================  ===============================  ===========
type           question                               answers                          probes
=============  =====================================  ===============================  ===========
``background`` what colour is the background ?        6 background colours             background
``colour``     what colour is the <shape> ?           6 shape colours                  foreground
``count``      how many shapes are there ?            1 2 3 4                          fine-grained
``exists``     is there a <colour> <shape> ?          yes no (80% hard negatives)      hallucination
``text``       what is written ?                      0-9                              fine-grained
``position``   where is the <shape> ?                 4 quadrants                      fine-grained
=============  =====================================  ===============================  ===========

Training also uses questions that *name* what the image shows (``what shape is red ?``,
``what is top-left ?``) and a dense description (``describe :``), which give the vision tower a
direct signal for shape and glyph identity (see docs/synth.md).

Every sample is a pure function of an integer id: training ids lie in ``[0, HELDOUT_BASE)`` and
held-out ids in ``[HELDOUT_BASE, ...)``, so the two splits are disjoint by construction.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from tokenprune.synth.scenes import (
    BACKGROUND_COLOURS,
    DIGITS,
    IMAGE_SIZES,
    LAYOUTS,
    QUADRANTS,
    SHAPE_COLOURS,
    SHAPE_KINDS,
    TEXT_KIND,
    TEXTURES,
    Scene,
    SceneObject,
    place_object,
    second_region,
)

QUESTION_TYPES: tuple[str, ...] = ("background", "colour", "count", "exists", "text", "position")
#: The fine-grained types on which random pruning must hurt (issue 5).
FINE_GRAINED_TYPES: tuple[str, ...] = ("text", "count", "position")
TRAINING_ONLY_TYPES: tuple[str, ...] = ("name_by_colour", "name_by_position", "describe")
MAX_SHAPES = 4
HELDOUT_BASE = 1 << 40
#: ids of the validation split (checkpoint monitoring during training), disjoint from both.
VALIDATION_BASE = 1 << 41
_SALT = 0x5EED_5A7
_EXTRA_SALT = 0xE815

#: How a quadrant is said in questions and answers: two words, ``"top left"``.
QUADRANT_WORDS: dict[str, str] = {q: q.replace("-", " ") for q in QUADRANTS}
#: A ``regions`` scene's main colour covers at least this many times the second colour's visible pixels.
MIN_DOMINANCE = 1.5

ANSWERS: dict[str, tuple[str, ...]] = {
    "background": tuple(BACKGROUND_COLOURS),
    "colour": tuple(SHAPE_COLOURS),
    "count": tuple(str(n) for n in range(1, MAX_SHAPES + 1)),
    "exists": ("yes", "no"),
    "text": DIGITS,
    "position": tuple(QUADRANT_WORDS.values()),
}


@dataclass(frozen=True)
class QA:
    """A question and its answer: words separated by single spaces (two for a position, several
    for ``describe``); the model ends every answer with ``</s>``."""

    qtype: str
    question: str
    answer: str


@dataclass(frozen=True)
class Sample:
    """One held-out item: a scene with one evaluated question."""

    sample_id: int
    scene: Scene
    qa: QA


def rng_for(sample_id: int) -> np.random.Generator:
    """The generator that determines sample ``sample_id`` completely."""
    if sample_id < 0:
        raise ValueError(f"sample ids are non-negative, got {sample_id}")
    return np.random.default_rng([sample_id, _SALT])


def sample_scene(
    rng: np.random.Generator,
    *,
    n_shapes: int | None = None,
    max_shapes: int = MAX_SHAPES,
    background: str | None = None,
    with_text: bool | None = None,
    digit: str | None = None,
    forced: tuple[str, str, str] | None = None,
    size: tuple[int, int] | None = None,
) -> Scene:
    """A random scene, optionally constrained.

    Args:
        rng: the source of randomness.
        n_shapes: the number of shapes (1..4); random in ``1..max_shapes`` if None.
        max_shapes: upper bound for a random shape count (a curriculum knob).
        background: the background colour name; random if None.
        with_text: whether a text plate is drawn; random (70% when a quadrant is free) if None.
        digit: the digit on the plate (implies ``with_text``).
        forced: (kind, colour, quadrant) of one shape that must be in the scene; any of the three
            may be ``""`` for "random".
        size: (height, width); one of :data:`IMAGE_SIZES` at random if None.
    """
    height, width = size if size is not None else IMAGE_SIZES[int(rng.integers(len(IMAGE_SIZES)))]
    if digit is not None:
        with_text = True
    max_for_text = MAX_SHAPES - 1 if with_text else MAX_SHAPES
    if n_shapes is None:
        n_shapes = int(rng.integers(1, min(max_shapes, max_for_text) + 1))
    if not 1 <= n_shapes <= max_for_text:
        raise ValueError(f"n_shapes={n_shapes} does not fit: use 1..{max_for_text} (with_text={with_text})")
    if with_text is None:
        with_text = n_shapes < MAX_SHAPES and rng.random() < 0.7

    quads = [QUADRANTS[i] for i in rng.permutation(len(QUADRANTS))]
    kinds = [SHAPE_KINDS[i] for i in rng.permutation(len(SHAPE_KINDS))]
    colours = [list(SHAPE_COLOURS)[i] for i in rng.permutation(len(SHAPE_COLOURS))]
    if forced is not None:
        fk, fc, fq = forced
        for lst, val in ((kinds, fk), (colours, fc), (quads, fq)):
            if val:
                lst.remove(val)
                lst.insert(0, val)
    objects: list[SceneObject] = []
    for i in range(n_shapes):
        objects.append(place_object(rng, height, width, quads[i], kinds[i], colours[i]))
    if with_text:
        d = digit if digit is not None else DIGITS[int(rng.integers(len(DIGITS)))]
        objects.append(place_object(rng, height, width, quads[n_shapes], TEXT_KIND, "white", d))
    objects.sort(key=lambda o: QUADRANTS.index(o.quadrant))
    bg = background if background is not None else list(BACKGROUND_COLOURS)[int(rng.integers(6))]
    scene = Scene(
        height=height,
        width=width,
        background=bg,
        texture=TEXTURES[int(rng.integers(len(TEXTURES)))],
        texture_seed=int(rng.integers(1 << 31)),
        objects=tuple(objects),
        layout=LAYOUTS[int(rng.integers(len(LAYOUTS)))],
    )
    return _with_second_colour(scene, rng) if scene.layout == "regions" else scene


def _with_second_colour(scene: Scene, rng: np.random.Generator) -> Scene:
    """``scene`` with a second background colour on a region where the main colour still dominates.

    The region (:func:`~tokenprune.synth.scenes.second_region`) is redrawn (new ``texture_seed``)
    until the main colour's visible pixels (outside every object's box) are at least
    :data:`MIN_DOMINANCE` times the second colour's; after 20 draws the scene falls back to a
    ``gradient`` layout (never seen in 10,000 scenes).
    """
    others = [c for c in BACKGROUND_COLOURS if c != scene.background]
    second = others[int(rng.integers(len(others)))]
    free = np.ones((scene.height, scene.width), dtype=bool)
    for obj in scene.objects:
        y, x, h, w = obj.box
        free[y : y + h, x : x + w] = False
    for _ in range(20):
        candidate = replace(scene, second=second, texture_seed=int(rng.integers(1 << 31)))
        region = second_region(candidate)
        if (free & ~region).sum() >= MIN_DOMINANCE * (free & region).sum():
            return candidate
    return replace(scene, layout="gradient")


def describe(scene: Scene) -> str:
    """The dense description: background colour, then each object in quadrant order.

    Example: ``navy top left red circle bottom right text 7 end``.
    """
    words = [scene.background]
    for obj in scene.objects:
        words.append(QUADRANT_WORDS[obj.quadrant])
        words += [TEXT_KIND, obj.digit or ""] if obj.kind == TEXT_KIND else [obj.colour, obj.kind]
    words.append("end")
    return " ".join(words)


def ask(scene: Scene, qtype: str, rng: np.random.Generator, answer: str | None = None) -> QA:
    """A question of type ``qtype`` about ``scene``.

    ``answer`` only matters where the scene leaves a choice (``exists``: which of yes/no to ask
    for). Raises ValueError when the scene cannot support the type (e.g. ``text`` without a plate).
    """
    shapes = scene.shapes
    if qtype == "background":
        return QA(qtype, "what colour is the background ?", scene.background)
    if qtype == "colour":
        s = shapes[int(rng.integers(len(shapes)))]
        return QA(qtype, f"what colour is the {s.kind} ?", s.colour)
    if qtype == "count":
        return QA(qtype, "how many shapes are there ?", str(len(shapes)))
    if qtype == "position":
        s = shapes[int(rng.integers(len(shapes)))]
        return QA(qtype, f"where is the {s.kind} ?", QUADRANT_WORDS[s.quadrant])
    if qtype == "text":
        if scene.text is None:
            raise ValueError("a 'text' question needs a scene with a text plate")
        return QA(qtype, "what is written ?", scene.text.digit or "")
    if qtype == "exists":
        want_yes = (rng.random() < 0.5) if answer is None else answer == "yes"
        present = {(s.kind, s.colour) for s in shapes}
        if want_yes:
            kind, colour = sorted(present)[int(rng.integers(len(present)))]
            return QA(qtype, f"is there a {colour} {kind} ?", "yes")
        r = rng.random()
        kinds = [s.kind for s in shapes]
        cols = [s.colour for s in shapes]
        if r < 0.4:  # a present shape kind with a colour it does not have
            kind = kinds[int(rng.integers(len(kinds)))]
            options = [c for c in SHAPE_COLOURS if (kind, c) not in present]
            colour = options[int(rng.integers(len(options)))]
        elif r < 0.8:  # a present colour on a shape kind that does not carry it
            colour = cols[int(rng.integers(len(cols)))]
            options = [k for k in SHAPE_KINDS if (k, colour) not in present]
            kind = options[int(rng.integers(len(options)))]
        else:  # anything absent
            options = [(k, c) for k in SHAPE_KINDS for c in SHAPE_COLOURS if (k, c) not in present]
            kind, colour = options[int(rng.integers(len(options)))]
        return QA(qtype, f"is there a {colour} {kind} ?", "no")
    if qtype == "name_by_colour":
        s = shapes[int(rng.integers(len(shapes)))]
        return QA(qtype, f"what shape is {s.colour} ?", s.kind)
    if qtype == "name_by_position":
        q = QUADRANTS[int(rng.integers(len(QUADRANTS)))]
        obj = scene.at(q)
        return QA(qtype, f"what is {QUADRANT_WORDS[q]} ?", "nothing" if obj is None else obj.kind)
    if qtype == "describe":
        return QA(qtype, "describe :", describe(scene))
    raise ValueError(f"unknown question type {qtype!r}; use one of {QUESTION_TYPES + TRAINING_ONLY_TYPES}")


def grounding_target(scene: Scene, qa: QA) -> int | None:
    """Index in ``scene.objects`` of the object a question is about, or None.

    Used by the training recipe's grounding loss (the answer position should look at this
    object's visual tokens). None for questions about the whole image (background, count,
    describe), for ``exists`` questions answered "no" and for empty quadrants.
    """
    words = qa.question.split()
    objs = scene.objects

    def find(pred: object) -> int | None:
        return next((i for i, o in enumerate(objs) if pred(o)), None)  # type: ignore[operator]

    if qa.qtype in ("colour", "position"):
        return find(lambda o: o.kind == words[-2])
    if qa.qtype == "text":
        return find(lambda o: o.kind == TEXT_KIND)
    if qa.qtype == "exists":
        return find(lambda o: o.colour == words[3] and o.kind == words[4]) if qa.answer == "yes" else None
    if qa.qtype == "name_by_colour":
        return find(lambda o: o.colour == words[-2] and o.kind != TEXT_KIND)
    if qa.qtype == "name_by_position":
        return find(lambda o: QUADRANT_WORDS[o.quadrant] == " ".join(words[2:-1]))
    return None


def balanced_sample(sample_id: int, qtype: str, answer: str) -> Sample:
    """A scene built so that the ``qtype`` question about it has the answer ``answer``."""
    if answer not in ANSWERS[qtype]:
        raise ValueError(f"{answer!r} is not an answer of {qtype!r}; answers are {ANSWERS[qtype]}")
    rng = rng_for(sample_id)
    if qtype == "background":
        scene = sample_scene(rng, background=answer)
    elif qtype == "count":
        scene = sample_scene(rng, n_shapes=int(answer))
    elif qtype == "text":
        scene = sample_scene(rng, digit=answer)
    elif qtype == "colour":
        scene = sample_scene(rng, forced=("", answer, ""))
        target = next(s for s in scene.shapes if s.colour == answer)
        return Sample(sample_id, scene, QA(qtype, f"what colour is the {target.kind} ?", answer))
    elif qtype == "position":
        quadrant = answer.replace(" ", "-")
        scene = sample_scene(rng, forced=("", "", quadrant))
        target = next(s for s in scene.shapes if s.quadrant == quadrant)
        return Sample(sample_id, scene, QA(qtype, f"where is the {target.kind} ?", answer))
    else:  # exists
        scene = sample_scene(rng)
    qa = ask(scene, qtype, rng, answer=answer)
    if qa.answer != answer:
        raise RuntimeError(f"internal error: asked for {answer!r}, built {qa.answer!r} (sample {sample_id})")
    return Sample(sample_id, scene, qa)


def heldout_split(n_per_type: int = 200, types: tuple[str, ...] = QUESTION_TYPES) -> list[Sample]:
    """The fixed held-out split: ``n_per_type`` items per type, answers cycled for exact balance.

    Item ``k`` of type ``t`` has id ``HELDOUT_BASE + k * len(QUESTION_TYPES) + index(t)``, so a
    smaller split is a prefix of a larger one (per type) and the ids never meet training ids.
    """
    return balanced_split(HELDOUT_BASE, n_per_type, types)


def validation_split(n_per_type: int = 50, types: tuple[str, ...] = QUESTION_TYPES) -> list[Sample]:
    """A balanced split for monitoring training, disjoint from the held-out and training ids."""
    return balanced_split(VALIDATION_BASE, n_per_type, types)


def balanced_split(base: int, n_per_type: int, types: tuple[str, ...] = QUESTION_TYPES) -> list[Sample]:
    """``n_per_type`` balanced items per type with ids ``base + k * 6 + index(type)``."""
    unknown = [t for t in types if t not in QUESTION_TYPES]
    if unknown:
        raise ValueError(f"unknown question types {unknown}; use some of {QUESTION_TYPES}")
    out: list[Sample] = []
    for k in range(n_per_type):
        for t in types:
            sid = base + k * len(QUESTION_TYPES) + QUESTION_TYPES.index(t)
            answers = ANSWERS[t]
            out.append(balanced_sample(sid, t, answers[k % len(answers)]))
    return out


def training_item(
    sample_id: int,
    max_shapes: int = MAX_SHAPES,
    describe_prob: float = 0.5,
    size: tuple[int, int] | None = None,
    extra_exists: int = 0,
) -> tuple[Scene, list[QA]]:
    """A training scene with every applicable question (types shuffled) and maybe a description.

    The evaluated types come once each (``text`` only with a plate), followed by one
    ``name_by_colour`` and one ``name_by_position`` question, in a random order; a ``describe``
    target is appended with probability ``describe_prob``. ``extra_exists`` more ``is there ...``
    questions are inserted at random places before the description; they come from a random
    stream of their own, so the rest of the item does not depend on ``extra_exists``.
    """
    if not 0 <= sample_id < HELDOUT_BASE:
        raise ValueError(f"training ids lie in [0, {HELDOUT_BASE}), got {sample_id}")
    if extra_exists < 0:
        raise ValueError(f"extra_exists is a number of questions, got {extra_exists}")
    rng = rng_for(sample_id)
    scene = sample_scene(rng, max_shapes=max_shapes, size=size)
    types = [t for t in QUESTION_TYPES if t != "text" or scene.text is not None]
    types += ["name_by_colour", "name_by_position"]
    qas = [ask(scene, types[i], rng) for i in rng.permutation(len(types))]
    if extra_exists:
        extra = np.random.default_rng([sample_id, _EXTRA_SALT])
        for _ in range(extra_exists):
            qa = ask(scene, "exists", extra)
            qas.insert(int(extra.integers(len(qas) + 1)), qa)
    if rng.random() < describe_prob:
        qas.append(ask(scene, "describe", rng))
    return scene, qas
