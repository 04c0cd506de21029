"""VisionZip's merge after the projector against the official merge before it, on the bundled mini VLM.

The official code (dvlab-research/VisionZip, ``clip_encoder.py``) merges the vision tower's features and then
projects them; tokenprune's ``visionzip`` reducer runs at ``post_projector`` and merges the projected tokens.
With a nonlinear projector (the mini VLM's: Linear, GELU, Linear, as LLaVA's ``mlp2x_gelu``) the two differ.
This script runs ``visionzip`` through :func:`tokenprune.apply` on SynthVQA held-out images (one sample per
forward) and, for the selection the reducer made (same dominant tokens, same targets and assignments), compares
per contextual token

* ``ours``: the mean of the projected tokens of its group (what the language model receives);
* ``pre-mean``: the projector applied to the mean of the group's pre-projector features (the merge moved before
  the projector, the rest unchanged);
* ``official``: the projector applied to ``target + mean(assigned)``, the official combination.

It prints the relative L2 difference ``|ours - x| / |x|`` and the cosine similarity, over all contextual
tokens (mean, and the worst), and checks first that ``projector(features) == tokens`` for every patch token,
so the comparison is of the merge alone. Dominant tokens are single tokens: identical in all three.

Run:  python benchmarks/visionzip_merge.py                              (CPU, well under a minute)
      python benchmarks/visionzip_merge.py --write docs/reducers/visionzip.md
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import os
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tokenprune_visionzip import VisionZip

import tokenprune as tp
from tokenprune import Merge, ReduceContext, ReducerParams, VisionAttentionRequest
from tokenprune.synth import bundled_model_path, load_bundled
from tokenprune.synth.processor import prompt
from tokenprune.synth.questions import heldout_split
from tokenprune.synth.scenes import render

BEGIN, END = "<!-- benchmarks:visionzip-merge:begin -->", "<!-- benchmarks:visionzip-merge:end -->"
BUDGETS = {"visionzip-64": 64 / 576, "visionzip-128": 128 / 576, "visionzip-192": 192 / 576}
"""The presets' share of LLaVA-1.5's 576 tokens, as a fraction of each sample's tokens."""

RECORDS: list[dict[str, torch.Tensor]] = []
"""What the recording reducer saw, one entry per forward."""


class RecordingVisionZip(VisionZip):
    """``visionzip`` that also asks for the pre-projector features and records its inputs and result."""

    name = "visionzip_recording"

    @classmethod
    def vision_attention_for(cls, params: ReducerParams) -> VisionAttentionRequest | None:
        p: VisionZip.Params = params  # type: ignore[assignment]
        return VisionAttentionRequest(p.attention, p.layer, features=True, keys=p.similarity == "keys")

    def reduce(self, tokens: torch.Tensor, ctx: ReduceContext) -> Merge:
        merge = super().reduce(tokens, ctx)
        RECORDS.append(
            {
                "tokens": tokens.detach().float().clone(),
                "features": ctx.vision_features.clone(),
                "patch": ctx.vision_valid.clone(),
                "valid": ctx.valid.clone(),
                "destination": merge.destination.clone(),
            }
        )
        return merge


class _Plugin:
    @staticmethod
    @tp.hookimpl
    def tokenprune_register_reducers(registry: tp.plugins.ReducerRegistry) -> None:
        registry.add(RecordingVisionZip)


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a, b, dim=-1)


