"""The ``solid_colours`` task: plain images of one colour; the answer is the colour's name."""

from __future__ import annotations

from PIL import Image
from pydantic import Field

import tokenprune
from tokenprune.bench.tasks import Example, Task, TaskParams
from tokenprune.plugins import TaskRegistry

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220), "yellow": (240, 220, 40)}


class SolidColours(Task):
    """Name the colour of a plain image (one word)."""

    name = "solid_colours"
    max_new_tokens = 1

    class Params(TaskParams):
        per_colour: int = Field(default=4, ge=1, description="Examples per colour.")
        size: int = Field(default=64, ge=8, description="Image side in pixels.")

    def examples(self) -> list[Example]:
        out = []
        for colour, rgb in COLOURS.items():
            for i in range(self.params.per_colour):
                image = Image.new("RGB", (self.params.size, self.params.size), rgb)
                out.append(Example(f"{colour}-{i}", [image], "what colour is the background ?", [colour], colour))
        return out


@tokenprune.hookimpl
def tokenprune_register_tasks(registry: TaskRegistry) -> None:
    registry.add(SolidColours)
