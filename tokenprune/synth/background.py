"""What a pipeline keeps of the background, by scene layout.

The measurement behind docs/synth.md's background analysis: on the held-out ``background``
questions, for each background layout (uniform, gradient, two regions), how often the answer is
right, what share of the kept visual tokens lies on the background (against its share of the
image), and, on two-region scenes, whether the kept background tokens are still mostly of the
answer's colour. A reducer that keeps one representative of a near-uniform background keeps the
share low; on two regions it must also keep more of the main colour than of the second.

The kept tokens are read from the run's statistics (:func:`tokenprune.bench.heatmap.surviving_tokens`)
and matched with what the renderer drew under every token (:func:`~tokenprune.synth.patch_labels.packed_owners`).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch

import tokenprune as tp
from tokenprune.bench.heatmap import surviving_tokens
from tokenprune.synth.evaluate import MAX_ANSWER_TOKENS, answer_batch, size_groups
from tokenprune.synth.patch_labels import COLOUR_CLASSES, background_colours, pack_views, packed_owners
from tokenprune.synth.processor import num_image_tokens
from tokenprune.synth.questions import Sample
from tokenprune.synth.scenes import LAYOUTS, render


@dataclass(frozen=True)
class SampleCoverage:
    """One background question under one pipeline."""

    layout: str
    correct: bool
    kept_background: int  # kept visual tokens on the background (newlines excluded)
    kept_tokens: int  # kept visual tokens (newlines excluded)
    image_background: int  # background tokens of the whole image
    image_tokens: int  # visual tokens of the whole image (newlines excluded)
    kept_main: int  # kept background tokens of the answer's colour
    kept_second: int  # kept background tokens of the second colour (two-region scenes)


@dataclass(frozen=True)
class LayoutCoverage:
    """The samples of one layout, summarised.

    Attributes:
        layout: a name from :data:`~tokenprune.synth.scenes.LAYOUTS`.
        n: background questions on scenes of this layout.
        accuracy: share answered right.
        kept_share: mean over samples of kept background tokens / kept visual tokens.
        image_share: the same share over every visual token of the image (what a uniform pick keeps).
        kept_background: mean number of kept background tokens.
        main_majority: share of samples whose kept background tokens are mostly of the answer's
            colour (more than of the second colour; 0 kept background tokens counts as no).
    """

    layout: str
    n: int
    accuracy: float
    kept_share: float
    image_share: float
    kept_background: float
    main_majority: float


def token_labels(sample: Sample) -> tuple[np.ndarray, np.ndarray]:
    """Per visual token in the packed order: the owner (0 background, -1 newline) and the colour class."""
    scene = sample.scene
    _, omap = render(scene)
    colours = pack_views(background_colours(scene), scene.height, scene.width, newline=-1)
    return packed_owners(scene, omap), colours


def measure(sample: Sample, correct: bool, kept: torch.Tensor) -> SampleCoverage:
    """Count what ``kept`` (a bool mask over the packed visual tokens) keeps of ``sample``'s background."""
    owners, colours = token_labels(sample)
    if kept.shape[0] != owners.shape[0]:
        recorded, drawn = kept.shape[0], owners.shape[0]
        raise RuntimeError(f"sample {sample.sample_id}: {recorded} visual tokens recorded, {drawn} drawn")
    keep = kept.numpy()
    real, background = owners >= 0, owners == 0
    main = background & (colours == COLOUR_CLASSES.index(sample.scene.background))
    return SampleCoverage(
        layout=sample.scene.layout,
        correct=correct,
        kept_background=int((keep & background).sum()),
        kept_tokens=int((keep & real).sum()),
        image_background=int(background.sum()),
        image_tokens=int(real.sum()),
        kept_main=int((keep & main).sum()),
        kept_second=int((keep & background & ~main).sum()),
    )


@torch.no_grad()
def coverage(
    model: torch.nn.Module,
    processor: object,
    samples: list[Sample],
    pipeline: tp.Pipeline | dict | None,
    batch_size: int = 50,
) -> list[SampleCoverage]:
    """Answer ``samples`` under ``pipeline`` (None: unpruned) and measure each one's kept background."""
    model.eval()
    out: dict[int, SampleCoverage] = {}
    applied = nullcontext() if pipeline is None else tp.apply(model, pipeline)
    with applied as run:
        for idx in size_groups(samples, batch_size):
            batch = [samples[i] for i in idx]
            if run is not None:
                run.stats.clear()
            answers = answer_batch(model, processor, batch, MAX_ANSWER_TOKENS)
            prefill = run.stats.prefills[0] if run is not None else None
            for j, (i, (answer, _)) in enumerate(zip(idx, answers, strict=True)):
                scene = samples[i].scene
                kept = _kept(prefill, j, num_image_tokens(scene.height, scene.width))
                out[i] = measure(samples[i], answer == samples[i].qa.answer, kept)
    return [out[i] for i in range(len(samples))]


