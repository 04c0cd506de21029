"""ATP training: gradients reach the heads, soft masks match hard pruning, ragged batches, checkpoints, CLI."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from tokenprune_atp import ATPConfig, ATPWeights, ATPWeightsError, atp_pipeline, load_atp
from tokenprune_atp.data import first_question
from tokenprune_atp.softmask import SoftATP
from tokenprune_atp.trainer import ATPTrainConfig, ATPTrainer, atp_loss, train_atp

import tokenprune as tp
from tokenprune.synth.batches import make_batch
from tokenprune.synth.model import TINY, build_model
from tokenprune.synth.processor import build_processor

TINY4 = dataclasses.replace(TINY, text_layers=4)  # hidden 32, 4 decoder layers: modules at 1, 2, 3

# Soft masks with T = 1e6 put a bias of at most -1e6 * |margin| on a pruned key; with margins >= 1e-4
# that is exp(-100) of attention. Observed max |logit difference| vs the hard-pruned engine: ~1e-7.
STEEP = 1e6
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def mini():
    torch.manual_seed(0)
    model = build_model(TINY4, seed=0).eval().requires_grad_(False)  # frozen, as ATPTrainer leaves it
    return model, build_processor()


def random_heads(seed: int = 0, layers=(1, 2, 3), bias=(0.0, 1.5)) -> ATPWeights:
    torch.manual_seed(seed)
    w = ATPWeights(ATPConfig(hidden_size=32, num_layers=4, layers=list(layers)))
    with torch.no_grad():
        for head in w.heads.values():
            head.fc2.weight.normal_(0, 0.5)
            head.fc2.bias.copy_(torch.tensor(bias))
    return w


def sample(batch, i):
    n = int(batch.attention_mask[i].sum())
    return dict(
        input_ids=batch.input_ids[i : i + 1, :n],
        attention_mask=batch.attention_mask[i : i + 1, :n],
        pixel_values=batch.pixel_values[i : i + 1],
        image_sizes=batch.image_sizes[i : i + 1],
    )


def test_gradients_reach_every_threshold_head(mini):
    model, processor = mini
    weights = random_heads()
    batch = make_batch(processor.image_processor, 0, 0, 2)
    cfg = ATPTrainConfig(model="tiny", target_tokens=100)
    with SoftATP(model, weights, temperature=10.0) as soft:
        out = soft.forward(
            batch.input_ids,
            attention_mask=batch.attention_mask,
            pixel_values=batch.pixel_values,
            image_sizes=batch.image_sizes,
        )
    logits = out.logits.float()
    lm = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch.labels.reshape(-1))
    lm.backward(retain_graph=True)  # the language-model loss alone reaches the thresholds, through the attention masks
    for name, p in weights.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    weights.zero_grad()
    loss, parts = atp_loss(out, batch.labels, cfg)  # and so does the budget loss
    loss.backward()
    assert all(p.grad.abs().sum() > 0 for p in weights.parameters())
    assert set(parts) >= {"lm", "tokens", "theta_r1", "theta_s3"}
    assert all(p.requires_grad for p in weights.parameters())


def test_hooks_are_removed(mini):
    model, processor = mini
    batch = make_batch(processor.image_processor, 0, 1, 1)
    inputs = sample(batch, 0)
    with torch.no_grad():
        before = model(**inputs).logits
        with SoftATP(model, random_heads(), 10.0) as soft:
            soft.forward(**inputs)
        after = model(**inputs).logits
    assert torch.equal(before, after)
    assert "get_image_features" not in model.model.__dict__
    assert all(not layer._forward_pre_hooks for layer in model.model.language_model.layers)


def test_steep_soft_masks_match_hard_pruning(mini, tmp_path):
    model, processor = mini
    weights = random_heads(seed=2)
    path = weights.save(tmp_path)
    batch = make_batch(processor.image_processor, 0, 3, 3)
    image_token = model.config.image_token_index
    for i in range(3):
        inputs = sample(batch, i)
        after_image = (
            int(inputs["input_ids"].shape[1]) - 1 - int((inputs["input_ids"][0] == image_token).nonzero().max())
        )
        with torch.no_grad():
            with SoftATP(model, weights, temperature=STEEP) as soft:
                out = soft.forward(**inputs)
            with tp.apply(model, atp_pipeline(path)) as run:
                hard = model(**inputs).logits
        stages = run.stats.last_prefill.stages
        assert [s.leaving[0] for s in stages] == out.hard_counts[0, 1:].tolist()
        assert stages[-1].leaving[0] < stages[0].entering[0]  # something was pruned
        diff = (out.logits[:, -after_image:] - hard[:, -after_image:]).abs().max()
        assert diff < TOLERANCE, float(diff)


def test_ragged_batch_equals_samples_one_by_one(mini, tmp_path):
    model, processor = mini
    path = random_heads(seed=5).save(tmp_path)
    batch = make_batch(processor.image_processor, 1, 0, 4)
    full = dict(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        pixel_values=batch.pixel_values,
        image_sizes=batch.image_sizes,
    )
    with torch.no_grad(), tp.apply(model, atp_pipeline(path)) as run:
        batched = model(**full).logits[:, -1]
        counts = [s.leaving for s in run.stats.last_prefill.stages]
        alone = []
        for i in range(4):
            alone.append(model(**sample(batch, i)).logits[:, -1])
            assert [s.leaving[0] for s in run.stats.last_prefill.stages] == [c[i] for c in counts]
    assert len(set(counts[-1])) > 1, counts  # samples really keep different numbers of tokens
    assert torch.allclose(batched, torch.cat(alone), atol=1e-5), (batched - torch.cat(alone)).abs().max()


def test_training_writes_weights_and_resumes_exactly(mini, tmp_path):
    model, processor = mini
    cfg = ATPTrainConfig(
        model="tiny", target_tokens=150, steps=4, batch_size=2, checkpoint_every=2, calibration_images=0
    )
    straight = train_atp(cfg, tmp_path / "a", model=model, processor=processor, progress=False)
    assert straight is not None and straight.name == "atp.safetensors" and (tmp_path / "a" / "atp.json").is_file()
    trainer = ATPTrainer(cfg, tmp_path / "b", model=model, processor=processor)
    assert not any(p.requires_grad for p in model.parameters())  # the base model is frozen by default
    trainer.run(progress=False, stop_after=2)  # "interrupted" after the checkpoint at step 2
    assert trainer.step == 2 and (tmp_path / "b" / "state.pt").is_file()
    resumed = train_atp(cfg, tmp_path / "b", model=model, processor=processor, progress=False)
    a, b = load_atp(straight, model), load_atp(resumed, model)
    for (k, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.allclose(x, y, atol=1e-7), k
    assert any(
        not torch.equal(x, y)
        for x, y in zip(a.state_dict().values(), random_heads().state_dict().values(), strict=True)
    )
    other = dataclasses.replace(cfg, target_tokens=99)
    with pytest.raises(ValueError, match="target_tokens=150"):
        ATPTrainer(other, tmp_path / "b", model=model, processor=processor).load_state(tmp_path / "b" / "state.pt")


def test_weights_for_another_model_are_refused(mini):
    model, _ = mini
    weights = ATPWeights(ATPConfig(hidden_size=64, num_layers=4, layers=[1, 2, 3]))
    with pytest.raises(ATPWeightsError, match=r"hidden size 64 \(the model's is 32\)"):
        SoftATP(model, weights)


def test_cli(mini, tmp_path):
    import typer
    from tokenprune_atp.cli import train_atp as command
    from typer.testing import CliRunner

    model, processor = mini
    model.save_pretrained(tmp_path / "vlm")
    processor.save_pretrained(tmp_path / "vlm")
    app = typer.Typer()
    app.command()(command)
    runner = CliRunner()
    args = [
        "--model",
        str(tmp_path / "vlm"),
        "--target-tokens",
        "150",
        "--steps",
        "1",
        "--batch-size",
        "1",
        "--no-progress",
        "--calibration-images",
        "2",
    ]
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "run"), "--layers", "1", "--layers", "3"])
    assert result.exit_code == 0, result.output
    assert "modules at layers [1, 3]" in result.output
    assert load_atp(tmp_path / "run", model).config.layers == [1, 3]
    bad = runner.invoke(app, [*args, "--out", str(tmp_path / "bad"), "--layers", "4"])
    assert bad.exit_code == 2 and "1 <= k < 4" in bad.output


def test_train_llm_fine_tunes_the_language_model_only(tmp_path):
    model = build_model(TINY4, seed=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = ATPTrainConfig(
        model="tiny", target_tokens=150, steps=1, batch_size=1, train_llm=True, llm_lr=1e-2, calibration_images=0
    )
    path = train_atp(cfg, tmp_path, model=model, processor=build_processor(), progress=False)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any("language_model" in k for k in changed)
    assert not any("vision_tower" in k or "multi_modal_projector" in k for k in changed)
    assert (tmp_path / "model" / "config.json").is_file() and path is not None


def test_first_question_batches_are_evaluation_prompts():
    processor = build_processor()
    batch = make_batch(processor.image_processor, 0, 7, 3)
    cut = first_question(batch)
    tok = processor.tokenizer
    for i in range(3):
        n = int(cut.attention_mask[i].sum())
        assert (cut.labels[i] != -100).nonzero().flatten().tolist() == [n - 1]  # one answer, at the last token
        words = tok.convert_ids_to_tokens(cut.input_ids[i, :n].tolist())
        assert words[0] == "<s>" and words[-1] in ("?", ":") and "?" not in words[:-1]  # <s> <image>... question
        assert torch.equal(cut.input_ids[i, :n], batch.input_ids[i, :n])  # a prefix of the original row
        assert cut.labels[i, n - 1] == batch.labels[i, n - 1]


def test_calibration_moves_the_hard_average_to_the_target(mini, tmp_path):
    model, processor = mini
    cfg = ATPTrainConfig(model="tiny", target_tokens=120, steps=1, batch_size=2, calibration_images=4)
    path = train_atp(cfg, tmp_path, model=model, processor=processor, progress=False)
    record = load_atp(path).config.train["calibration"]
    assert abs(record["after"] - 120) < abs(record["before"] - 120)
    assert abs(record["after"] - 120) < 0.1 * 120, record
    trainer = ATPTrainer(cfg, tmp_path / "check", model=model, processor=processor)
    trainer.weights = load_atp(path)
    with SoftATP(model, trainer.weights) as soft:
        assert trainer.hard_average(soft, 4) == pytest.approx(record["after"])  # the file holds the shift


def test_the_calibration_bracket_widens_past_saturated_heads():
    """A head saturated at sigmoid 0.0004 (logit -7.8) barely moves under a 4-logit shift: the bracket must
    widen (the target-96 run stopped at +3.98 of at most +4 and kept 120 tokens)."""
    from tokenprune_atp.trainer import SHIFT_LIMIT, bracketed_shift

    def saturated(shift: float) -> float:  # tokens fall from 125 to 65 only once the shift nears +8
        return 65.0 + 60.0 * (1.0 - torch.sigmoid(torch.tensor(shift - 7.8)).item())

    calls: list[float] = []

    def measure(shift: float) -> float:
        calls.append(shift)
        return saturated(shift)

    shift, got = bracketed_shift(measure, 96.0, saturated(0.0), iterations=8)
    assert shift > 4.0 and abs(got - 96.0) < 0.3
    assert max(calls) == 8.0  # one doubling was enough
    low_shift, low_got = bracketed_shift(saturated, 140.0, saturated(0.0), iterations=8)  # more tokens: negative
    assert low_shift == -SHIFT_LIMIT and low_got == pytest.approx(saturated(-SHIFT_LIMIT))  # unreachable: the edge
    near_shift, near_got = bracketed_shift(lambda s: 120.0 - 2.0 * s, 116.0, 120.0, iterations=8)
    assert near_shift == pytest.approx(2.0) and near_got == pytest.approx(116.0)  # inside the first bracket
