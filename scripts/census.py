"""Write docs/models.md (and the served count in README.md) from the model census of the installed transformers.

Usage: .venv/bin/python scripts/census.py [--invariants] [--save ROWS.jsonl] | [--rows ROWS.jsonl ...]

Runs :func:`tokenprune.testing.census.census` over every image-text-to-text model type (``--invariants``:
the engine invariants on every served type, slow; default: a keep-all forward and generation per served
type), or reads rows saved by earlier runs (``--rows``, one JSON object per line; a later file's row for a type
replaces an earlier one), and writes the table into docs/models.md between its ``<!-- census-table -->`` markers:
the rest of the page (the per-family sections) is written by hand and kept as it is.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs" / "models.md"
README = ROOT / "README.md"
MARK = re.compile(r"<!-- census -->.*?<!-- /census -->", re.S)
#: The generated part of docs/models.md; the hand-written sections around it survive regeneration.
TABLE = re.compile(r"<!-- census-table -->\n.*?<!-- /census-table -->\n", re.S)

STATUS = {
    "passes": "served: the engine invariants hold",
    "dedicated": "served by a registered adapter whose invariants run in the test suite (not in the census)",
    "served": "served: a keep-all pipeline runs and is the identity",
    "refused": "refused by `apply()` with the reason",
    "fails": "served, but a check failed (a bug to fix)",
    "not run": "the census could not build a tiny model or its inputs (never counted as served)",
}


def _rows(args: argparse.Namespace) -> list[dict]:
    if args.rows:
        rows: dict[str, dict] = {}
        for path in args.rows:
            for line in Path(path).read_text().splitlines():
                if line.startswith("{"):
                    row = json.loads(line)
                    rows[row["model_type"]] = row
        return list(rows.values())
    from tokenprune.testing.census import census

    out = [r.__dict__ for r in census(invariants=args.invariants, progress=lambda r: print(r, file=sys.stderr))]
    if args.save:
        Path(args.save).write_text("".join(json.dumps(r) + "\n" for r in out))
    return out


def _dedicated(rows: list[dict]) -> list[dict]:
    """Rows of types a registered adapter serves whose tiny model the census's generic inputs do not fit: their
    adapters' invariants run in the test suite on models built with their own processors."""
    from tokenprune.plugins import get_plugin_manager

    registered = set(get_plugin_manager().adapters)
    for r in rows:
        if r["model_type"] in registered and r["status"] in ("not run", "fails"):
            r["status"] = "dedicated"
            r["detail"] = "the census's generic inputs do not fit; its adapter's invariants run in tests/ " + (
                f"({r['detail']})" if r["detail"] else ""
            )
    return rows


def summary(rows: list[dict], version: str) -> str:
    counts = Counter(r["status"] for r in rows)
    served = counts["passes"] + counts["served"] + counts["dedicated"]
    generic = sum(1 for r in rows if r["status"] in ("passes", "served") and r["adapter"].startswith("generic"))
    return (
        f"transformers {version} registers {len(rows)} image-text-to-text model types: tokenprune serves "
        f"**{served}** of them ({generic} through the generic adapter; {counts['passes']} pass the engine invariants "
        f"in the census, {counts['dedicated']} more are tested with their dedicated adapters), refuses "
        f"{counts['refused']} by name with the reason, fails {counts['fails']}, and the census could not build "
        f"{counts['not run']} (not counted as served)"
    )


def hybrid_note(model_type: str) -> str:
    """Where the default config of ``model_type`` names layer kinds that are not softmax attention: the layer an
    attention-reading ``layer: k`` stage goes to (:func:`tokenprune.engine.hybrid.default_layer`)."""
    from tokenprune.engine import compat
    from tokenprune.engine.hybrid import SOFTMAX_KINDS, attention_layers, default_layer

    try:
        text = compat.config_class(model_type)().get_text_config()
    except Exception:  # a config that does not build with its defaults: nothing to say
        return ""
    kinds = [str(k) for k in getattr(text, "layer_types", None) or []]
    if not kinds or all(k in SOFTMAX_KINDS for k in kinds):
        return ""
    others = sorted({k for k in kinds if k not in SOFTMAX_KINDS})
    layer = default_layer(kinds)
    where = f"`layer: {layer}`" if layer is not None else "no layer"
    shown = ", ".join(map(str, attention_layers(kinds)[:4]))
    return (
        f"hybrid ({', '.join(others)} layers; softmax attention at {shown}, ... in the default config): "
        f"attention-reading layer stages: {where} (the first k >= 2 after a softmax-attention layer)"
    )


