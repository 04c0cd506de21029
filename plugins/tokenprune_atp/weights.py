"""ATP's weights: the per-module threshold heads, their configuration and their safetensors file.

ATP-LLaVA (Ye et al., CVPR 2025, https://arxiv.org/abs/2412.00447) places *ATP modules* between
decoder layers; each predicts two per-instance thresholds from the statistics of
:mod:`tokenprune_atp.scores`:

* :class:`ATPHead`: statistics (and a pooled summary of the hidden states) to ``(θ_r, θ_s)``;
* :class:`ATPWeights`: the heads of every module plus :class:`ATPConfig`, saved as safetensors
  with a JSON config, validated against the model they are used with.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from tokenprune.errors import TokenpruneError
from tokenprune_atp.scores import NUM_STATS

FORMAT = "tokenprune-atp"
VERSION = 1
WEIGHTS_FILE = "atp.safetensors"
CONFIG_FILE = "atp.json"


class ATPWeightsError(TokenpruneError, ValueError):
    """ATP weights are missing, malformed, or do not fit the model they are used with."""


def weights_file(path: str | Path) -> Path:
    """The safetensors file of ATP weights at ``path``: the file itself, or ``atp.safetensors`` in a directory."""
    p = Path(path)
    return p / WEIGHTS_FILE if p.is_dir() else p


def default_layers(num_layers: int, count: int = 3) -> list[int]:
    """Module layers spread over the depth like ATP-LLaVA's 4/14/24 of 32.

    Layer ``k`` means "between decoder layers ``k - 1`` and ``k``". The fractions 4/32, 14/32 and
    24/32 are rounded and made distinct and valid (``1 <= k < num_layers``).

    >>> default_layers(32), default_layers(4), default_layers(2)
    ([4, 14, 24], [1, 2, 3], [1])
    """
    if num_layers < 2:
        raise ValueError(f"ATP needs a language model with at least 2 decoder layers, got {num_layers}")
    fractions = [4 / 32, 14 / 32, 24 / 32][:count]
    out: list[int] = []
    for f in fractions:
        k = min(num_layers - 1, max(1, round(f * num_layers)))
        while k in out and k < num_layers - 1:
            k += 1
        if k not in out:
            out.append(k)
    return sorted(out)


@dataclass
class ATPConfig:
    """What the weights were trained for; stored next to them (``atp.json``) and inside the file.

    Attributes:
        hidden_size: The language model's hidden size ``D``.
        num_layers: The language model's decoder layer count.
        layers: Module layers (``k``: the module runs between decoder layers ``k - 1`` and ``k``).
        embed_dim: Size of the pooled hidden-state summary fed to each head.
        width: Hidden width of each head's MLP.
        spatial_lambda: ``λ`` of the spatial score ``1 - λ / s^2`` (stride ``s``).
        protect_newlines: The row-end newline tokens were always kept in training.
        model_type: ``config.model_type`` of the model (informational).
        base_model: Path or id of the model (informational).
        target_tokens: The average visual-token count the weights were trained for.
        train: The training settings (informational).
    """

    hidden_size: int
    num_layers: int
    layers: list[int]
    embed_dim: int = 16
    width: int = 32
    spatial_lambda: float = 3.0
    protect_newlines: bool = True
    model_type: str | None = None
    base_model: str | None = None
    target_tokens: float | None = None
    train: dict[str, Any] = field(default_factory=dict)
    format: str = FORMAT
    version: int = VERSION

    def __post_init__(self) -> None:
        if self.format != FORMAT:
            raise ATPWeightsError(f"not an ATP config: format is {self.format!r}, expected {FORMAT!r}")
        if self.version != VERSION:
            raise ATPWeightsError(f"ATP weights version {self.version} is not supported (this build reads {VERSION})")
        if self.hidden_size < 1 or self.num_layers < 2:
            raise ATPWeightsError(f"bad ATP config: hidden_size={self.hidden_size}, num_layers={self.num_layers}")
        bad = [k for k in self.layers if not 1 <= k < self.num_layers]
        if not self.layers or bad or len(set(self.layers)) != len(self.layers):
            raise ATPWeightsError(
                f"bad ATP module layers {self.layers}: need distinct layers k with 1 <= k < {self.num_layers}"
            )
        self.layers = sorted(int(k) for k in self.layers)

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable dict."""
        return asdict(self)


class ATPHead(nn.Module):
    """One ATP module's threshold head: per-instance ``(θ_r, θ_s)`` in ``(0, 1)``.

    ``θ = sigmoid(MLP([stats, W_p · pooled]))`` where ``stats`` is :func:`score_statistics`
    (``(B, NUM_STATS)``) and ``pooled`` the mean of the layer-normalised hidden states of the
    candidate visual tokens (``(B, D)``). The last layer starts at zero weight with biases giving
    ``θ_r = 0.3`` and ``θ_s = 0.9``.
    """

    def __init__(self, hidden_size: int, embed_dim: int = 16, width: int = 32) -> None:
        super().__init__()
        self.pool = nn.Linear(hidden_size, embed_dim)
        self.fc1 = nn.Linear(NUM_STATS + embed_dim, width)
        self.fc2 = nn.Linear(width, 2)
        nn.init.zeros_(self.fc2.weight)
        with torch.no_grad():
            self.fc2.bias.copy_(torch.tensor([math.log(0.3 / 0.7), math.log(0.9 / 0.1)]))

    def forward(self, stats: Tensor, pooled: Tensor) -> Tensor:
        """``(B, NUM_STATS)`` statistics and ``(B, D)`` pooled states to ``(B, 2)`` thresholds ``(θ_r, θ_s)``."""
        z = torch.cat([stats, self.pool(pooled)], dim=-1)
        return torch.sigmoid(self.fc2(nn.functional.gelu(self.fc1(z))))

    def macs(self, batch: int) -> int:
        """Multiply-accumulates of :meth:`forward` on ``batch`` rows."""
        return batch * sum(m.in_features * m.out_features for m in (self.pool, self.fc1, self.fc2))


