"""The engine invariants as checks, for adapter authors: test a new adapter as the built-ins are tested.

Every built-in adapter is tested with these functions on a tiny random model
(``tests/test_engine_invariants.py``); a third-party adapter package runs the same checks on a tiny
model of its architecture::

    from tokenprune.testing.adapters import check_adapter

    def test_my_adapter_keeps_the_engine_invariants():
        model = build_tiny_model()                     # sdpa attention, eval mode, >= 3 decoder layers
        check_adapter(model, make_inputs, [(56, 56), (56, 112), (112, 112)])

The six invariants (each is also a function of its own):

1. :func:`check_keep_all_is_identity`: a keep-all pipeline gives bit-identical logits and
   generations (batch of 3 with left padding, one sample text-only);
2. :func:`check_cached_decode_equals_recompute`: cached decoding after a pruned prefill equals a
   no-cache recompute of the whole sequence (1e-5), with ``original`` and ``compact`` positions;
3. :func:`check_kv_cache_holds_kept_tokens`: every layer's KV cache holds exactly the tokens the
   pipeline keeps there;
4. :func:`check_remove_restores_model`: after ``remove()``, outputs and ``state_dict`` are
   bit-identical, the attention implementation is restored and no hook is left;
5. :func:`check_batch_equals_one_by_one`: images of different sizes with per-sample keep counts
   give each sample the same tokens and logits (1e-5) as when it runs alone;
6. :func:`check_probe_matches_eager_attention`: the attention probe's scores equal eager attention
   weights (1e-6) while every layer ran stock sdpa.

:func:`check_adapter` also runs :func:`check_rotary_matches_model`: the adapter's ``rotary`` gives
the model's own position embeddings (a wrong one would pass the six, see its docstring), and
:func:`check_layout_covers_visual_tokens` and :func:`check_vision_patches_map_to_tokens` (an adapter
that describes its vision tower maps each vision patch to exactly the post-projector tokens built from
it). It checks its arguments once into an :class:`AdapterCase`
(:func:`adapter_case`) and runs the tuples :data:`INVARIANTS` and :data:`ADAPTER_CHECKS` on it; each
entry is a function of the case, and ``check_<function>(model, make_inputs, specs, ...)`` its
standalone form.

What the checks need from you:

* ``model``: the top-level ``...ForConditionalGeneration`` model in eval mode, built with
  ``attn_implementation="sdpa"``, with at least 3 decoder layers (the pipelines prune after the
  projector and at layer 2, and probe at layer 1; :func:`adapter_case`'s ``layer`` and ``probe_layer``
  move them, e.g. to a hybrid model's default layer); tiny random weights are enough.
* ``make_inputs(specs, start=0)``: builds the model's keyword inputs for a batch, left-padded, with
  an ``attention_mask``, as the model's processor would. ``specs[j]`` describes sample
  ``start + j``: ``None`` is a text-only sample, anything else is yours (e.g. ``(height, width)`` of
  an image). Sample ``i`` must get the same text and image whether built in a batch or alone
  (``make_inputs([spec], start=i)``).
* ``specs``: three samples with images, of at least two different visual-token counts (the
  batch check needs ragged keep counts).

The checks use the plugin manager of :func:`adapter_check_manager`: every installed plugin (so an
installed adapter package is found through its entry point) plus three test reducers of its own,
``check_drop``, ``probe_recorder`` and ``first_k`` (so no built-in reducer plugin is needed). Each
check raises :class:`AdapterCheckError` (an ``AssertionError``) naming the check and what differed,
or the ``AssertionError`` of ``torch.testing.assert_close`` for a tolerance; arguments the checks
cannot use (not three specs, fewer than 3 decoder layers, another attention implementation than
sdpa, a manager without the test reducers) raise ``ValueError``, and a model no adapter claims
``UnsupportedModelError``.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

import tokenprune
from tokenprune.adapters.base import ImageCall, ModelAdapter
from tokenprune.adapters.generic import adapter_for
from tokenprune.engine import apply, compat, hybrid
from tokenprune.engine.kv_sharing import kv_sharing
from tokenprune.plugins import PluginManager, get_plugin_manager
from tokenprune.reducer import Capabilities, ReduceContext, ScoringReducer, Selection, TokenReducer, top_k_selection

MakeInputs = Callable[..., dict[str, Any]]
"""``make_inputs(specs, start=0) -> dict`` of model inputs (see the module docstring)."""

PRUNE_TOLERANCE = 1e-5
"""Absolute tolerance of cached == recompute and batch == one by one."""

PROBE_TOLERANCE = 1e-6
"""Absolute tolerance of probe scores against eager attention weights."""


class AdapterCheckError(AssertionError):
    """An engine invariant failed on an adapter's model; the message names the check."""


# --- test reducers ---------------------------------------------------------------------------------


class ProbeRecorder(ScoringReducer):
    """Keeps the tokens with the most attention from the last token (FastV-like) and records ``ctx``."""

    name = "probe_recorder"
    capabilities = Capabilities(insertion_points=frozenset({"layer"}), attention=frozenset({"last", "text"}))
    contexts: ClassVar[list[ReduceContext]] = []

    def score(self, tokens: Tensor, ctx: ReduceContext) -> Tensor:
        """The probe's ``last`` attention; the context is appended to :attr:`contexts`."""
        ProbeRecorder.contexts.append(ctx)
        return ctx.attention["last"]


#: Where the checks' token reducers run: the case's first stage (:attr:`AdapterCase.at`) may be before the projector.
TOKEN_POINTS = frozenset({"vision_layer", "pre_projector", "post_projector", "layer"})


class SeededDrop(ScoringReducer):
    """Keeps a seeded pseudo-random subset of each sample's tokens; the checks' own, so they need no plugin.

    Each sample draws exactly its own token count from a generator seeded by the stage index, so a
    sample keeps the same tokens alone or in a batch (the contract's batch independence).
    """

    name = "check_drop"
    capabilities = Capabilities(insertion_points=TOKEN_POINTS)

    def score(self, tokens: Tensor, ctx: ReduceContext) -> Tensor:
        """``(B, N)`` uniform scores, drawn on the CPU per sample."""
        scores = torch.zeros(ctx.valid.shape)
        for row, count in enumerate(ctx.num_valid.tolist()):
            generator = torch.Generator().manual_seed(1_000_003 * ctx.stage_index)
            scores[row, :count] = torch.rand(count, generator=generator)
        return scores.to(tokens.device)