def render(rows: list[dict], version: str) -> str:
    lines = [
        "<!-- census-table -->",
        "<!-- generated by scripts/census.py from the model census (tokenprune/testing/census.py); do not edit "
        "between the census-table markers (the family sections after them are written by hand) -->",
        "",
        summary(rows, version) + ".",
        "",
        "Every model type of transformers' image-text-to-text mapping is built as a tiny random model from its",
        "config class and either served (a registered adapter, else the [generic adapter](adapters.md)) or",
        "refused by `apply()` with an `UnsupportedModelError` naming the type and the reason. Status:",
        "",
    ]
    lines += [f"- **{k}**: {v}" for k, v in STATUS.items()]
    seconds = round(sum(r.get("seconds", 0.0) for r in rows))
    lines += ["", f"The census of these rows took {seconds} s in all (the sum of the types' times)."]
    lines += [
        "",
        "Dedicated adapters do more than the generic one: vision attention (a described vision tower),",
        "video layouts and layouts the call's arguments do not give (LLaVA-NeXT's newlines, InternVL's tiles);",
        "the generic adapter also serves Qwen3-VL-style DeepStack residuals. Check your own checkpoint with",
        "`tokenprune check --model ID_OR_PATH`. The families that token-reduction papers evaluate on now have a",
        "section each after the table ([families](#families)): what works, the default layer, the caveats.",
        "",
        "Hybrid language models (linear-attention or convolution layers beside softmax attention): a stage that",
        "reads attention at `layer: k` needs layer `k - 1` to be softmax attention (and layer `k` too for a",
        "layer's own attention, PyramidDrop); `apply()` refuses another layer naming the usable ones. The note",
        "column gives the layer for such stages where the type's default config names its layer kinds",
        "(the first `k >= 2` after a softmax-attention layer); for a checkpoint whose config differs, `tokenprune",
        "check` and the refusal name its layers. Stages that read no attention (`random`, a `post_projector` cut)",
        "run at any layer. See [hybrid language models](engine.md#hybrid-language-models).",
        "",
        "| model type | status | adapter | why not / note |",
        "|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: r["model_type"]):
        note = hybrid_note(r["model_type"]) if r["status"] in ("passes", "served", "dedicated") else ""
        detail = "; ".join(x for x in (r["detail"], note) if x).replace("|", "\\|")
        lines.append(f"| `{r['model_type']}` | {r['status']} | {r['adapter']} | {detail} |")
    return "\n".join([*lines, "<!-- /census-table -->"]) + "\n"


def models_page(table: str, page: str) -> str:
    """``page`` (docs/models.md as it is) with its census table replaced by ``table``; a page without the markers
    becomes the title and the table."""
    if TABLE.search(page):
        return TABLE.sub(lambda _: table, page, count=1)
    return "# Models\n\n" + table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--invariants", action="store_true")
    parser.add_argument("--rows", action="append", default=[])
    parser.add_argument("--save", default=None)
    args = parser.parse_args()
    import transformers

    rows = _dedicated(_rows(args))
    DOCS.write_text(models_page(render(rows, transformers.__version__), DOCS.read_text() if DOCS.exists() else ""))
    readme = README.read_text()
    line = f"<!-- census -->{summary(rows, transformers.__version__)} ([models](docs/models.md))<!-- /census -->"
    if MARK.search(readme):
        README.write_text(MARK.sub(line, readme))
    print(summary(rows, transformers.__version__))


if __name__ == "__main__":
    main()