def measure(model: Any, processor: Any, images: int, keep: float) -> dict[str, float]:
    """Run visionzip at ``keep`` on ``images`` held-out samples; the differences over their contextual tokens."""
    RECORDS.clear()
    manager = tp.get_plugin_manager(plugins=[_Plugin()])
    pipe = {"stages": [{"at": "post_projector", "reducer": "visionzip_recording", "keep": keep}]}
    projector = model.model.multi_modal_projector
    samples = heldout_split(n_per_type=max(1, images // 4 + 1))[:images]
    with tp.apply(model, pipe, plugins=manager), torch.no_grad():
        for s in samples:
            inputs = processor(
                images=[Image.fromarray(render(s.scene)[0])], text=[prompt(s.qa.question)], return_tensors="pt"
            )
            model(**inputs)
    ours, pre_mean, official, sizes, check = [], [], [], [], 0.0
    with torch.no_grad():
        for rec in RECORDS:
            tokens, feats, dest = rec["tokens"][0], rec["features"][0], rec["destination"][0]
            patch = rec["patch"][0]
            projected = projector(feats[patch])
            check = max(check, float(((projected - tokens[patch]).norm(dim=-1) / tokens[patch].norm(dim=-1)).max()))
            n = int(rec["valid"][0].sum())
            for root in range(n):
                members = [i for i in range(n) if int(dest[i]) == root and i != root]
                if not members:
                    continue  # a dominant token (or a target nothing joined): the same single token everywhere
                group = [root, *members]
                sizes.append(len(group))
                ours.append(tokens[group].mean(0))
                pre_mean.append(projector(feats[group].mean(0)))
                official.append(projector(feats[root] + feats[members].mean(0)))
    a, b, c = torch.stack(ours), torch.stack(pre_mean), torch.stack(official)
    rel_b = (a - b).norm(dim=-1) / b.norm(dim=-1)
    rel_c = (a - c).norm(dim=-1) / c.norm(dim=-1)
    return {
        "samples": len(RECORDS),
        "contextual": int(a.shape[0]),
        "group": sum(sizes) / len(sizes),
        "rel_pre_mean": float(rel_b.mean()),
        "rel_pre_mean_max": float(rel_b.max()),
        "cos_pre_mean": float(_cosine(a, b).mean()),
        "cos_pre_mean_min": float(_cosine(a, b).min()),
        "rel_official": float(rel_c.mean()),
        "rel_official_max": float(rel_c.max()),
        "cos_official": float(_cosine(a, c).mean()),
        "cos_official_min": float(_cosine(a, c).min()),
        "projector_check": check,
    }


def table(images: int) -> str:
    model, processor = load_bundled()
    digest = hashlib.sha256((bundled_model_path() / "model.safetensors").read_bytes()).hexdigest()[:12]
    lines = [
        f"Measured {datetime.date.today().isoformat()} on the bundled checkpoint `model.safetensors` sha256 "
        f"`{digest}…`, {images} SynthVQA held-out images, one per forward, CPU ({os.cpu_count()} cores). "
        "Relative L2 `|ours - x| / |x|` and cosine over every contextual token that merged at least one token "
        "(mean; worst in brackets).",
        "",
        "| budget (share of tokens) | contextual tokens (mean group size) "
        "| vs projector(mean of features): rel. L2 | cosine "
        "| vs official projector(target + mean(rest)): rel. L2 | cosine |",
        "|---|---|---|---|---|---|",
    ]
    check = 0.0
    for name, keep in BUDGETS.items():
        m = measure(model, processor, images, keep)
        check = max(check, m["projector_check"])
        lines.append(
            f"| `{name}` ({keep:.3f}) | {m['contextual']} ({m['group']:.1f}) "
            f"| {m['rel_pre_mean']:.3f} ({m['rel_pre_mean_max']:.3f}) "
            f"| {m['cos_pre_mean']:.3f} ({m['cos_pre_mean_min']:.3f}) | {m['rel_official']:.3f} "
            f"({m['rel_official_max']:.3f}) | {m['cos_official']:.3f} ({m['cos_official_min']:.3f}) |"
        )
    lines += ["", f"Setup check: `projector(features)` equals every patch token to a relative {check:.1e}."]
    return "\n".join(lines)


def write_between_markers(path: Path, text: str) -> None:
    """Replace what lies between :data:`BEGIN` and :data:`END` in ``path``."""
    old = path.read_text(encoding="utf-8")
    if BEGIN not in old or END not in old:
        raise SystemExit(f"{path} lacks the markers {BEGIN} / {END}")
    head, rest = old.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    path.write_text(f"{head}{BEGIN}\n{text}\n{END}{tail}", encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=16, help="held-out images to measure on")
    parser.add_argument("--write", type=Path, help="update this markdown file between the visionzip-merge markers")
    args = parser.parse_args()
    torch.manual_seed(0)
    text = table(args.images)
    print(text)
    if args.write is not None:
        write_between_markers(args.write, text)


if __name__ == "__main__":
    main()