class FirstK(TokenReducer):
    """An adaptive toy: keeps the first ``budget - h`` tokens, ``h`` in {1, 2} hashed from the sample's
    own features, so keep counts vary per sample but not with the batch."""

    name = "first_k"
    capabilities = Capabilities(insertion_points=TOKEN_POINTS, deterministic_count=False)

    def reduce(self, tokens: Tensor, ctx: ReduceContext) -> Selection:
        """Keep the first ``budget - h`` valid tokens of each sample (protected ones included)."""
        n = tokens.shape[1]
        h = 1 + (tokens[:, 0, 0].float().abs() * 1e4).long() % 2
        want = torch.minimum((ctx.budget - h).clamp(min=1), ctx.num_valid)
        want = torch.maximum(want, (ctx.protected & ctx.valid).sum(1))
        scores = -torch.arange(n, dtype=torch.float32, device=tokens.device).expand(ctx.batch_size, n)
        return top_k_selection(scores, dataclasses.replace(ctx, budget=want))


class _CheckReducers:
    """Registers the test reducers."""

    @tokenprune.hookimpl
    def tokenprune_register_reducers(self, registry: Any) -> None:
        registry.add(SeededDrop)
        registry.add(ProbeRecorder)
        registry.add(FirstK)


def adapter_check_manager(*plugins: object) -> PluginManager:
    """A fresh plugin manager for the checks: installed plugins, ``plugins``, and the test reducers.

    Pass your adapter's plugin module (or any object with a ``tokenprune_register_adapters``
    implementation) when the package that declares it is not installed.
    """
    return get_plugin_manager(plugins=[*plugins, _CheckReducers()])


# --- the six invariants ----------------------------------------------------------------------------


def _pipe(*stages: tuple[Any, str, float], **options: Any) -> dict[str, Any]:
    return {"stages": [{"at": at, "reducer": r, "keep": keep} for at, r, keep in stages], **options}


PRUNE = _pipe(("post_projector", "check_drop", 0.5), ({"layer": 2}, "check_drop", 0.5))
"""Half the visual tokens after the projector, half of the rest at layer 2."""

KEEP_ALL = _pipe(
    ("post_projector", "check_drop", 1.0), ({"layer": 1}, "probe_recorder", 1.0), ({"layer": 2}, "check_drop", 1.0)
)
"""Three stages that keep every token (one of them runs the attention probe)."""


@dataclasses.dataclass
class AdapterCase:
    """One model under test, built once by :func:`adapter_case`; every invariant is a function of it.

    Attributes:
        model: The top-level model (see the module docstring).
        make_inputs: ``make_inputs(specs, start=0)``, the batch builder.
        specs: Three image samples; the padded batch is ``[specs[0], specs[1], None]``.
        manager: The plugin manager (the checks' test reducers registered).
        adapter: The adapter that claims the model.
        generate_kwargs: Given to every ``generate`` (``pad_token_id``, ``suppress_tokens``).
        generated_token_type_id: The ``token_type_ids`` value ``generate`` gives new tokens (1 for
            PaliGemma's causal suffix, 0 for Gemma3's text tokens).
        layer: The layer of the checks' layer cut (``layer: 2`` by default; a hybrid model's default layer, see
            :func:`tokenprune.engine.hybrid.default_layer`).
        probe_layer: The layer of the probed stage (it reads layer ``probe_layer - 1``'s attention; by default
            ``layer - 1``), at most :attr:`layer`.
        at: Where the checks' first stage runs: ``"post_projector"`` (the default), or ``"pre_projector"`` /
            ``{"vision_layer": k}`` for an adapter that serves stages before the projector (a sample keeps the same
            patches alone or in a batch there too).
    """

    model: nn.Module
    make_inputs: MakeInputs
    specs: Sequence[Any]
    manager: PluginManager
    adapter: ModelAdapter
    generate_kwargs: dict[str, Any]
    generated_token_type_id: int = 0
    layer: int = 2
    probe_layer: int = 1
    at: Any = "post_projector"

    def prune(self) -> dict[str, Any]:
        """:data:`PRUNE` (read when called: a test may replace it) with its layer stage at :attr:`layer` and its first
        stage at :attr:`at`."""
        if self.layer == 2 and self.at == "post_projector":
            return PRUNE
        return _pipe((self.at, "check_drop", 0.5), ({"layer": self.layer}, "check_drop", 0.5))

    def probed(self, keep: float) -> dict[str, Any]:
        """The first (:attr:`at`), probed and layer stages (:data:`KEEP_ALL` at ``keep=1``), each keeping ``keep``."""
        if keep == 1.0 and (self.probe_layer, self.layer, self.at) == (1, 2, "post_projector"):
            return KEEP_ALL
        return _pipe(
            (self.at, "check_drop", keep),
            ({"layer": self.probe_layer}, "probe_recorder", keep),
            ({"layer": self.layer}, "check_drop", keep),
        )

    def padded_batch(self) -> dict[str, Any]:
        """A batch of 3 with left padding: two image samples of different sizes and a text-only one."""
        return self.make_inputs([self.specs[0], self.specs[1], None])

    def visual(self, inputs: Mapping[str, Any]) -> Tensor:
        """The visual tokens the engine reduces: image and video placeholders."""
        ids = inputs["input_ids"]
        return self.adapter.visual_mask(ids) | self.adapter.video_mask(ids)

    def forward(self, inputs: Mapping[str, Any], model: nn.Module | None = None, **kw: Any) -> Any:
        """A plain forward with the positions ``generate`` would build (so padded and unpadded runs agree).

        M-RoPE models compute their own positions and get none.
        """
        extra: dict[str, Any] = {}
        if self.adapter.position_scheme != "mrope":
            mask = inputs["attention_mask"]
            extra["position_ids"] = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
        with torch.no_grad():
            return (model or self.model)(**inputs, **extra, **kw)

    def generate(self, inputs: Mapping[str, Any], n: int = 4) -> Any:
        """Greedy ``generate`` of ``n`` tokens with per-step logits."""
        with torch.no_grad():
            return self.model.generate(
                **inputs,
                max_new_tokens=n,
                do_sample=False,
                return_dict_in_generate=True,
                output_logits=True,
                **self.generate_kwargs,
            )


