"""The lmms-eval model `tokenprune`, driven through lmms-eval's own model API with local requests."""

import pytest
import torch
from lmms_eval.api.instance import Instance
from PIL import Image

import tokenprune as tp
from tokenprune.errors import TokenpruneError
from tokenprune.integrations.lmms_eval import TokenpruneLMM
from tokenprune.loading import load_model

COLOURS = ["red", "blue", "green", "yellow"]
PIPELINE = "stages:\n  - {at: post_projector, reducer: random, keep: 0.5}\n"


def _docs():
    sizes = [(64, 32), (32, 96), (64, 64), (96, 32)]
    return [
        {"image": Image.new("RGB", size, c), "question": "what colour is the background ?", "answer": c}
        for size, c in zip(sizes, COLOURS, strict=True)
    ]


def _requests(kind, docs, gen_kwargs=None):
    out = []
    for i, doc in enumerate(docs):
        if kind == "generate_until":
            args = (
                doc["question"],
                dict(gen_kwargs or {"max_new_tokens": 1}),
                lambda d: [d["image"]],
                i,
                "colours",
                "test",
            )
        else:
            args = (doc["question"] + " ", doc["answer"], lambda d: [d["image"]], i, "colours", "test")
        out.append(
            Instance(request_type=kind, arguments=args, idx=0, metadata={"task": "colours", "doc_id": i, "repeats": 1})
        )
    return out


@pytest.fixture
def lmm(tiny_model_dir, tmp_path):
    path = tmp_path / "pipe.yaml"
    path.write_text(PIPELINE)
    model = TokenpruneLMM(pretrained=str(tiny_model_dir), pipeline=str(path), batch_size="3", device="cpu")
    model.task_dict = {"colours": {"test": _docs()}}
    yield model
    model.run.remove()


def test_lmms_eval_finds_the_model_through_its_entry_point():
    import lmms_eval.models

    assert lmms_eval.models.get_model("tokenprune") is TokenpruneLMM


def test_generate_until_equals_generate_under_the_pipeline_one_by_one(lmm, tiny_model_dir):
    docs = _docs()
    answers = lmm.generate_until(_requests("generate_until", docs, {"max_new_tokens": 2}))
    model, processor = load_model(str(tiny_model_dir))
    expected = []
    with tp.apply(model, PIPELINE):
        for doc in docs:
            inputs = processor(images=[doc["image"]], text=[f"<image>\n{doc['question']}"], return_tensors="pt")
            with torch.inference_mode():
                out = model.generate(
                    **inputs, max_new_tokens=2, do_sample=False, pad_token_id=processor.tokenizer.pad_token_id
                )
            expected.append(
                processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()
            )
    assert answers == expected and len(answers) == 4


def test_until_strings_cut_the_answer(lmm):
    full = lmm.generate_until(_requests("generate_until", _docs()[:1], {"max_new_tokens": 3}))[0]
    assert len(full) >= 2, f"three new tokens decoded to {full!r}"
    stop = full[len(full) // 2 :]  # a suffix of the answer: the cut is the text before its first occurrence
    cut = lmm.generate_until(_requests("generate_until", _docs()[:1], {"max_new_tokens": 3, "until": [stop]}))[0]
    assert cut == full[: full.index(stop)].strip()
    assert len(cut) < len(full)


def test_loglikelihood_is_the_sum_of_the_continuation_log_probs(lmm, tiny_model_dir):
    docs = _docs()
    got = lmm.loglikelihood(_requests("loglikelihood", docs))
    model, processor = load_model(str(tiny_model_dir))
    with tp.apply(model, PIPELINE):
        for (total, greedy), doc in zip(got, docs, strict=True):
            text = f"<image>\n{doc['question']} {doc['answer']}"
            inputs = processor(images=[doc["image"]], text=[text], return_tensors="pt")
            with torch.inference_mode():
                logits = model(**inputs).logits[0, -2].float()
            target = processor.tokenizer(doc["answer"], add_special_tokens=False)["input_ids"][0]
            logprobs = torch.log_softmax(logits, -1)
            assert total == pytest.approx(float(logprobs[target]), abs=1e-5)
            assert greedy == (int(logprobs.argmax()) == target)


def test_unknown_model_args_are_named(tiny_model_dir):
    with pytest.raises(TokenpruneError, match=r"unknown model_args \['conv_template'\]"):
        TokenpruneLMM(pretrained=str(tiny_model_dir), conv_template="vicuna")
