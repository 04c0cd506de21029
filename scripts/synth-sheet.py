"""Draw a contact sheet of SynthVQA held-out scenes for docs/synth.md.

Run:  python scripts/synth-sheet.py docs/img/synthvqa.png
"""

from __future__ import annotations

import sys
from pathlib import Path

from PIL import Image, ImageDraw

from tokenprune.synth.questions import heldout_split
from tokenprune.synth.scenes import LAYOUTS, render

SCALE, CELL, PER_LAYOUT, TEXT = 3, 300, 4, 30


def sheet(out: Path) -> None:
    """Four scenes per background layout, one layout per row, each labelled with its question and answer."""
    rows = {layout: [] for layout in LAYOUTS}
    for sample in heldout_split(40):
        if len(rows[sample.scene.layout]) < PER_LAYOUT:
            rows[sample.scene.layout].append(sample)
    canvas = Image.new("RGB", (PER_LAYOUT * CELL, len(LAYOUTS) * (CELL + TEXT)), "white")
    draw = ImageDraw.Draw(canvas)
    for r, layout in enumerate(LAYOUTS):
        for c, sample in enumerate(rows[layout]):
            image = Image.fromarray(render(sample.scene)[0])
            image = image.resize((image.width * SCALE, image.height * SCALE), Image.NEAREST)
            x, y = c * CELL + 6, r * (CELL + TEXT) + 4
            canvas.paste(image, (x, y))
            draw.text((x, y + CELL - 10), f"{layout}, {sample.scene.texture} texture", fill="black")
            draw.text((x, y + CELL + 4), f"{sample.qa.question} {sample.qa.answer}", fill="black")
    canvas.save(out)


if __name__ == "__main__":
    sheet(Path(sys.argv[1]))