def adapter_case(
    model: nn.Module,
    make_inputs: MakeInputs,
    specs: Sequence[Any],
    *,
    plugins: PluginManager | None = None,
    pad_token_id: int = 0,
    suppress_tokens: Sequence[int] | None = None,
    generated_token_type_id: int = 0,
    layer: int = 2,
    probe_layer: int | None = None,
    at: Any = "post_projector",
) -> AdapterCase:
    """Check the arguments once and build the :class:`AdapterCase` every invariant runs on.

    Args:
        model: The top-level model, sdpa, eval mode, at least 3 decoder layers.
        make_inputs: ``make_inputs(specs, start=0)``, the batch builder (see the module docstring).
        specs: Three image samples with at least two different visual-token counts.
        plugins: A manager from :func:`adapter_check_manager` (default: a fresh one, which finds
            installed adapter packages through their entry points).
        pad_token_id: Given to ``generate``.
        suppress_tokens: Ids ``generate`` must not produce (default: every id the adapter marks
            visual in the batch, so that no generated token is read as an image placeholder).
        generated_token_type_id: See :attr:`AdapterCase.generated_token_type_id`.
        layer: The layer cut's layer (:attr:`AdapterCase.layer`), at least 2.
        probe_layer: The probed stage's layer (:attr:`AdapterCase.probe_layer`; default ``layer - 1``).
        at: The first stage's insertion point (:attr:`AdapterCase.at`).

    Raises:
        ValueError: arguments the checks cannot use (see the module docstring).
        UnsupportedModelError: no installed or given adapter claims ``model.config.model_type``.
    """
    manager = plugins if plugins is not None else adapter_check_manager()
    reducers = manager.reducers
    if not all(cls.name in reducers and reducers.get(cls.name) is cls for cls in (SeededDrop, ProbeRecorder, FirstK)):
        raise ValueError(
            "the plugin manager lacks the checks' test reducers; build it with "
            "tokenprune.testing.adapters.adapter_check_manager(...)"
        )
    if len(specs) != 3:
        raise ValueError(f"specs: expected three image samples, got {len(specs)}")
    if any(spec is None for spec in specs):
        raise ValueError("specs: every sample of the batch needs an image (None is text-only)")
    adapter = adapter_for(model, manager)
    layers = len(adapter.decoder_layers())
    probe_layer = layer - 1 if probe_layer is None else probe_layer
    if not 1 <= probe_layer <= layer or layer < 2:
        raise ValueError(f"the checks need 1 <= probe_layer <= layer and layer >= 2, got {probe_layer} and {layer}")
    if layers <= layer:
        raise ValueError(
            f"the checks prune at layer {layer} and probe at layer {probe_layer}; the model has {layers} decoder layers"
        )
    impl = compat.attention_implementation(adapter.text_config())
    if impl != "sdpa":
        raise ValueError(f"build the model with attn_implementation='sdpa' (it uses {impl!r})")
    ProbeRecorder.contexts.clear()
    case = AdapterCase(
        model,
        make_inputs,
        specs,
        manager,
        adapter,
        {"pad_token_id": pad_token_id},
        generated_token_type_id,
        layer,
        probe_layer,
        at,
    )
    if suppress_tokens is None:  # never generate a token the adapter would read as visual
        ids = case.padded_batch()["input_ids"]
        suppress_tokens = sorted({int(t) for t in ids[case.visual({"input_ids": ids})].unique()})
    case.generate_kwargs["suppress_tokens"] = list(suppress_tokens)
    return case


def _expect(condition: bool, check: str, message: str) -> None:
    if not condition:
        raise AdapterCheckError(f"{check}: {message}")


def _hooks(model: nn.Module) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


def keep_all_is_identity(c: AdapterCase) -> None:
    """Invariant 1: a keep-all pipeline gives bit-identical logits and generations (batch 3, padding).

    The pipeline has three keep-all stages (``post_projector``, or the case's :attr:`~AdapterCase.at`; a probed
    ``layer: 1`` stage; ``layer: 2``); logits, generated ids and every step's logits must be ``torch.equal`` to the
    unmodified model's, and every stage must report as many tokens leaving as entering.

    Args:
        c: The case (:func:`adapter_case`).
    """
    model = c.model
    name = "keep-all is identity"
    inputs = c.padded_batch()
    _expect(int((inputs["attention_mask"] == 0).sum()) > 0, name, "make_inputs gave a batch without left padding")
    ref = c.forward(inputs).logits
    ref_gen = c.generate(inputs)
    with apply(model, c.probed(1.0), plugins=c.manager) as run:
        out = c.forward(inputs).logits
        gen = c.generate(inputs)
    _expect(torch.equal(out, ref), name, f"logits differ (max {float((out - ref).abs().max()):.3g})")
    _expect(torch.equal(gen.sequences, ref_gen.sequences), name, "generated ids differ")
    for step, (a, b) in enumerate(zip(gen.logits, ref_gen.logits, strict=False)):
        _expect(torch.equal(a, b), name, f"the logits of generated token {step} differ")
    stages = run.stats.last_prefill.stages
    _expect(
        [s.reducer for s in stages] == ["check_drop", "probe_recorder", "check_drop"], name, "stages did not all run"
    )
    _expect(all(s.entering == s.leaving for s in stages), name, "a keep-all stage dropped tokens")


