"""The engine: run a pipeline of token reducers inside an unmodified transformers VLM.

:func:`apply` installs PyTorch hooks on the model and returns a :class:`PruningRun`, which is also
a context manager; :meth:`PruningRun.remove` (or leaving the ``with``) takes every hook away and
restores the model exactly. Nothing is forked, no class is swapped, nothing is patched at import.
Users keep calling ``model(**inputs)`` and ``model.generate(**inputs)`` as before.

How it works (details in ``docs/engine.md``), one module each:

* :mod:`~tokenprune.engine.prepare`: :func:`prepare` validates a pipeline and builds its reducers
  once; :mod:`~tokenprune.engine.run`: the public handle (``apply`` binds and installs);
  :mod:`~tokenprune.engine.install`: the checks at install time and the immutable plan they freeze;
  :mod:`~tokenprune.engine.forward`: the hooks that run the pipeline inside the model's forward
  (:mod:`~tokenprune.engine.layer_hooks`: those on the decoder layers);
  :mod:`~tokenprune.engine.forward_state`: one forward's state (prefill or decoding step) and one prefill's.
  A forward pass whose cache is empty (or absent) is a prefill: the pipeline runs. Later cached
  steps only have their masks and positions adjusted to the pruned cache. A stage that should have
  run on a prefill with visual tokens but did not is an error, never an unpruned result.
* **post_projector stages** run in a forward pre-hook on the language model, which receives
  ``inputs_embeds`` with the projected image features already merged in at the placeholder
  positions (visual positions come from ``input_ids``, seen by a pre-hook on the multimodal base
  model). The hook rebuilds ``inputs_embeds``, the attention mask and the position ids.
* **layer: k stages** run in a forward hook on decoder layer ``k - 1``, which replaces that layer's
  output by the kept rows. Pre-hooks on layers ``k, k+1, ...`` slice what the language model
  computed once for the whole sequence: every per-token argument follows the cut as
  :mod:`~tokenprune.engine.layer_args` declares (the 4-D attention mask, the rotary
  ``position_embeddings``, ``position_ids``, any other ``(B, L, ...)`` tensor, and what the adapter adds).
* :mod:`~tokenprune.engine.stage`: one stage as a pure function, sequence and hidden states in,
  the kept ones out. :mod:`~tokenprune.engine.sequence` tracks where each kept token came from.
* **Ragged batches.** Samples may keep different numbers of tokens. After every stage each
  sample's surviving tokens are right-aligned (left padding) and padding slots are masked out.
* :mod:`~tokenprune.engine.pruned_inputs`: during decoding, the caller's (or ``generate``'s) 2-D mask over
  the unpruned sequence is mapped onto the pruned cache, and positions continue from the unpruned
  length (``original``) or shift down by the freed positions (``compact``).
* :mod:`~tokenprune.engine.hooks`: installing and removing hooks, all or nothing.
* :mod:`~tokenprune.engine.guards`: the refusals (a stage that did not run, images without
  ``input_ids``, a layer the model lacks, an attention implementation that cannot be probed).
* :mod:`~tokenprune.engine.compat`: every assumption about transformers' internals, detected by
  feature, with the releases it was verified on.
* **Attention probe.** Stages whose reducer reads attention get it from
  :class:`tokenprune.engine.probe.AttentionProbe`, computed under sdpa at layer ``k - 1`` only.
* **Training.** ``labels`` are taken out of the call and the loss is computed on the logits of the
  kept tokens with the labels of those tokens.
* :mod:`~tokenprune.engine.soft`: training a reducer that decides what to keep (:class:`SoftMaskRun`):
  its ``soft_keep`` logits become a differentiable key mask instead of a cut.
"""

from tokenprune.engine.prepare import PreparedPipeline, prepare
from tokenprune.engine.run import PruningRun, apply
from tokenprune.engine.soft import SoftForward, SoftKeep, SoftMaskReducer, SoftMaskRun

__all__ = [
    "PreparedPipeline",
    "PruningRun",
    "SoftForward",
    "SoftKeep",
    "SoftMaskReducer",
    "SoftMaskRun",
    "apply",
    "prepare",
]
