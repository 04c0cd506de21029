"""MiniCPM-V 4.6 / 4.7 and MiniCPM-V-OCR: the generic adapter plus vision attention on their NaViT tower.

The three families share one vision side (``modeling_minicpmv4_6.py``; 4.7's and OCR's are copies): every slice of
the batch (a thumbnail and the slices of each image) is NaViT-packed into one sequence of patches in raster order,
``target_sizes`` giving each slice's ``(h, w)`` in patches, and the tower's SigLIP-like encoder layers attend within
each slice (one attention call per slice, ``cu_seqlens`` chunks, through ``ALL_ATTENTION_FUNCTIONS``). In the
``16x`` mode (the default; ``downsample_mode="4x"`` skips it, MiniCPM-V-OCR's config) the *window merger* runs after
layer ``insert_layer_id``: attention inside each 2x2 window of a slice's patches, then one position per window (an MLP
over the window's 4 patches plus their mean), so the later layers see each slice as an ``(h/2, w/2)`` grid, again in
raster order. After the last layer and ``post_layernorm`` the *merger* (``merge_kernel_size`` 2x2, ``merger_times``
rounds) concatenates each 2x2 block of neighbouring positions into one token, tokens in raster order.

So the model builds each language-model token from a block of neighbouring patches of its slice, never from learned
queries: it is *not* the cross-attention resampler of MiniCPM-V 2.x (no query cross-attends to every patch).
:meth:`MiniCPMVAdapter.map_vision_patches` gives each token the mean of the positions of the probed layer's sequence
it is built from: a block of ``2^t`` positions a side after the window merger, ``2^(t+1)`` before it (``t`` the
merger's rounds; ``2^t`` in the ``4x`` mode). The probe reads layers before and after the window merger alike: the
length of each recorded sequence says which grid it is. The default probed layer is the last one (its output, after
``post_layernorm``, is the merger's input). No CLS token: ``attention: mean`` only.

Departure (docs/models.md, MiniCPM-V): the mean over a token's block is the convention every merging tower here follows
(Qwen2-VL's 2x2 units); the model builds the token through MLPs over the block's concatenated positions (plus, in the
window merger, their mean), not by averaging them.

Refused: ``pre_projector`` and ``vision_layer`` stages (the merger concatenates each block of raster-ordered
positions, not a per-token projector, and the slices' patches are not stored as merge units of consecutive rows, which
the packed-tower stages reduce), and vision attention on video tokens: the videos run through the same tower, but the
forward does not know which units make a frame (``VisionTower.videos`` is ``False``; a stage reading vision
attention takes ``tokens: image`` on a batch with videos).
"""

from __future__ import annotations

from torch import Tensor

from tokenprune.adapters.base import ImageCall, VisionTower
from tokenprune.adapters.generic import GenericAdapter
from tokenprune.adapters.vision import block_means
from tokenprune.errors import TokenpruneError


class MiniCPMVAdapter(GenericAdapter):
    """MiniCPM-V 4.6 / 4.7, MiniCPM-V-OCR: the generic adapter (slices' layouts from ``target_sizes``, Qwen3.5's
    hybrid language model, 4.7's M-RoPE) plus vision attention on ``vision_tower.encoder.layers``."""

    name = "minicpmv"
    model_types = ("minicpmv4_6", "minicpmv4_7", "minicpm_ocr")
    notes = "generic adapter + vision attention on the NaViT tower (each token the mean of its block of patches)"
    pre_projector_refusal = (
        "its merger concatenates each 2x2 block of a slice's raster-ordered positions into one token (after the "
        "tower's own 2x2 window merger in the 16x mode), so it is no per-token projector, and the slices' patches are "
        "not stored as merge units of consecutive rows, which pre_projector and vision_layer stages on a packed tower "
        "reduce; vision attention is served at post_projector"
    )

    def vision_tower(self) -> VisionTower | None:
        """The encoder's layers, probed at the last (its output, after ``post_layernorm``, is the merger's input)."""
        layers = tuple(self.tower().encoder.layers)
        notes = "last layer (the merger's input); layers after the window merger see each slice at half resolution"
        return VisionTower(type(self.tower()).__name__, layers, len(layers) - 1, False, notes)

    def map_vision_patches(self, call: ImageCall, values: list[Tensor]) -> list[Tensor] | None:
        """One tower sequence per slice (``target_sizes`` order), ``(S_r, C)`` in raster order; one ``(n_r, C)`` per
        slice, token ``(i, j)`` the mean of the ``k x k`` block of positions ``(k i + a, k j + b)``.

        ``S_r = h w`` (a layer before the window merger, or no window merger) or ``S_r = (h / 2) (w / 2)`` (after
        it); ``k`` makes the block one token's (see the module docstring).

        Raises:
            TokenpruneError: a sequence's length fits neither grid of its slice, or the sequences are not one per slice.
        """
        sizes = call.argument("target_sizes", self.vlm().get_image_features)
        if not isinstance(sizes, Tensor):
            return None
        slices = sizes.long().tolist()
        if len(slices) != len(values):
            raise TokenpruneError(
                f"the {type(self.tower()).__name__} recorded {len(values)} attention sequences for {len(slices)} slices"
            )
        window, (mh, mw) = self._factors(call)
        return [_block_means(v, h, w, window, mh, mw) for (h, w), v in zip(slices, values, strict=True)]

    def _factors(self, call: ImageCall) -> tuple[int, tuple[int, int]]:
        """The window merger's side (``1`` where it does not run) and the merger's total ``(rows, cols)`` factor."""
        cfg = self.vlm().config
        mode = call.kwargs.get("downsample_mode") or getattr(cfg, "downsample_mode", None)
        merged = mode != "4x" and int(getattr(cfg.vision_config, "insert_layer_id", -1)) >= 0
        window = int(cfg.vision_config.window_kernel_size[0]) if merged else 1
        mh, mw = (int(k) for k in cfg.merge_kernel_size)
        times = int(cfg.merger_times)
        return window, (mh**times, mw**times)


def _block_means(values: Tensor, h: int, w: int, window: int, mh: int, mw: int) -> Tensor:
    """``(S, C)`` raster-ordered positions of an ``h x w``-patch slice to its ``(h/(window mh)) (w/(window mw)), C)``
    tokens, each the mean of its block (``S`` the patch grid's or, after the window merger, the window grid's)."""
    rows, cols = h // (window * mh), w // (window * mw)
    grids = {h * w: (h, w), (h // window) * (w // window): (h // window, w // window)}
    grid = grids.get(int(values.shape[0]))
    if grid is None:
        raise TokenpruneError(
            f"a vision-tower sequence of {values.shape[0]} positions fits neither the {h} x {w} patches of its slice "
            f"nor its {h // window} x {w // window} windows"
        )
    gh, gw = grid
    return block_means(values.reshape(gh, gw, values.shape[-1]), gh // rows, gw // cols)