def cached_decode_equals_recompute(
    c: AdapterCase, *, positions: str = "original", pipeline: Mapping[str, Any] | None = None
) -> None:
    """Invariant 2: cached decoding after a pruned prefill equals a no-cache recompute (1e-5).

    Generates 4 tokens with :data:`PRUNE` (batch 3, padding), then runs one forward without cache
    on the prompt plus the generated tokens: the pipeline must keep the same tokens, and the logits
    at the generated positions must match the cached decoding steps within :data:`PRUNE_TOLERANCE`.

    Args:
        c: The case (:func:`adapter_case`); its ``generated_token_type_id`` extends ``token_type_ids``
            for the recompute (``mm_token_type_ids`` and ``moe_mm_token_type_ids`` are always extended with 0, text).
        positions: The pipeline's ``positions`` option, ``"original"`` or ``"compact"``.
        pipeline: Another pipeline to check instead of :data:`PRUNE` (such as two layer cuts); its ``positions``
            option is set to ``positions``. Its reducers must keep the same tokens in the recompute (no attention
            scores: the last row differs once the output is appended).
    """
    model = c.model
    name = f"cached decode equals recompute (positions: {positions})"
    inputs = c.padded_batch()
    with apply(model, {**(pipeline or c.prune()), "positions": positions}, plugins=c.manager) as run:
        gen = c.generate(inputs, 4)
        kept_cached = [s.kept for s in run.stats.last_prefill.stages]
        full = dict(inputs)
        seq = gen.sequences
        new = seq.shape[1] - inputs["input_ids"].shape[1]
        full["input_ids"] = seq
        full["attention_mask"] = torch.cat(
            [inputs["attention_mask"], torch.ones_like(seq[:, :new], dtype=inputs["attention_mask"].dtype)], 1
        )
        if "token_type_ids" in full:
            fill = torch.full_like(seq[:, :new], c.generated_token_type_id, dtype=inputs["token_type_ids"].dtype)
            full["token_type_ids"] = torch.cat([inputs["token_type_ids"], fill], 1)
        for key in ("mm_token_type_ids", "moe_mm_token_type_ids"):  # generated tokens are text: 0
            if key in full:
                fill = torch.zeros_like(seq[:, :new], dtype=inputs[key].dtype)
                full[key] = torch.cat([inputs[key], fill], 1)
        out = c.forward(full, use_cache=False).logits
        kept_recomputed = [s.kept for s in run.stats.last_prefill.stages]
    _expect(kept_recomputed == kept_cached, name, "the recompute kept other tokens than the cached prefill")
    for j in range(new):
        torch.testing.assert_close(
            out[:, -new - 1 + j],
            gen.logits[j],
            atol=PRUNE_TOLERANCE,
            rtol=0,
            msg=lambda m, j=j: f"{name}, step {j}: {m}",
        )


def _layer_kinds(c: AdapterCase) -> tuple[str, ...]:
    """Each decoder layer's kind (``full_attention``, ``linear_attention``, ...) as the engine reads it."""
    return hybrid.layer_kinds(c.model.config.get_text_config(), c.adapter.decoder_layers())


