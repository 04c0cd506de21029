"""Cost accounting: FLOPs three ways (analytic, fvcore, torch), latency, memory, KV-cache size.

Units are stated everywhere: a MAC is one multiply-accumulate; FLOPs = 2 x MACs. Like fvcore and
``torch.utils.flop_counter``, only matrix products count (linear layers, attention's QK^T and AV,
convolutions); norms, activations and softmax do not, and attention is counted over the full
``n_q x n_kv`` score matrix whatever the causal mask.
"""

from tokenprune.cost.analytic import DecoderShape, LanguageModelMacs, language_model_macs
from tokenprune.cost.counters import fvcore_macs, torch_flops

__all__ = ["DecoderShape", "LanguageModelMacs", "fvcore_macs", "language_model_macs", "torch_flops"]
