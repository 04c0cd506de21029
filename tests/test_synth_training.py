"""Training loop of the mini VLM on a tiny model built from config (no shipped weights needed)."""

import dataclasses
import json

import pytest
import torch
from transformers import AutoProcessor, LlavaNextForConditionalGeneration, LlavaNextProcessor

from tokenprune.synth.evaluate import evaluate
from tokenprune.synth.model import TINY
from tokenprune.synth.questions import heldout_split
from tokenprune.synth.train import LOG_FILE, STATE_FILE, TrainConfig, Trainer, lr_at

CFG = TrainConfig(
    steps=4,
    batch_size=2,
    warmup_steps=1,
    eval_every=0,
    checkpoint_every=100,
    bf16=False,
    threads=1,
    size=TINY,
    curriculum_fraction=0.5,
)


def _forward(model, batch, **kwargs):
    """The model's forward pass on a training batch (what ``Trainer.train_step`` runs)."""
    return model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        pixel_values=batch.pixel_values,
        image_sizes=batch.image_sizes,
        **kwargs,
    )


def test_training_steps_lower_the_loss_on_a_fixed_batch(tmp_path):
    trainer = Trainer(dataclasses.replace(CFG, lr=3e-3, steps=100, warmup_steps=1), tmp_path)
    batch = trainer.batch(0)
    first = trainer.train_step(batch)
    for _ in range(14):
        last = trainer.train_step(batch)
    assert last["loss"] < 0.8 * first["loss"]
    assert last["aux"] < 0.8 * first["aux"]


def test_same_seed_same_weights(tmp_path):
    a, b = Trainer(CFG, tmp_path / "a"), Trainer(CFG, tmp_path / "b")
    a.run(progress=False)
    b.run(progress=False)
    for (name, x), y in zip(a.model.state_dict().items(), b.model.state_dict().values(), strict=True):
        assert torch.equal(x, y), name


def test_resume_equals_uninterrupted_run(tmp_path):
    full = Trainer(CFG, tmp_path / "full")
    full.run(progress=False)

    first = Trainer(CFG, tmp_path / "split")
    first.run(progress=False, stop_after=2)
    assert first.step == 2 and (tmp_path / "split" / STATE_FILE).exists()
    second = Trainer(CFG, tmp_path / "split")
    second.load_state(tmp_path / "split" / STATE_FILE)
    assert second.step == 2
    second.run(progress=False)
    assert second.step == full.step == CFG.steps
    for (name, x), y in zip(full.model.state_dict().items(), second.model.state_dict().values(), strict=True):
        assert torch.equal(x, y), name
    assert torch.equal(full.aux.proj.weight, second.aux.proj.weight)


def test_resume_refuses_a_different_config(tmp_path):
    Trainer(CFG, tmp_path).save_state()
    other = Trainer(dataclasses.replace(CFG, lr=1.0), tmp_path)
    with pytest.raises(ValueError, match="lr="):
        other.load_state(tmp_path / STATE_FILE)


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"exists_head": 0}, "heads 1..1"),
        ({"exists_head": 2}, "heads 1..1"),
        ({"exists_head": 1, "ground_absent": True}, "choose one"),
    ],
)
def test_exists_head_is_validated(tmp_path, changes, match):
    with pytest.raises(ValueError, match=match):
        Trainer(dataclasses.replace(CFG, **changes), tmp_path)


def test_resume_refuses_a_changed_recipe_unless_a_new_stage(tmp_path):
    first = Trainer(CFG, tmp_path)
    first.run(progress=False, stop_after=2)
    other = Trainer(dataclasses.replace(CFG, exists_head=1), tmp_path)
    with pytest.raises(ValueError, match=r"exists_head=None.*--new-stage"):
        other.load_state(tmp_path / STATE_FILE)
    assert other.step == 0  # nothing was loaded
    other.load_state(tmp_path / STATE_FILE, new_stage=True)
    assert other.step == 2
    assert torch.equal(other.model.lm_head.weight, first.model.lm_head.weight)
    events = [json.loads(line) for line in (tmp_path / LOG_FILE).read_text().splitlines()]
    assert {"event": "stage", "at_step": 2, "changed": {"exists_head": [None, 1]}} in events
    other.run(progress=False)
    assert other.step == CFG.steps
    # the state now carries the second stage's recipe: resuming it again needs no flag
    Trainer(dataclasses.replace(CFG, exists_head=1), tmp_path).load_state(tmp_path / STATE_FILE)