class ATPWeights(nn.Module):
    """The heads of every ATP module of one model, with their :class:`ATPConfig`.

    ``heads[str(k)]`` is the head of the module at layer ``k``.
    """

    def __init__(self, config: ATPConfig) -> None:
        super().__init__()
        self.config = config
        self.heads = nn.ModuleDict(
            {str(k): ATPHead(config.hidden_size, config.embed_dim, config.width) for k in config.layers}
        )

    def head(self, layer: int) -> ATPHead:
        """The head at ``layer``; :class:`ATPWeightsError` if the weights have no module there."""
        if str(layer) not in self.heads:
            raise ATPWeightsError(
                f"these ATP weights have modules at layers {self.config.layers}, not at layer {layer}; use one stage "
                f"per module layer ({', '.join(f'at: {{layer: {k}}}' for k in self.config.layers)})"
            )
        return self.heads[str(layer)]

    # --- files --------------------------------------------------------------------------------

    def save(self, path: str | Path) -> Path:
        """Write ``atp.safetensors`` and ``atp.json`` into directory ``path``, atomically; returns the weights file.

        The config is also stored in the safetensors metadata (key ``atp_config``), so the weights
        file alone is enough to load them.
        """
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        text = json.dumps(self.config.to_json(), indent=2, sort_keys=True)
        tensors = {k: v.detach().float().contiguous().cpu() for k, v in self.state_dict().items()}
        tmp = out / (WEIGHTS_FILE + ".tmp")
        save_file(tensors, str(tmp), metadata={"format": FORMAT, "atp_config": text})
        os.replace(tmp, out / WEIGHTS_FILE)
        tmp_json = out / (CONFIG_FILE + ".tmp")
        tmp_json.write_text(text + "\n")
        os.replace(tmp_json, out / CONFIG_FILE)
        return out / WEIGHTS_FILE

    @classmethod
    def load(cls, path: str | Path) -> ATPWeights:
        """Read weights written by :meth:`save`: a directory holding ``atp.safetensors``, or that file.

        Raises:
            ATPWeightsError: the file is missing, not ATP weights, or its tensors do not match its config.
        """
        p = Path(path)
        file = weights_file(p)
        if not file.is_file():
            raise ATPWeightsError(
                f"no ATP weights at {p} (expected a directory holding {WEIGHTS_FILE}, or the file itself); train "
                "them with `tokenprune train-atp`"
            )
        from safetensors import safe_open

        try:
            with safe_open(str(file), framework="pt") as f:
                meta = f.metadata() or {}
        except Exception as exc:  # safetensors raises its own error types for corrupt files
            raise ATPWeightsError(f"{file} is not a readable safetensors file: {exc}") from exc
        if meta.get("format") != FORMAT or "atp_config" not in meta:
            raise ATPWeightsError(f"{file} is a safetensors file but not ATP weights (no {FORMAT!r} metadata)")
        try:
            config = ATPConfig(**json.loads(meta["atp_config"]))
        except TypeError as exc:
            raise ATPWeightsError(f"{file}: malformed ATP config: {exc}") from exc
        weights = cls(config)
        state = load_file(str(file))
        expected = weights.state_dict()
        missing = sorted(set(expected) - set(state))
        extra = sorted(set(state) - set(expected))
        wrong = [
            f"{k} {tuple(state[k].shape)} (expected {tuple(v.shape)})"
            for k, v in expected.items()
            if k in state and state[k].shape != v.shape
        ]
        if missing or extra or wrong:
            raise ATPWeightsError(
                f"{file}: tensors do not match the stored config (missing {missing}, unexpected {extra}, "
                f"wrong shapes {wrong})"
            )
        weights.load_state_dict(state)
        return weights.eval()

    def check_model(self, model: nn.Module) -> None:
        """Raise :class:`ATPWeightsError` naming every mismatch between these weights and ``model``.

        Checks the language model's hidden size and decoder layer count.
        """
        text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        hidden = int(text.hidden_size)
        layers = int(text.num_hidden_layers)
        problems = []
        if hidden != self.config.hidden_size:
            problems.append(f"hidden size {self.config.hidden_size} (the model's is {hidden})")
        if layers != self.config.num_layers:
            problems.append(f"{self.config.num_layers} decoder layers (the model has {layers})")
        if problems:
            raise ATPWeightsError(
                f"these ATP weights (base model {self.config.base_model!r}) do not fit this "
                f"{getattr(model.config, 'model_type', '?')} model: they were trained for " + " and ".join(problems)
            )


def load_atp(path: str | Path, model: nn.Module | None = None) -> ATPWeights:
    """Load ATP weights and, if ``model`` is given, check that they fit it (:meth:`ATPWeights.check_model`)."""
    weights = ATPWeights.load(path)
    if model is not None:
        weights.check_model(model)
    return weights
