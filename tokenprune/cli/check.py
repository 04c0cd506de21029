"""``tokenprune check``: will tokenprune work on this model? The engine invariants on the user's own model.

The command loads the model with ``from_pretrained`` (a local folder, or a hub id on a machine that can
reach the hub), resolves its adapter as :func:`tokenprune.apply` does (a registered adapter, else the
generic one, else a refusal naming the reason), and runs the engine invariants of
:mod:`tokenprune.testing.adapters` on synthetic images of three sizes and three prompts put through the
model's own processor, with tiny generations. It prints one row per check (``holds``, ``fails`` with
the reason, ``refused`` with the reason) and exits 0 only when every supported insertion point holds.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Annotated, Any

import numpy as np
import torch
import typer
from rich.console import Console
from rich.table import Table

from tokenprune.errors import TokenpruneError, UnsupportedModelError

#: Images of the three samples: sizes differ, and the second sample has two images (the batch check needs
#: ragged token counts, which a model that resizes every image to one size gets only from the image count).
SIZES: tuple[list[tuple[int, int]], ...] = ([(224, 224)], [(336, 224), (224, 448)], [(224, 336)])


def _image(h: int, w: int, seed: int) -> Any:
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))


def processor_inputs(processor: Any, device: str, dtype: torch.dtype) -> Callable[..., dict[str, Any]]:
    """``make_inputs(specs, start=0)`` through ``processor``: a spec is a list of ``(h, w)`` images or ``None``.

    Sample ``i`` gets the prompt and image seeded by ``i``, alone or in a batch (left padding).
    """
    from tokenprune.adapters.loading import image_placeholder

    tokenizer = getattr(processor, "tokenizer", None)
    if tokenizer is not None:
        tokenizer.padding_side = "left"
    token = image_placeholder(processor)

    def make_inputs(specs: Sequence[Any], start: int = 0) -> dict[str, Any]:
        texts, images = [], []
        for i, spec in enumerate(specs, start):
            words = " ".join(["describe", "the", "picture", "in", "detail"][: 3 + i % 3])
            if spec is None:
                texts.append(words)
                images.append([])
            else:
                texts.append("".join(f"{token}\n" for _ in spec) + words)
                images.append([_image(h, w, seed=10 * i + j) for j, (h, w) in enumerate(spec)])
        # one list of images per sample (Gemma 4's processor counts them per sample)
        kwargs = {"images": images} if any(images) else {}
        out = processor(text=texts, return_tensors="pt", padding=True, **kwargs)
        return {
            k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) if isinstance(v, torch.Tensor) else v
            for k, v in out.items()
        }

    return make_inputs


def _checks() -> list[tuple[str, Callable[..., None]]]:
    import functools

    from tokenprune.testing import adapters as kit

    return [
        ("keep-all is identity (post-projector and layer stages)", kit.keep_all_is_identity),
        ("post-projector and layer cut: cached generation equals recomputation", kit.cached_decode_equals_recompute),
        (
            "compact positions: cached generation equals recomputation",
            functools.partial(kit.cached_decode_equals_recompute, positions="compact"),
        ),
        ("KV cache holds the kept tokens", kit.kv_cache_holds_kept_tokens),
        ("batch equals one by one (post-projector and layer cut)", kit.batch_equals_one_by_one),
        ("attention probe matches eager attention", kit.probe_matches_eager_attention),
        ("remove() restores the model", kit.remove_restores_model),
        ("layouts cover the visual tokens", kit.layout_covers_visual_tokens),
    ]


def run_checks(model: Any, processor: Any, device: str, dtype: torch.dtype) -> tuple[str, list[tuple[str, str, str]]]:
    """The adapter's name and ``(check, outcome, detail)`` rows; outcome ``holds``, ``fails`` or ``refused``."""
    from tokenprune.adapters.generic import adapter_for
    from tokenprune.testing.adapters import adapter_case, adapter_check_manager

    manager = adapter_check_manager()
    try:
        adapter = adapter_for(model, manager)
    except UnsupportedModelError as exc:
        return "-", [("adapter", "refused", str(exc))]
    rows: list[tuple[str, str, str]] = [("adapter", "holds", adapter.name)]
    make_inputs = processor_inputs(processor, device, dtype)
    tokenizer = getattr(processor, "tokenizer", None)
    pad = int(getattr(tokenizer, "pad_token_id", None) or 0)
    try:
        case = adapter_case(model, make_inputs, list(SIZES), plugins=manager, pad_token_id=pad)
    except (ValueError, TokenpruneError) as exc:
        return adapter.name, [*rows, ("inputs", "fails", str(exc))]
    for name, check in _checks():
        try:
            check(case)
            rows.append((name, "holds", ""))
        except Exception as exc:
            rows.append((name, "fails", f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"))
    if adapter.vision_tower() is None:
        rows.append(
            ("vision attention (post_projector)", "refused", f"adapter {adapter.name} describes no vision tower")
        )
    return adapter.name, rows


def check(
    model: Annotated[str, typer.Option("--model", "-m", help="Model folder or hub id.")],
    dtype: Annotated[str, typer.Option("--dtype", help="float32, bfloat16 or float16.")] = "float32",
    device: Annotated[str, typer.Option("--device", help="cpu, cuda, cuda:1, ...")] = "cpu",
) -> None:
    """Run the engine invariants on MODEL and print what works and what is refused (exit 0: every check holds)."""
    from transformers import AutoModelForImageTextToText

    from tokenprune.adapters.loading import load_processor

    torch_dtype = getattr(torch, dtype)
    try:
        loaded = AutoModelForImageTextToText.from_pretrained(model, dtype=torch_dtype, attn_implementation="sdpa")
    except (OSError, ValueError) as exc:
        typer.echo(f"error: could not load model {model!r}: {exc}", err=True)
        raise typer.Exit(2) from None
    loaded = loaded.to(device).eval()
    processor = None
    try:
        processor = load_processor(model)
    except (OSError, ValueError, TypeError) as exc:
        processor_error = str(exc)
    else:
        processor_error = ""
    name, rows = run_checks(loaded, processor, device, torch_dtype) if processor is not None else ("-", [])
    if processor is None:
        try:
            from tokenprune.adapters.generic import adapter_for
            from tokenprune.testing.adapters import adapter_check_manager

            name = adapter_for(loaded, adapter_check_manager()).name
            rows = [("adapter", "holds", name), ("inputs", "fails", f"no processor: {processor_error}")]
        except UnsupportedModelError as exc:
            rows = [("adapter", "refused", str(exc))]
    table = Table(title=f"tokenprune check: {model} ({loaded.config.model_type}, adapter {name})")
    for column in ("check", "outcome", "detail"):
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*row)
    Console(width=160).print(table)
    if any(outcome == "fails" for _, outcome, _ in rows) or rows[0][1] == "refused":
        raise typer.Exit(1)