def test_a_new_stage_cannot_change_the_model_or_the_optimiser(tmp_path):
    Trainer(CFG, tmp_path).save_state()
    other = Trainer(dataclasses.replace(CFG, lr=1e-4, exists_head=1, steps=CFG.steps + 2), tmp_path)
    with pytest.raises(ValueError, match="lr=") as err:
        other.load_state(tmp_path / STATE_FILE, new_stage=True)
    assert "--new-stage" not in str(err.value)
    assert not (tmp_path / LOG_FILE).exists()  # a refused resume logs no schedule or stage change


def test_question_classifier_reads_the_query_position_of_the_grounding_layer(tmp_path):
    """The question loss is computed on the grounding layer's input at each existence question's last token."""
    trainer = Trainer(dataclasses.replace(CFG, question_weight=1.0), tmp_path)
    batch = trainer.batch(50)
    assert batch.question_rows.numel() > 0
    trainer.model.eval()
    with torch.no_grad():
        out = _forward(trainer.model, batch, output_hidden_states=True)
        hidden = out.hidden_states[CFG.ground_layer][batch.question_rows, batch.question_query]
        expected = trainer.aux.question_loss(hidden, batch.question_labels)
    stats = trainer.train_step(batch)
    assert stats["question"] == pytest.approx(float(expected), rel=1e-5)


def test_question_loss_trains_and_is_off_by_default(tmp_path):
    on = Trainer(dataclasses.replace(CFG, question_weight=1.0, lr=3e-3, steps=100), tmp_path / "on")
    batch = on.batch(50)
    first = on.train_step(batch)["question"]
    for _ in range(14):
        last = on.train_step(batch)["question"]
    assert last < 0.5 * first
    off = Trainer(CFG, tmp_path / "off")
    before = off.aux.question.weight.clone()
    assert off.train_step(batch)["question"] == 0.0
    assert torch.equal(off.aux.question.weight, before)


def test_state_written_before_the_question_classifier_resumes_exactly(tmp_path):
    """A state without the question classifier (older runs) resumes every other parameter bit for bit."""
    full = Trainer(CFG, tmp_path / "full")
    full.run(progress=False)
    first = Trainer(CFG, tmp_path / "old")
    first.run(progress=False, stop_after=2)
    state = torch.load(tmp_path / "old" / STATE_FILE, weights_only=False)  # rewrite it in the old layout
    state["aux"] = {k: v for k, v in state["aux"].items() if not k.startswith("question.")}
    legacy = first._optimizer(skip=tuple(first.aux.question.parameters()))
    assert all(p not in first.opt.state for p in first.aux.question.parameters())  # weight 0: never stepped
    legacy.state.update(first.opt.state)
    state["optimizer"] = legacy.state_dict()
    torch.save(state, tmp_path / "old" / STATE_FILE)
    resumed = Trainer(CFG, tmp_path / "old")
    resumed.load_state(tmp_path / "old" / STATE_FILE)
    resumed.run(progress=False)
    for (name, x), y in zip(full.model.state_dict().items(), resumed.model.state_dict().values(), strict=True):
        assert torch.equal(x, y), name


def test_lr_schedule_warms_up_and_decays():
    cfg = TrainConfig(steps=1000, warmup_steps=100, lr=1e-3, min_lr_fraction=0.1)
    assert lr_at(0, cfg) < lr_at(99, cfg) == pytest.approx(1e-3)
    assert lr_at(500, cfg) < 1e-3
    assert lr_at(1000, cfg) == pytest.approx(1e-4)


def test_export_loads_with_from_pretrained(tmp_path):
    trainer = Trainer(CFG, tmp_path)
    trainer.run(progress=False)
    out = tmp_path / "model"
    assert (out / "model.safetensors").is_file()
    model = LlavaNextForConditionalGeneration.from_pretrained(out)
    processor = AutoProcessor.from_pretrained(out)
    assert isinstance(processor, LlavaNextProcessor)
    samples = heldout_split(2)
    before = evaluate(trainer.model, trainer.processor, samples).predictions
    after = evaluate(model, processor, samples).predictions
    assert before == after