def kv_cache_holds_kept_tokens(c: AdapterCase) -> None:
    """Invariant 3: every layer's KV cache holds exactly the tokens the pipeline keeps there.

    With :data:`PRUNE` (its layer stage at the case's :attr:`~AdapterCase.layer` ``k``, 2 by default) and 3
    generated tokens: layer ``k`` keeps half of what the projector stage kept (at least 1 per image sample);
    ``layer_tokens`` counts each sample's text tokens plus its kept visual tokens; the cache of layers before
    ``k`` (``k`` on) is as wide as the longest sample after the projector stage (after layer ``k``) plus the 2
    decoded tokens.
    Recurrent layers (linear attention, convolution) keep a fixed-size state instead, and KV-shared layers hold no
    cache of their own (:func:`cached_key_lengths`): neither is counted.
    """
    model = c.model
    name = "KV cache holds the kept tokens"
    inputs = c.padded_batch()
    n = 3
    visual = c.visual(inputs)
    with apply(model, c.prune(), plugins=c.manager) as run:
        gen = c.generate(inputs, n)
    prefill = run.stats.last_prefill
    post, layer = prefill.stages
    text = ((inputs["attention_mask"] == 1) & ~visual).sum(1)
    per_sample_0 = [int(t) + k for t, k in zip(text, post.leaving, strict=False)]
    per_sample_2 = [int(t) + k for t, k in zip(text, layer.leaving, strict=False)]
    expected_leaving = [max(1, k // 2) if k else 0 for k in post.leaving]
    _expect(
        layer.leaving == expected_leaving, name, f"layer {c.layer} kept {layer.leaving}, expected {expected_leaving}"
    )
    layers, k = len(c.adapter.decoder_layers()), c.layer
    expected_tokens = [per_sample_0] * k + [per_sample_2] * (layers - k)
    _expect(
        prefill.layer_tokens == expected_tokens,
        name,
        f"tokens per layer {prefill.layer_tokens}, expected {expected_tokens}",
    )
    cached = cached_key_lengths(c, compat.output_cache(gen))
    for i, width in enumerate([max(per_sample_0)] * k + [max(per_sample_2)] * (layers - k)):
        if i in cached:
            got = cached[i]
            _expect(got == width + n - 1, name, f"layer {i} caches {got} tokens, expected {width + n - 1}")


def cached_key_lengths(c: AdapterCase, cache: Any) -> dict[int, int]:
    """Decoder layer -> how many keys its own cache entry holds, for the layers that keep keys and values.

    A recurrent layer (linear attention, convolution: a fixed-size state) and a KV-shared layer (Gemma 4's and
    Gemma 3n's last ``num_kv_shared_layers``: no cache of their own, a dummy entry or none at all) are left out;
    every other layer must hold keys.

    Raises:
        AdapterCheckError: a softmax-attention layer that owns its keys has no keys in ``cache``.
    """
    layers = c.adapter.decoder_layers()
    sharing = kv_sharing(c.adapter.text_config(), len(layers))
    first_shared = sharing.first_shared if sharing is not None else len(layers)
    entries = compat.cache_layers(cache)
    kinds = _layer_kinds(c)
    out: dict[int, int] = {}
    for i, kind in enumerate(kinds):
        if hybrid.is_recurrent(kind) or i >= first_shared:
            continue
        keys = entries[i][0] if i < len(entries) else None
        _expect(keys is not None, "KV cache holds the kept tokens", f"layer {i} ({kind}) holds no keys in the cache")
        out[i] = int(keys.shape[2])
    return out


def remove_restores_model(c: AdapterCase) -> None:
    """Invariant 4: after ``remove()``, outputs and ``state_dict`` are bit-identical and no hook is left.

    A pruning pipeline (projector, probed layer 1, layer 2: the case's :attr:`~AdapterCase.probe_layer` and
    :attr:`~AdapterCase.layer`) must change the output; after
    ``remove()`` (called twice: it is idempotent) logits and every ``state_dict`` tensor are
    ``torch.equal`` to before, the language model's attention implementation is restored, the
    number of module hooks is back to what it was, and the ``get_image_features`` wrapper is gone.
    """
    model = c.model
    name = "remove() restores the model"
    inputs = c.padded_batch()
    before = c.forward(inputs).logits
    state = {k: v.clone() for k, v in model.state_dict().items()}
    impl = compat.attention_implementation(model.config.get_text_config())
    hooks_before = _hooks(model)
    run = apply(model, c.probed(0.5), plugins=c.manager)
    pruned = c.forward(inputs).logits
    _expect(
        pruned.shape[1] < before.shape[1] or not torch.equal(pruned[:, -1], before[:, -1]),
        name,
        "the pruning pipeline changed nothing",
    )
    run.remove()
    run.remove()  # idempotent
    after = c.forward(inputs).logits
    _expect(torch.equal(after, before), name, "logits differ after remove()")
    new_state = model.state_dict()
    _expect(state.keys() == new_state.keys(), name, "the state_dict keys changed")
    changed = [k for k in state if not torch.equal(state[k], new_state[k])]
    _expect(not changed, name, f"state_dict tensors changed: {changed[:5]}")
    now = compat.attention_implementation(model.config.get_text_config())
    _expect(now == impl, name, f"attention implementation is {now!r}, was {impl!r}")
    _expect(_hooks(model) == hooks_before, name, "hooks were left on the model")
    _expect("get_image_features" not in c.adapter.vlm().__dict__, name, "the get_image_features wrapper was left")


def batch_equals_one_by_one(c: AdapterCase) -> None:
    """Invariant 5: with ragged keep counts, each sample gets what it gets alone (1e-5).

    The batch is ``specs`` (three images of different sizes); the pipeline is an adaptive reducer
    (:class:`FirstK`, 75 %) after the projector (or at the case's :attr:`~AdapterCase.at`), then 50 % at layer 2
    (the case's :attr:`~AdapterCase.layer`), so samples keep different numbers of tokens at both stages. For each
    sample, generated ids must be equal, the logits of each generated token and of the prompt's last position
    within :data:`PRUNE_TOLERANCE`, and the kept indices of both stages equal to a run of the sample alone.
    """
    model, make_inputs, specs = c.model, c.make_inputs, c.specs
    name = "batch equals one by one"
    batch = make_inputs(specs)
    pipeline = _pipe((c.at, "first_k", 0.75), ({"layer": c.layer}, "check_drop", 0.5))
    with apply(model, pipeline, plugins=c.manager) as run:
        gen = c.generate(batch, 3)
        out = c.forward(batch).logits
        stages = run.stats.last_prefill.stages
        _expect(
            len(set(stages[0].leaving)) > 1 and len(set(stages[1].leaving)) > 1,
            name,
            f"keep counts are not ragged ({stages[0].leaving}, {stages[1].leaving}); use specs of different sizes",
        )
        adaptive = any(k < (b * 3) // 4 for k, b in zip(stages[0].leaving, stages[0].entering, strict=False))
        _expect(adaptive, name, "the adaptive reducer kept the full budget in every sample")
        for i, spec in enumerate(specs):
            alone = make_inputs([spec], start=i)
            g1 = c.generate(alone, 3)
            o1 = c.forward(alone).logits
            _expect(torch.equal(g1.sequences[0, -3:], gen.sequences[i, -3:]), name, f"sample {i}: other tokens")
            for a, b in zip(g1.logits, gen.logits, strict=False):
                torch.testing.assert_close(a[0], b[i], atol=PRUNE_TOLERANCE, rtol=0)
            torch.testing.assert_close(o1[0, -1], out[i, -1], atol=PRUNE_TOLERANCE, rtol=0)
            alone_stats = run.stats.last_prefill.stages
            _expect(alone_stats[0].kept[0] == stages[0].kept[i], name, f"sample {i}: other tokens kept after projector")
            _expect(
                alone_stats[1].kept[0] == stages[1].kept[i], name, f"sample {i}: other tokens kept at layer {c.layer}"
            )


def probe_matches_eager_attention(c: AdapterCase) -> None:
    """Invariant 6: probe scores equal eager attention weights (1e-6) while the model ran sdpa.

    A ``layer: 2`` stage probes layer 1 (a ``layer: probe_layer + 1`` stage probes the case's
    :attr:`~AdapterCase.probe_layer`; on a hybrid model whose probed layer is not softmax attention, a stage
    at its default layer ``k`` probes layer ``k - 1``: :func:`tokenprune.engine.hybrid.default_layer`). Every
    softmax-attention decoder layer must have called transformers' stock sdpa function; the ``last`` and
    ``text`` scores the reducer received must equal the head-mean of a deep-copied eager model's
    ``output_attentions`` at the probed layer within :data:`PROBE_TOLERANCE`; and the model must still be on sdpa.
    """
    model = c.model
    name = "probe matches eager attention"
    calls: list[int] = []
    sdpa = compat.sdpa_module()
    real = sdpa.sdpa_attention_forward

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return real(*args, **kwargs)

    inputs = c.padded_batch()
    ProbeRecorder.contexts.clear()
    kinds = _layer_kinds(c)
    layer = c.probe_layer + 1
    if kinds[layer - 1] not in hybrid.SOFTMAX_KINDS:  # hybrid: the probed layer k - 1 must attend
        layer = hybrid.default_layer(kinds)
    _expect(layer is not None, name, f"no layer after layer 1 is softmax attention ({', '.join(kinds)})")
    sdpa.sdpa_attention_forward = counting
    try:
        with apply(model, _pipe(({"layer": layer}, "probe_recorder", 0.5)), plugins=c.manager):
            c.forward(inputs)
    finally:
        sdpa.sdpa_attention_forward = real
    softmax = all(k in hybrid.SOFTMAX_KINDS for k in kinds)
    n_layers = len(kinds) if softmax else len(hybrid.attention_layers(kinds))
    _expect(len(calls) == n_layers, name, f"{len(calls)} of {n_layers} attention layers attended through stock sdpa")
    _expect(bool(ProbeRecorder.contexts), name, "the probed stage did not run")
    ctx = ProbeRecorder.contexts[-1]
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    out = c.forward(inputs, model=eager, output_attentions=True)
    # layer k - 1: (B, H, L, L); a hybrid model records its attention layers' weights only
    probed = layer - 1 if len(out.attentions) == len(kinds) else hybrid.attention_layers(kinds).index(layer - 1)
    att = out.attentions[probed].float()
    visual = c.visual(inputs)
    valid = inputs["attention_mask"].bool()
    for b in range(visual.shape[0]):
        cols = visual[b].nonzero().squeeze(1)
        n = cols.numel()
        expected_last = att[b, :, -1, cols].mean(0)
        torch.testing.assert_close(ctx.attention["last"][b, :n], expected_last, atol=PROBE_TOLERANCE, rtol=0)
        text_rows = (valid[b] & ~visual[b]).nonzero().squeeze(1)
        expected_text = att[b][:, text_rows][:, :, cols].mean(0).mean(0)
        torch.testing.assert_close(ctx.attention["text"][b, :n], expected_text, atol=PROBE_TOLERANCE, rtol=0)
    impl = compat.attention_implementation(model.config.get_text_config())
    _expect(impl == "sdpa", name, f"the model was left on {impl!r}")


def rotary_matches_model(c: AdapterCase) -> None:
    """The adapter's :meth:`~tokenprune.adapters.ModelAdapter.rotary` reproduces the model's own RoPE.

    Not one of the six invariants, and needed because they cannot see it: ``positions: compact``
    recomputes the rotary embeddings of pruned layers with ``adapter.rotary`` both in the prefill and
    in every decoding step, so a wrong ``rotary`` is self-consistent (cached decoding still equals a
    recompute) while the model attends with wrong positions. Here, in a plain forward of the padded
    batch (no pipeline), ``adapter.rotary`` applied to the position ids the language model received
    must give every decoder layer's ``position_embeddings`` bit for bit (the ``(cos, sin)`` pair, or the one
    table a model passes instead, such as Llama 4's complex ``freqs_cis``).
    """
    from tokenprune.engine.positions import to_rows

    name = "rotary matches the model"
    inputs = c.padded_batch()
    seen: dict[str, Any] = {"layers": []}

    def lm_pre(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        seen["position_ids"] = kwargs.get("position_ids")

    def layer_pre(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        hidden = args[0] if args else kwargs.get("hidden_states")
        seen["layers"].append((hidden, kwargs.get("position_embeddings")))

    handles = [c.adapter.language_model().register_forward_pre_hook(lm_pre, with_kwargs=True)]
    handles += [layer.register_forward_pre_hook(layer_pre, with_kwargs=True) for layer in c.adapter.decoder_layers()]
    try:
        c.forward(inputs)
    finally:
        for handle in handles:
            handle.remove()
    position_ids = seen.get("position_ids")
    for i, (hidden, embeddings) in enumerate(seen["layers"]):
        _expect(embeddings is not None, name, f"layer {i} received no position_embeddings")
        batch, length = int(hidden.shape[0]), int(hidden.shape[1])
        if position_ids is None:  # as the engine does: the model numbers the tokens 0..L-1
            rows = torch.arange(length, device=hidden.device)[None, None].expand(1, batch, -1)
        else:
            rows = to_rows(position_ids, batch)[0]
        with torch.no_grad():
            got = c.adapter.rotary(hidden, rows, i)
        if isinstance(embeddings, Tensor):  # one table, not (cos, sin): Llama 4's complex freqs_cis
            same = isinstance(got, Tensor) and torch.equal(got, embeddings)
        else:
            same = torch.equal(got[0], embeddings[0]) and torch.equal(got[1], embeddings[1])
        _expect(same, name, f"layer {i}: adapter.rotary differs from the model's position_embeddings")


def layout_covers_visual_tokens(c: AdapterCase) -> None:
    """The adapter's layouts describe exactly the tokens its ``visual_mask`` marks.

    Not one of the six invariants: when the layouts of :meth:`~tokenprune.adapters.ModelAdapter.image_layouts`
    count other tokens than :meth:`~tokenprune.adapters.ModelAdapter.visual_mask` marks, the engine
    cannot align them and runs without a layout (spatial reducers and heatmaps then lose it), which
    no output shows. Here, for the batch ``specs`` and for the padded batch, a keep-all
    ``post_projector`` stage must receive a layout with an image, a row and a column for every
    visual token, as many images per sample as the layout says, and newlines only at row ends
    (``col`` = the largest column of that row's other tokens + 1). This checks consistency, not
    meaning: test that the rows and columns are the right ones for your architecture yourself.
    """
    model, make_inputs, specs = c.model, c.make_inputs, c.specs
    name = "the layout covers the visual tokens"
    for inputs in (make_inputs(specs), c.padded_batch()):
        with apply(model, _pipe(("post_projector", "check_drop", 1.0)), plugins=c.manager) as run:
            c.forward(inputs)
        (stage,) = run.stats.last_prefill.stages
        layout = stage.layout
        _expect(
            layout is not None,
            name,
            "the engine got no layout: image_layouts counted other tokens than visual_mask marks "
            f"({stage.entering} visual tokens per sample)",
        )
        for b, n in enumerate(stage.entering):
            image, row, col, newline = (getattr(layout, f)[b, :n] for f in ("image", "row", "col", "newline"))
            _expect(
                bool((image >= 0).all() and (row >= 0).all() and (col >= 0).all()), name, f"sample {b}: unset entries"
            )
            # a row is (image or video, view, frame, row): a video's frames are grids of their own
            parts = torch.stack([layout.video[b, :n].long(), image, layout.view[b, :n], layout.frame[b, :n], row])
            for key in {tuple(int(x) for x in column) for column in parts.T}:
                at = (parts == torch.tensor(key, device=parts.device)[:, None]).all(0)
                cells, ends = col[at & ~newline], col[at & newline]
                if ends.numel():
                    kind = "video" if key[0] else "image"
                    _expect(
                        ends.numel() == 1 and bool(cells.numel()) and int(ends[0]) == int(cells.max()) + 1,
                        name,
                        f"sample {b}, {kind} {key[1]}, view {key[2]}, frame {key[3]}, row {key[4]}: a newline must "
                        "close the row",
                    )


@dataclasses.dataclass(frozen=True)
class Invariant:
    """One check of :func:`check_adapter`: a name (in messages, docs and test ids) and a function of the case."""

    name: str
    run: Callable[[AdapterCase], None]


INVARIANTS: tuple[Invariant, ...] = (
    Invariant("keep-all is identity", keep_all_is_identity),
    Invariant(
        "cached decode equals recompute (original positions)",
        functools.partial(cached_decode_equals_recompute, positions="original"),
    ),
    Invariant(
        "cached decode equals recompute (compact positions)",
        functools.partial(cached_decode_equals_recompute, positions="compact"),
    ),
    Invariant("KV cache holds the kept tokens", kv_cache_holds_kept_tokens),
    Invariant("remove restores the model", remove_restores_model),
    Invariant("batch equals one by one", batch_equals_one_by_one),
    Invariant("probe matches eager attention", probe_matches_eager_attention),
)
"""The engine's six invariants (the second with both position policies), in the order :func:`check_adapter`
runs them."""


def _image_call(
    c: AdapterCase, inputs: Mapping[str, Any], probe: Any = None
) -> tuple[tuple[Any, ...], dict[str, Any], Any]:
    """The arguments and output of the model's ``get_image_features`` call for ``inputs`` (with ``probe``, a
    vision probe, recording during that call only: a video's tower calls are not the image's, nor is the image
    call that Qwen3-VL's ``get_video_features`` makes)."""
    vlm = c.adapter.vlm()
    seen: list[tuple[tuple[Any, ...], dict[str, Any], Any]] = []
    original = vlm.get_image_features
    in_video = [False]

    @functools.wraps(original)
    def record(*args: Any, **kwargs: Any) -> Any:
        if in_video[0]:
            return original(*args, **kwargs)
        if probe is not None:
            probe.reset(active=True)
        out = original(*args, **kwargs)
        if probe is not None:
            probe.active = False
        seen.append((args, kwargs, out))
        return out

    video = getattr(vlm, "get_video_features", None)

    def video_call(*args: Any, **kwargs: Any) -> Any:
        in_video[0] = True
        try:
            return video(*args, **kwargs)
        finally:
            in_video[0] = False

    vlm.get_image_features = record
    if video is not None:
        vlm.get_video_features = functools.wraps(video)(video_call)
    try:
        c.forward(inputs)
    finally:
        del vlm.get_image_features
        if video is not None:
            del vlm.get_video_features
    _expect(len(seen) == 1, "vision patches map to tokens", f"get_image_features ran {len(seen)} times, not once")
    return seen[0]


def _features_with(c: AdapterCase, call: tuple[Any, ...], layer: nn.Module, flat: int | None) -> Tensor:
    """All images' post-projector features, ``(n, D)``, with position ``flat`` of the tower's sequences (flattened)
    pushed at the output of ``layer``'s attention (``None``: unperturbed)."""
    return pushed_features(c.adapter.vlm().get_image_features, call, layer, flat)


def pushed_features(features: Callable[..., Any], call: tuple[Any, ...], layer: nn.Module, flat: int | None) -> Tensor:
    """``features(*call)``'s tokens (``get_image_features`` or ``get_video_features`` of the base model), ``(n, D)``
    float32, with row ``flat`` of ``layer``'s attention output (its rows flattened over the tower's sequences) pushed
    by a ramp (not a constant: norms remove one); ``flat=None``: unperturbed."""

    def push(module: nn.Module, args: Any, output: Any) -> Any:
        out = output[0] if isinstance(output, tuple) else output
        rows = out.reshape(-1, out.shape[-1]).clone()
        rows[flat] += torch.linspace(-50.0, 50.0, rows.shape[-1], dtype=rows.dtype)
        out = rows.reshape(out.shape)
        return (out, *output[1:]) if isinstance(output, tuple) else out

    handle = compat.vision_attention_module(layer).register_forward_hook(push) if flat is not None else None
    try:
        with torch.no_grad():
            out = features(*call[0], **call[1])
    finally:
        if handle is not None:
            handle.remove()
    return torch.cat([f.reshape(-1, f.shape[-1]).float() for f in ImageCall(call[0], call[1], out).features()])


def pushed_positions(n: int) -> list[int]:
    """The positions of an ``n``-position tower sequence the map checks push: 0 to 3 (the third patch of a raster
    row tells a raster map from one that groups consecutive positions), a quarter, half and three quarters in, the
    last."""
    return sorted({0, 1, 2, 3, n // 4, n // 2, 3 * n // 4, n - 1} & set(range(n)))


def vision_patches_map_to_tokens(c: AdapterCase) -> None:
    """The adapter's :meth:`~tokenprune.adapters.base.ModelAdapter.map_vision_patches` marks exactly the
    post-projector tokens built from a vision patch.

    For adapters that describe a vision tower (others are skipped): on the padded batch, a value of 1 at one
    position of the tower's sequences (0 elsewhere) must map to a non-zero value at exactly the tokens whose
    features change when that position's output of the feature layer's attention is pushed (the rest of a
    layer works token by token, so nothing else moves), for the first, second, middle and last position of
    the first and last sequence, and the positions 2 and 3 and a quarter and three quarters in (so a map that
    groups consecutive positions where the tower stores patches in raster order, or the reverse, is caught at the
    third patch of the first row). The map must also keep a constant: where a token has any patch, mapping ones
    gives it 1 (a mean), at least for a tower without CLS.
    """
    tower = c.adapter.vision_tower()
    if tower is None:
        return
    from tokenprune.engine.vision_probe import VisionProbe

    name = "vision patches map to tokens"
    inputs = c.padded_batch()
    probe = VisionProbe(tower, {tower.feature_layer: (frozenset({"mean"}), False, False)})
    probe.install()
    try:
        args, kwargs, output = _image_call(c, inputs, probe)
        lengths = [int(v.shape[0]) for v in probe.records[tower.feature_layer].scores["mean"]]
    finally:
        probe.remove()
    call = (args, kwargs)
    image_call = ImageCall(args, kwargs, output)
    layer = tower.layers[tower.feature_layer]
    base = _features_with(c, call, layer, None)
    offsets = [sum(lengths[:r]) for r in range(len(lengths))]
    for r in sorted({0, len(lengths) - 1}):
        for p in pushed_positions(lengths[r]):
            values = [torch.zeros(n, 1) for n in lengths]
            values[r][p] = 1.0
            mapped = c.adapter.map_vision_patches(image_call, values)
            _expect(mapped is not None, name, "the adapter describes a vision tower but maps no patches")
            marked = torch.cat([m.reshape(-1) for m in mapped]).abs() > 1e-9
            moved = (_features_with(c, call, layer, offsets[r] + p) - base).abs().amax(-1) > 1e-4
            _expect(
                marked.shape == moved.shape and bool((marked == moved).all()),
                name,
                f"position {p} of tower sequence {r} maps to tokens {marked.nonzero().flatten().tolist()}, but the "
                f"model builds tokens {moved.nonzero().flatten().tolist()} from it",
            )
    ones = torch.cat(
        [m.reshape(-1) for m in c.adapter.map_vision_patches(image_call, [torch.ones(n, 1) for n in lengths])]
    )
    covered = ones.abs() > 1e-9
    if not tower.has_cls:
        torch.testing.assert_close(ones[covered], torch.ones_like(ones[covered]), rtol=0, atol=1e-5)


ADAPTER_CHECKS: tuple[Invariant, ...] = (
    Invariant("rotary matches the model", rotary_matches_model),
    Invariant("layouts cover the visual tokens", layout_covers_visual_tokens),
    Invariant("vision patches map to tokens", vision_patches_map_to_tokens),
)
"""The adapter's own answers where the invariants cannot see a mistake (see each function)."""


def check_adapter(
    model: nn.Module,
    make_inputs: MakeInputs,
    specs: Sequence[Any],
    *,
    generated_token_type_id: int = 0,
    plugins: PluginManager | None = None,
    pad_token_id: int = 0,
    suppress_tokens: Sequence[int] | None = None,
) -> None:
    """Build the case once, then run :data:`INVARIANTS` and :data:`ADAPTER_CHECKS` on it.

    Arguments as for :func:`adapter_case`.

    Raises:
        AdapterCheckError: naming the first check that failed (or ``assert_close``'s
            ``AssertionError`` for a tolerance).
        ValueError: arguments the checks cannot use (see the module docstring).
        UnsupportedModelError: no installed or given adapter claims ``model.config.model_type``.
    """
    case = adapter_case(
        model,
        make_inputs,
        specs,
        plugins=plugins,
        pad_token_id=pad_token_id,
        suppress_tokens=suppress_tokens,
        generated_token_type_id=generated_token_type_id,
    )
    for check in (*INVARIANTS, *ADAPTER_CHECKS):
        check.run(case)


def _standalone(invariant: Callable[..., None]) -> Callable[..., None]:
    """``check_<name>(model, make_inputs, specs, **options)``: ``invariant`` on its own :func:`adapter_case`.

    Keyword options that :func:`adapter_case` takes build the case; the others (``positions``) go to
    the invariant.
    """
    case_options = set(inspect.signature(adapter_case).parameters) - {"model", "make_inputs", "specs"}

    def check(model: nn.Module, make_inputs: MakeInputs, specs: Sequence[Any], **options: Any) -> None:
        case = adapter_case(model, make_inputs, specs, **{k: v for k, v in options.items() if k in case_options})
        invariant(case, **{k: v for k, v in options.items() if k not in case_options})

    check.__name__ = check.__qualname__ = f"check_{invariant.__name__}"
    summary = (invariant.__doc__ or "").strip().splitlines()[0]
    check.__doc__ = (
        f"{summary}\n\nThe standalone form of :func:`{invariant.__name__}`: builds the case with "
        ":func:`adapter_case` (its keyword arguments), then runs the check."
    )
    return check


check_keep_all_is_identity = _standalone(keep_all_is_identity)
check_cached_decode_equals_recompute = _standalone(cached_decode_equals_recompute)
check_kv_cache_holds_kept_tokens = _standalone(kv_cache_holds_kept_tokens)
check_remove_restores_model = _standalone(remove_restores_model)
check_batch_equals_one_by_one = _standalone(batch_equals_one_by_one)
check_probe_matches_eager_attention = _standalone(probe_matches_eager_attention)
check_rotary_matches_model = _standalone(rotary_matches_model)
check_layout_covers_visual_tokens = _standalone(layout_covers_visual_tokens)
check_vision_patches_map_to_tokens = _standalone(vision_patches_map_to_tokens)


__all__ = [
    "ADAPTER_CHECKS",
    "INVARIANTS",
    "KEEP_ALL",
    "PROBE_TOLERANCE",
    "PRUNE",
    "PRUNE_TOLERANCE",
    "AdapterCase",
    "AdapterCheckError",
    "FirstK",
    "Invariant",
    "MakeInputs",
    "ProbeRecorder",
    "SeededDrop",
    "adapter_case",
    "adapter_check_manager",
    "batch_equals_one_by_one",
    "cached_decode_equals_recompute",
    "cached_key_lengths",
    "check_adapter",
    "check_batch_equals_one_by_one",
    "check_cached_decode_equals_recompute",
    "check_keep_all_is_identity",
    "check_kv_cache_holds_kept_tokens",
    "check_layout_covers_visual_tokens",
    "check_probe_matches_eager_attention",
    "check_remove_restores_model",
    "check_rotary_matches_model",
    "check_vision_patches_map_to_tokens",
    "keep_all_is_identity",
    "kv_cache_holds_kept_tokens",
    "layout_covers_visual_tokens",
    "probe_matches_eager_attention",
    "remove_restores_model",
    "rotary_matches_model",
    "vision_patches_map_to_tokens",
]