def _kept(prefill: object, sample: int, n_tokens: int) -> torch.Tensor:
    """The mask of the sample's surviving visual tokens (all of them without a pipeline)."""
    if prefill is None:
        return torch.ones(n_tokens, dtype=torch.bool)
    survived = surviving_tokens(prefill, sample)  # type: ignore[arg-type]
    if survived is None:
        raise RuntimeError("the pipeline recorded no stage with a token layout; nothing to measure")
    return survived[1]


def by_layout(samples: list[SampleCoverage]) -> list[LayoutCoverage]:
    """Summaries per layout, in :data:`~tokenprune.synth.scenes.LAYOUTS` order (layouts without samples left out)."""
    groups: dict[str, list[SampleCoverage]] = defaultdict(list)
    for s in samples:
        groups[s.layout].append(s)
    rows = []
    for layout in (name for name in LAYOUTS if groups[name]):
        g = groups[layout]
        rows.append(
            LayoutCoverage(
                layout=layout,
                n=len(g),
                accuracy=float(np.mean([s.correct for s in g])),
                kept_share=float(np.mean([s.kept_background / max(1, s.kept_tokens) for s in g])),
                image_share=float(np.mean([s.image_background / s.image_tokens for s in g])),
                kept_background=float(np.mean([s.kept_background for s in g])),
                main_majority=float(np.mean([s.kept_main > s.kept_second for s in g])),
            )
        )
    return rows


@dataclass(frozen=True)
class GraphDegrees:
    """How connected background and object tokens are in G-Prune's similarity graph, per layout.

    Attributes:
        layout: a name from :data:`~tokenprune.synth.scenes.LAYOUTS`.
        graphs: graphs measured (two per scene, the base view and the grid; a graph without
            background or without object tokens is left out).
        background_degree: mean share of its graph a background token is linked to (cosine at
            least the threshold, itself included).
        object_degree: the same for the tokens of objects (shapes and the text plate).
        background_score: mean G-Prune score of a background token (propagated norm / degree),
            relative to the mean score of the object tokens of the same graph.
    """

    layout: str
    graphs: int
    background_degree: float
    object_degree: float
    background_score: float


TokenGraph = Callable[[torch.Tensor, float], tuple[torch.Tensor, torch.Tensor]]
"""``graph(features, threshold) -> (degree, score)``: a similarity graph's node degrees (edges, self included) and
node scores for ``(n, D)`` token features, both ``(n,)`` (G-Prune's: :meth:`tokenprune_gprune.GPrune.token_graph`)."""


@torch.no_grad()
def graph_degrees(
    model: torch.nn.Module, processor: object, samples: list[Sample], graph: TokenGraph, threshold: float = 0.5
) -> list[GraphDegrees]:
    """A token graph (a reducer's, e.g. G-Prune's) on each sample's post-projector tokens (one graph per view
    kind: the base view, and the high-res grid), summarised per layout.

    The graph comes from the caller (the reducer's plugin), so this module depends on no plugin."""
    from PIL import Image

    from tokenprune.synth.patch_labels import view_owners
    from tokenprune.synth.processor import prompt

    captured: list[torch.Tensor] = []
    projector = model.model.multi_modal_projector
    handle = projector.register_forward_hook(lambda m, a, out: captured.append(out.detach()))
    rows: dict[str, list[tuple[float, float, float]]] = defaultdict(list)
    try:
        for sample in samples:
            image, omap = render(sample.scene)
            inputs = processor(images=Image.fromarray(image), text=prompt(sample.qa.question), return_tensors="pt")
            captured.clear()
            model(**inputs)
            views = captured[0].float()  # (n_views, 64, D): the base view, then the high-res tiles
            owners = view_owners(sample.scene, omap)
            graphs = [(views[0], owners[0]), (views[1:].flatten(0, 1), owners[1:].reshape(-1))]
            for feats, own in graphs:
                degree, score = graph(feats, threshold)
                bg = torch.from_numpy(own == 0)
                if bg.all() or not bg.any():
                    continue
                share = degree / feats.shape[0]
                rows[sample.scene.layout].append(
                    (float(share[bg].mean()), float(share[~bg].mean()), float(score[bg].mean() / score[~bg].mean()))
                )
    finally:
        handle.remove()
    return [
        GraphDegrees(layout, len(rows[layout]), *(float(np.mean(c)) for c in zip(*rows[layout], strict=True)))
        for layout in LAYOUTS
        if rows[layout]
    ]