def test_export_over_a_package_folder_keeps_its_python_files(tmp_path):
    """Installing into tokenprune/synth/checkpoint must not delete the package's __init__.py."""
    out = tmp_path / "checkpoint"
    out.mkdir()
    (out / "__init__.py").write_text('"""package data"""\n')
    (out / "stale.bin").write_bytes(b"old weights")
    Trainer(CFG, tmp_path / "run").export(out)
    assert (out / "__init__.py").read_text() == '"""package data"""\n'
    assert not (out / "stale.bin").exists() and (out / "model.safetensors").is_file()
    assert not out.with_name("checkpoint.old").exists() and not out.with_name("checkpoint.tmp").exists()


def test_random_keep_path_matches_unpruned_at_keep_one(tmp_path):
    """keep_fraction=1 goes through get_image_features + inputs_embeds and must agree exactly."""
    trainer = Trainer(CFG, tmp_path)
    samples = heldout_split(3)
    full = evaluate(trainer.model, trainer.processor, samples).predictions
    kept = evaluate(trainer.model, trainer.processor, samples, keep_fraction=1.0).predictions
    assert full == kept


def _set_attn(model, impl):
    for mod in model.modules():
        cfg = getattr(mod, "config", None)
        if cfg is not None and hasattr(cfg, "_attn_implementation"):
            cfg._attn_implementation = impl


@pytest.mark.parametrize("exists_head", [None, 1])
def test_grounding_loss_is_minus_log_attention_mass_of_eager_head(tmp_path, exists_head):
    """The recomputed attention of each question's head equals eager attention's, so the loss trains the real heads."""
    trainer = Trainer(dataclasses.replace(CFG, exists_head=exists_head), tmp_path)
    batch = trainer.batch(50)
    assert batch.ground_rows.numel() > 0
    assert (batch.ground_heads == 1).any() == (exists_head == 1)
    trainer.model.eval()
    _set_attn(trainer.model, "eager")
    with torch.no_grad():
        out = _forward(trainer.model, batch, output_attentions=True)
        loss = trainer.grounding_loss(batch)
    attn = out.attentions[CFG.ground_layer]  # (B, heads, L, L)
    expected = torch.stack(
        [
            -attn[r, h, q][t].sum().log()
            for r, h, q, t in zip(
                batch.ground_rows.tolist(),
                batch.ground_heads.tolist(),
                batch.ground_query.tolist(),
                batch.ground_targets,
                strict=True,
            )
        ]
    ).mean()
    assert torch.allclose(loss, expected, atol=1e-5)


def test_quadrant_classifier_reads_the_projector_output(tmp_path):
    """The quadrant loss reaches the projector (what the LM sees); kind/colour/digit stay on the tower."""
    trainer = Trainer(CFG, tmp_path)
    batch = trainer.batch(0)
    _forward(trainer.model, batch)
    assert trainer._projected is not None and trainer._vision_tokens is not None
    quadrant_only = batch.patch_labels.clone()
    quadrant_only[..., :3] = -100
    loss = trainer.aux.loss(trainer._vision_tokens[:, 1:], trainer._projected, quadrant_only)
    loss.backward()
    projector = trainer.model.model.multi_modal_projector
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in projector.parameters())
    assert trainer.aux.quadrant.weight.grad.abs().sum() > 0
    assert trainer.aux.proj.weight.grad is None


def test_train_command_passes_every_recipe_option_to_the_config(tmp_path, monkeypatch):
    """`tokenprune synth train --ground-weight/--ground-layer` reach TrainConfig (they were once dropped)."""
    from typer.testing import CliRunner

    import tokenprune.synth.train as train_module
    from tokenprune.synth.cli import app

    seen: list[TrainConfig] = []
    monkeypatch.setattr(train_module, "train", lambda cfg, *args, **kwargs: seen.append(cfg))
    args = ["train", str(tmp_path), "--ground-weight", "0.25", "--ground-layer", "2", "--aux-weight", "0.5"]
    args += ["--curriculum", "0.3", "--exists-head", "1", "--bf16", "--eval-every", "7", "--seed", "5"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    cfg = seen[0]
    assert (cfg.ground_weight, cfg.ground_layer, cfg.aux_weight) == (0.25, 2, 0.5)
    assert (cfg.curriculum_fraction, cfg.exists_head, cfg.bf16, cfg.eval_every, cfg.seed) == (0.3, 1, True, 7, 5)
    assert cfg.steps == TrainConfig().steps  # an option left out keeps the config's default
