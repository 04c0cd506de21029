"""The lmms-eval model `tokenprune`, driven through lmms-eval's own model API with local requests."""

import pytest
import torch
from lmms_eval.api.instance import Instance
from PIL import Image

import tokenprune as tp
from tokenprune.adapters.loading import load_model
from tokenprune.errors import TokenpruneError
from tokenprune.integrations.lmms_eval import TokenpruneLMM

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


def test_loglikelihood_is_the_continuations_mean_negative_log_likelihood(lmm, tiny_model_dir):
    """lmms-eval's convention (its LLaVA returns outputs.loss; multiple_choice takes the argmin)."""
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
            assert total == pytest.approx(-float(logprobs[target]), abs=1e-5)  # one token: mean == sum
            assert greedy == (int(logprobs.argmax()) == target)


def test_unknown_model_args_are_named(tiny_model_dir):
    with pytest.raises(TokenpruneError, match=r"unknown model_args \['conv_template'\]"):
        TokenpruneLMM(pretrained=str(tiny_model_dir), conv_template="vicuna")


# --- the defects found running lmms-eval as researchers do -------------------------------------------


def _model_args(tiny_model_dir, **extra):
    return ",".join(f"{k}={v}" for k, v in {"pretrained": tiny_model_dir, "device": "cpu", **extra}.items())


@pytest.mark.parametrize(
    ("model_args", "cli", "expected"), [({"batch_size": 3}, 3, 3), ({}, "auto", 64), ({}, "auto:4", 64)]
)
def test_the_cli_batch_size_is_taken_once(tiny_model_dir, model_args, cli, expected):
    """lmms-eval always passes --batch_size next to --model_args; the same value twice, and auto, are fine."""
    lmm = TokenpruneLMM.create_from_arg_string(
        _model_args(tiny_model_dir, **model_args), {"batch_size": cli, "max_batch_size": None, "device": None}
    )
    lmm.run.remove()
    assert lmm.batch_size == expected


def test_a_batch_size_given_twice_differently_is_refused(tiny_model_dir):
    with pytest.raises(TokenpruneError, match="batch_size=3 disagrees with --batch_size 5; give it once"):
        TokenpruneLMM.create_from_arg_string(_model_args(tiny_model_dir, batch_size=3), {"batch_size": 5})


def test_auto_batch_size_halves_on_out_of_memory(lmm, monkeypatch):
    lmm.batch_size_per_gpu, lmm.auto_batch = 4, True
    real, sizes = lmm.model.generate, []

    def generate(**kwargs):
        sizes.append(int(kwargs["input_ids"].shape[0]))
        if sizes[-1] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(**kwargs)

    monkeypatch.setattr(lmm.model, "generate", generate)
    answers = lmm.generate_until(_requests("generate_until", _docs(), {"max_new_tokens": 1}))
    assert sizes == [4, 2, 2] and lmm.batch_size == 2 and len(answers) == 4


def test_each_request_keeps_its_own_generation_settings(lmm):
    """Requests of two tasks interleaved in one call: each is generated with its own max_new_tokens."""
    docs = _docs()
    short = _requests("generate_until", docs, {"max_new_tokens": 1})
    long = _requests("generate_until", docs, {"max_new_tokens": 3})
    mixed = [r for pair in zip(short, long, strict=True) for r in pair]
    answers = lmm.generate_until(mixed)
    assert answers[0::2] == lmm.generate_until(short)
    assert answers[1::2] == lmm.generate_until(long)
    assert all(len(a.split()) > len(b.split()) for a, b in zip(answers[1::2], answers[0::2], strict=True))


def test_generation_settings_reach_generate(lmm, monkeypatch):
    real, seen = lmm.model.generate, []

    def generate(**kwargs):
        seen.append(kwargs)
        return real(**kwargs)

    monkeypatch.setattr(lmm.model, "generate", generate)
    lmm.generate_until(_requests("generate_until", _docs()[:1], {"max_new_tokens": 2, "num_beams": 2}))
    lmm.generate_until(
        _requests(
            "generate_until", _docs()[:1], {"max_new_tokens": 2, "do_sample": True, "top_p": 0.5, "temperature": 0.7}
        )
    )
    assert seen[0]["num_beams"] == 2 and seen[0]["do_sample"] is False and "top_p" not in seen[0]
    assert (seen[1]["do_sample"], seen[1]["top_p"], seen[1]["temperature"]) == (True, 0.5, 0.7)
    with pytest.raises(ValueError, match="not_a_generate_argument"):
        lmm.generate_until(_requests("generate_until", _docs()[:1], {"not_a_generate_argument": 1}))


def test_until_stops_generation_early(lmm):
    """The stop strings end generation (not only cut the text afterwards)."""
    calls = []
    handle = lmm.model.register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        first = lmm.generate_until(_requests("generate_until", _docs()[:1], {"max_new_tokens": 1}))[0]
        calls.clear()
        lmm.generate_until(_requests("generate_until", _docs()[:1], {"max_new_tokens": 8}))
        unstopped = len(calls)
        calls.clear()
        cut = lmm.generate_until(_requests("generate_until", _docs()[:1], {"max_new_tokens": 8, "until": [first]}))[0]
    finally:
        handle.remove()
    assert cut == ""
    assert unstopped == 8 and len(calls) == 1  # the first token already holds the stop string: no decoding step


def test_a_continuation_appended_without_a_space_is_scored(lmm, tiny_model_dir):
    docs = _docs()
    requests = [
        Instance(
            request_type="loglikelihood",
            arguments=(doc["question"], doc["answer"], lambda d: [d["image"]], i, "colours", "test"),
            idx=0,
            metadata={"task": "colours", "doc_id": i, "repeats": 1},
        )
        for i, doc in enumerate(docs)
    ]
    separate = lmm.loglikelihood(requests)
    spaced = lmm.loglikelihood(_requests("loglikelihood", docs))  # "question " + "answer": the same tokens
    assert [r[0] for r in separate] == pytest.approx([r[0] for r in spaced], abs=1e-5)
    assert [r[1] for r in separate] == [r[1] for r in spaced]


def test_loglikelihood_results_survive_lmms_evals_unwrapping(lmm):
    from lmms_eval.api.instance import unwrap_generation_output

    result = lmm.loglikelihood(_requests("loglikelihood", _docs()[:1]))[0]
    unwrapped, _ = unwrap_generation_output(result)
    assert type(unwrapped) is tuple and unwrapped == result
    assert isinstance(result, tuple) and result == (result[0], result[1])
    total, greedy = result
    assert isinstance(total, float) and isinstance(greedy, bool)
