"""Where each visual token comes from: image or video, view, frame, row, column, and whether it is a newline.

Adapters describe the visual tokens of their model family with a :class:`TokenLayout`; spatial
reducers (downsampling, G-Prune's separate graphs, ATP's spatial sampling) and kept-token heatmaps
read it. All fields are ``(B, N)`` tensors aligned with the visual tokens of one insertion point.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor

from tokenprune.errors import ReducerInputError


@dataclass(frozen=True)
class TokenLayout:
    """Provenance of every visual token of a batch.

    Attributes:
        image: ``(B, N)`` long. Index of the image within its sample (several images per prompt).
        view: ``(B, N)`` long. ``0`` for the base (global) view; ``1`` for the high-resolution grid
            of an anyres model (LLaVA-NeXT), or ``1 + t`` for tile ``t`` where tiles stay separate.
        row: ``(B, N)`` long. Row of the token in its view's feature grid (``-1`` where unknown).
        col: ``(B, N)`` long. Column in its view's feature grid; for a newline token, the grid width.
        newline: ``(B, N)`` bool. True for row-end ``image_newline`` tokens (LLaVA-NeXT).
        frame: ``(B, N)`` long. For a video token, the index of its frame (its temporal step: Qwen's
            temporal patch groups two input frames into one); ``0`` for images. Defaults to zeros.
        video: ``(B, N)`` bool. A video token (``image`` then numbers the videos of the sample).
            Defaults to all ``False``.
        crop: ``(B, N)`` long. For a token of a stitched high-resolution grid (LLaVA-NeXT's view 1), the
            anyres crop its patch was cut from, in raster order of the padded crop grid, so crops stay
            located where unpadding removed rows or columns at the top or left (``row`` and ``col`` count
            from the unpadded grid's corner); a newline takes its row's crop. ``-1`` where unknown (every
            other token, and adapters that do not say). Defaults to ``-1``.

    Entries at padded positions (see :attr:`tokenprune.ReduceContext.valid`) are meaningless.
    """

    image: Tensor
    view: Tensor
    row: Tensor
    col: Tensor
    newline: Tensor
    frame: Tensor = None  # type: ignore[assignment]  # zeros when not given (images)
    video: Tensor = None  # type: ignore[assignment]  # False when not given (images)
    crop: Tensor = None  # type: ignore[assignment]  # -1 (unknown) when not given

    def __post_init__(self) -> None:
        if self.frame is None:
            object.__setattr__(self, "frame", torch.zeros_like(self.image))
        if self.video is None:
            object.__setattr__(self, "video", torch.zeros_like(self.image, dtype=torch.bool))
        if self.crop is None:
            object.__setattr__(self, "crop", torch.full_like(self.image, -1))
        shape = self.image.shape
        for f in fields(self):
            value = getattr(self, f.name)
            if value.shape != shape or value.dim() != 2:
                raise ValueError(
                    f"TokenLayout.{f.name} has shape {tuple(value.shape)}; every field must be (B, N) "
                    f"like TokenLayout.image {tuple(shape)}"
                )

    @property
    def shape(self) -> torch.Size:
        """``(B, N)``."""
        return self.image.shape

    def gather(self, indices: Tensor) -> TokenLayout:
        """The layout of the tokens at ``indices`` (``(B, K)`` long, padding entries ``-1``)."""
        safe = indices.clamp(min=0)
        return TokenLayout(**{f.name: getattr(self, f.name).gather(1, safe) for f in fields(self)})

    def to(self, device: torch.device | str) -> TokenLayout:
        """A copy on ``device``."""
        return TokenLayout(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    def sample(self, i: int, n: int) -> TokenLayout:
        """The ``(1, n)`` layout of sample ``i``'s first ``n`` tokens (its padding cut off)."""
        return TokenLayout(**{f.name: getattr(self, f.name)[i : i + 1, :n] for f in fields(self)})

    @classmethod
    def grid(
        cls,
        rows: int,
        cols: int,
        *,
        batch: int = 1,
        newlines: bool = False,
        view: int = 0,
        image: int = 0,
        frame: int = 0,
        video: bool = False,
    ) -> TokenLayout:
        """The raster layout of one ``rows x cols`` feature grid, optionally with a newline per row.

        Returns a layout of ``N = rows * (cols + newlines)`` tokens, repeated ``batch`` times.
        """
        width = cols + (1 if newlines else 0)
        r = torch.arange(rows).repeat_interleave(width)
        c = torch.arange(width).repeat(rows)
        nl = c == cols if newlines else torch.zeros_like(c, dtype=torch.bool)
        expand = lambda t: t.unsqueeze(0).expand(batch, -1).clone()  # noqa: E731
        return cls(
            image=expand(torch.full_like(r, image)),
            view=expand(torch.full_like(r, view)),
            row=expand(r),
            col=expand(c),
            newline=expand(nl),
            frame=expand(torch.full_like(r, frame)),
            video=expand(torch.full_like(r, int(video), dtype=torch.bool)),
        )

    @classmethod
    def cat(cls, layouts: list[TokenLayout]) -> TokenLayout:
        """Concatenate layouts along the token axis (e.g. base view then high-res grid)."""
        if not layouts:
            raise ValueError("TokenLayout.cat needs at least one layout")
        return cls(**{f.name: torch.cat([getattr(x, f.name) for x in layouts], 1) for f in fields(cls)})


def sequence_layout(layouts: list[TokenLayout], visual: Tensor) -> TokenLayout:
    """Place per-image layouts on the visual columns of a batch.

    Args:
        layouts: One ``(1, n_i)`` layout per image of the batch, in order (an adapter's
            ``image_layouts``); a sample's images follow each other, and each is numbered by its
            position within its sample.
        visual: ``(B, L)`` bool, the visual columns of the sequence.

    Returns:
        A ``(B, L)`` layout: the images' provenance at visual columns, ``-1`` (image, row, column)
        elsewhere.

    Raises:
        ValueError: the layouts do not cover exactly the visual columns, sample by sample.
    """
    counts = visual.sum(1).tolist()
    sizes = [int(lay.shape[1]) for lay in layouts]
    if sum(sizes) != sum(counts):
        raise ValueError(f"layouts of {sizes} tokens cannot cover {counts} visual tokens per sample")
    batch, length = visual.shape
    device = visual.device
    full = {
        "image": torch.full((batch, length), -1, dtype=torch.long, device=device),
        "view": torch.zeros(batch, length, dtype=torch.long, device=device),
        "row": torch.full((batch, length), -1, dtype=torch.long, device=device),
        "col": torch.full((batch, length), -1, dtype=torch.long, device=device),
        "newline": torch.zeros(batch, length, dtype=torch.bool, device=device),
        "frame": torch.zeros(batch, length, dtype=torch.long, device=device),
        "video": torch.zeros(batch, length, dtype=torch.bool, device=device),
        "crop": torch.full((batch, length), -1, dtype=torch.long, device=device),
    }
    it = iter(layouts)
    for b, count in enumerate(counts):
        parts: list[TokenLayout] = []
        got = 0
        while got < count:
            lay = next(it)
            parts.append(replace(lay, image=torch.full_like(lay.image, len(parts))))
            got += int(lay.shape[1])
        if got != count:
            raise ValueError(f"layouts of {sizes} tokens do not split into {counts} visual tokens per sample")
        if not parts:
            continue
        cat = TokenLayout.cat(parts).to(device)
        cols = visual[b].nonzero().squeeze(1)
        for name, tensor in full.items():
            tensor[b, cols] = getattr(cat, name)[0].to(tensor.dtype)
    return TokenLayout(**full)


def combine_layouts(images: TokenLayout | None, videos: TokenLayout | None, video_columns: Tensor) -> TokenLayout:
    """One ``(B, L)`` layout from the image tokens' and the video tokens' (each from :func:`sequence_layout`).

    ``video_columns`` (``(B, L)`` bool) says where the video layout applies; a part that is ``None``
    (no such tokens) leaves the other one.
    """
    if images is None or videos is None:
        only = images if videos is None else videos
        if only is None:
            raise ValueError("combine_layouts needs at least one layout")
        return only
    pick = {
        f.name: torch.where(video_columns, getattr(videos, f.name), getattr(images, f.name)) for f in fields(images)
    }
    return TokenLayout(**pick)


def video_frames(layout: TokenLayout, members: Tensor, b: int) -> list[tuple[int, list[Tensor]]]:
    """The frames of every video of sample ``b``: for each video, its frames' token indices in frame order.

    Args:
        layout: The tokens' layout.
        members: ``(N,)`` bool, the tokens of sample ``b`` to group (a video reducer passes the valid video
            tokens that are neither newlines nor protected).
        b: The sample.

    Returns:
        ``[(video, [frame_0, frame_1, ...]), ...]`` by video number; each ``frame_i`` is a ``(T_i,)`` long
        tensor of token indices in sequence order. Frames may differ in size (the caller checks).
    """
    members = members & layout.video[b]
    out: list[tuple[int, list[Tensor]]] = []
    for video in layout.image[b][members].unique().tolist():
        index = (members & (layout.image[b] == video)).nonzero().squeeze(1)
        frame = layout.frame[b, index]
        out.append((int(video), [index[frame == f] for f in frame.unique().tolist()]))
    return out


#: The ``frame`` of a video token whose frame the model's inputs do not give (MiniCPM-V: its forward receives the
#: patch grid of every frame and slice, not which units make a frame nor a video); video reducers refuse it.
UNKNOWN_FRAME = -1


def refuse_unknown_frames(layout: TokenLayout, members: Tensor, b: int, reducer: str) -> None:
    """Raise where a token of ``members`` (``(N,)`` bool, sample ``b``) is a video token of :data:`UNKNOWN_FRAME`.

    Raises:
        ReducerInputError: naming ``reducer``, the sample, why the frames are unknown and what runs instead.
    """
    unknown = members & layout.video[b] & (layout.frame[b] == UNKNOWN_FRAME)
    if bool(unknown.any()):
        raise ReducerInputError(
            f"reducer {reducer!r}: sample {b}: the model's inputs do not say which frame each video token belongs to "
            "(MiniCPM-V's forward receives every frame's and slice's patch grid, target_sizes_videos, but not how "
            "many frames each video has nor which units are a frame's slices; see docs/models.md), and this reducer "
            "works frame by frame. A reducer that reads no frames (random, divprune, ...) runs on `tokens: video`"
        )


def reducible_video_frames(
    layout: TokenLayout | None, valid: Tensor, protected: Tensor, b: int, reducer: str, why: str
) -> list[tuple[int, Tensor]]:
    """The videos of sample ``b`` as ``(video, index)``, ``index`` the ``(F, T)`` token indices of its frames.

    The tokens are the valid video tokens that are neither newlines nor protected (what a video reducer
    may drop). A reducer that compares frames token by token needs every frame of a video to hold as
    many tokens: frames of different sizes raise :class:`~tokenprune.errors.ReducerInputError` naming
    ``reducer``, the sample, the video and ``why`` (the reason the reducer needs equal frames); video tokens of
    :data:`UNKNOWN_FRAME` raise it too (:func:`refuse_unknown_frames`).
    """
    if layout is None:
        return []
    out = []
    members = valid[b] & ~layout.newline[b] & ~protected[b]
    refuse_unknown_frames(layout, members, b, reducer)
    for video, frames in video_frames(layout, members, b):
        sizes = {int(f.numel()) for f in frames}
        if len(sizes) > 1:
            raise ReducerInputError(
                f"reducer {reducer!r}: sample {b}, video {video}: frames hold {sorted(sizes)} tokens; {why}, so "
                "every frame must hold as many (run it before any other stage reduces the video's tokens)"
            )
        out.append((video, torch.stack(frames)))
    return out
