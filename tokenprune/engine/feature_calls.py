"""The image and video feature calls of a forward, recorded by wrapping the model's feature methods.

The engine needs the arguments and output of ``get_image_features`` (and ``get_video_features``) to
lay the visual tokens out, and the vision probe must watch the tower while they run. ``generate``
makes these calls before the prefill since transformers 5.2x (it pre-encodes the images), so they
are recorded where they happen rather than from inside the forward.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from tokenprune.adapters.base import ImageCall
from tokenprune.engine.hooks import HookSet
from tokenprune.engine.vision_probe import VisionProbe


@dataclass
class FeatureCalls:
    """The last image and video feature calls, and the vision probe that watches the image call.

    Attributes:
        image: The last ``get_image_features`` call (not one made inside ``get_video_features``).
        video: The last ``get_video_features`` call.
        vision_probe: Activated for the length of each image call (and video call, where the tower serves
            videos), when a stage reads vision attention.
    """

    image: ImageCall | None = None
    video: ImageCall | None = None
    vision_probe: VisionProbe | None = None
    _in_video: bool = False

    @property
    def in_video(self) -> bool:
        """A ``get_video_features`` call is running (its projector calls are the video's)."""
        return self._in_video

    def fed_videos(self, vlm: Any, forward_kwargs: Mapping[str, Any]) -> bool:
        """Whether the base model's forward (its bound ``forward_kwargs``) puts video features in its sequence.

        ``True`` where a ``get_video_features`` call was recorded (``generate`` pre-encodes the videos before the
        prefill), where the forward was given video inputs (an argument named for videos that is not ``None``:
        ``pixel_values_videos``, ``video_grid_thw``; or a mapping of pre-encoded outputs with a ``"video"``
        entry), or where the model has no ``get_video_features`` (the engine cannot tell). ``False`` means the
        model embeds its video placeholder ids as text in this forward: Video-LLaVA scatters video features only
        where it computed them, so a video token id with no video (a generated id fed back in a no-cache
        recompute of prompt and generated tokens) is an ordinary text token.
        """
        if self.video is not None or not callable(getattr(vlm, "get_video_features", None)):
            return True
        for name, value in forward_kwargs.items():
            if value is None:
                continue
            if "video" in name or (isinstance(value, Mapping) and value.get("video") is not None):
                return True
        return False

    def install(self, hooks: HookSet, vlm: Any) -> None:
        """Wrap ``vlm``'s feature methods (those it has)."""
        if hasattr(vlm, "get_image_features"):
            hooks.wrap_method(vlm, "get_image_features", self._after_image, before=self._before_image)
        if hasattr(vlm, "get_video_features"):
            hooks.wrap_method(vlm, "get_video_features", self._after_video, before=self._before_video)

    def clear(self) -> None:
        """Forget the recorded calls (they have been used, or the forward failed)."""
        self.image = self.video = None
        self._in_video = False

    def _before_image(self) -> None:
        if self.vision_probe is not None and not self._in_video:
            self.vision_probe.begin("image")

    def _after_image(self, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        if self._in_video:  # Qwen3-VL's get_video_features calls get_image_features
            return
        self.image = ImageCall(args, kwargs, output)
        if self.vision_probe is not None:
            self.vision_probe.active = False

    def _before_video(self) -> None:
        self._in_video = True
        if self.vision_probe is not None and self.vision_probe.tower.videos:
            self.vision_probe.begin("video")

    def _after_video(self, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        self._in_video = False
        self.video = ImageCall(args, kwargs, output)
        if self.vision_probe is not None:
            self.vision_probe.active = False
