"""`tokenprune compare` on a video task: a tiny LLaVA-OneVision saved to disk, a jsonl task of frame files.

transformers' LLaVA-OneVision processor cannot be built without torchvision (it builds a video processor), so
the checkpoint loads with tokenprune's FramesProcessor (its tokenizer and image processor) and the harness
prepares the frames itself (tokenprune/bench/video_inputs.py). The video pipelines of examples/compare-video.yaml
(DyCoke, VidCom2, HoliTom, random) run at budgets matched on this video.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tiny_models as tm
import torch
import yaml
from PIL import Image
from typer.testing import CliRunner

from tokenprune.cli import app

FRAMES = 8


@pytest.fixture(scope="module")
def video_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny LLaVA-OneVision with a word-level tokenizer (``<image>``, ``<video>``) and its image processor."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from tokenprune.engine import compat

    t = tm.llava_onevision()
    folder = tmp_path_factory.mktemp("tiny-onevision")
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "<image>": tm.IMAGE_TOKEN, "<video>": tm.VIDEO_TOKEN}
    vocab.update({f"w{i}": i for i in range(10, 200)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>", "video_token": "<video>"},
    )
    t.model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    compat.image_processor_class("LlavaOnevision")(size={"height": 56, "width": 56}).save_pretrained(folder)
    return folder


def _task(folder: Path) -> Path:
    """Two examples, each a video of 8 frames (the first four one still picture) and a question."""
    gen = np.random.default_rng(0)
    lines = []
    for e in range(2):
        still = gen.integers(0, 255, (56, 56, 3), dtype=np.uint8)
        names = []
        for f in range(FRAMES):
            pixels = still if f < 4 else gen.integers(0, 255, (56, 56, 3), dtype=np.uint8)
            name = f"v{e}-f{f}.png"
            Image.fromarray(pixels).save(folder / name)
            names.append(name)
        lines.append(json.dumps({"id": f"v{e}", "video": names, "question": f"w{20 + e} w30 w31", "answer": "w40"}))
    path = folder / "videos.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_compare_runs_the_video_pipelines_on_a_video_task(video_model, tmp_path):
    # 8 frames of 2 x 2 tokens and the video newline: DyCoke at keep 0.3 prunes the odd frames, then frame 2 (the
    # windows of four, the last one left whole as on 32 frames in examples/compare-video.yaml), to int(0.3 * 4) = 1
    # token: 3 * 4 + 5 = 17 and the newline; VidCom2 gets that count (17, the newline kept on top), random 18 (its
    # count includes the protected newline)
    config = {
        "model": str(video_model),
        "output": str(tmp_path / "run"),
        "batch_size": 2,
        "resamples": 100,
        "tasks": [{"name": "jsonl", "path": str(_task(tmp_path)), "max_new_tokens": 2}],
        "metrics": ["accuracy", "agreement", "kl"],
        "heatmaps": 0,
        "timing": {"repeats": 1, "warmup": 0, "memory": False},
        "pipelines": [
            {
                "name": "dycoke",
                "stages": [{"at": "post_projector", "tokens": "video", "reducer": "dycoke", "keep": 0.3}],
            },
            {
                "name": "vidcom2",
                "stages": [{"at": "post_projector", "tokens": "video", "reducer": "vidcom2", "keep": 17}],
            },
            {
                "name": "holitom",
                "stages": [{"at": "post_projector", "tokens": "video", "reducer": "holitom", "keep": 0.5}],
            },
            {
                "name": "random",
                "stages": [{"at": "post_projector", "tokens": "video", "reducer": "random", "keep": 18}],
            },
        ],
    }
    path = tmp_path / "compare.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    result = CliRunner().invoke(app, ["compare", str(path)])
    assert result.exit_code == 0, result.output
    rows = {r["pipeline"]: r for r in json.loads((tmp_path / "run" / "summary.json").read_text())["pipelines"]}
    assert set(rows) == {"unpruned", "dycoke", "vidcom2", "holitom", "random"}
    assert all(r["n"] == 2 for r in rows.values())
    full = rows["unpruned"]["visual_tokens"]
    assert full == FRAMES * 4 + 1  # the model's own count: 8 pooled 2 x 2 frames and the newline
    for name in ("dycoke", "vidcom2", "holitom", "random"):
        assert rows[name]["visual_tokens"] < full, name
    assert rows["dycoke"]["visual_tokens"] == rows["vidcom2"]["visual_tokens"] == rows["random"]["visual_tokens"] == 18
    assert rows["unpruned"]["agreement"] == 1.0
    assert torch.isfinite(torch.tensor([r["kl"] for r in rows.values() if r["kl"] is not None])).all()
