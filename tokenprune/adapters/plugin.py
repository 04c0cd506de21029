"""Registers tokenprune's built-in adapters (entry point ``adapters`` of the ``tokenprune`` group)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import tokenprune
from tokenprune.adapters.crop_towers import AyaVisionAdapter, Cohere2VisionAdapter
from tokenprune.adapters.gemma3 import Gemma3Adapter
from tokenprune.adapters.gemma4 import Gemma4Adapter
from tokenprune.adapters.generic_packed import Ernie45VLAdapter, Glm4vAdapter, Qwen35Adapter
from tokenprune.adapters.idefics3 import Idefics3Adapter
from tokenprune.adapters.internvl import InternVLAdapter
from tokenprune.adapters.lfm2_vl import Lfm2VlAdapter, Lfm3VlAdapter
from tokenprune.adapters.llama4 import Llama4Adapter
from tokenprune.adapters.llava import LlavaAdapter
from tokenprune.adapters.llava_next import LlavaNextAdapter
from tokenprune.adapters.llava_next_video import LlavaNextVideoAdapter
from tokenprune.adapters.llava_onevision import LlavaOnevisionAdapter
from tokenprune.adapters.minicpmv import MiniCPMVAdapter
from tokenprune.adapters.molmo2 import Molmo2Adapter
from tokenprune.adapters.omni_thinkers import Qwen3OmniThinkerAdapter, Qwen25OmniThinkerAdapter
from tokenprune.adapters.paddleocr_vl import PaddleOCRVLAdapter
from tokenprune.adapters.paligemma import PaliGemmaAdapter
from tokenprune.adapters.qwen2_vl import Qwen2VLAdapter
from tokenprune.adapters.qwen3_vl import Qwen3VLAdapter
from tokenprune.adapters.video_llava import VideoLlavaAdapter

if TYPE_CHECKING:
    from tokenprune.plugins import AdapterRegistry

BUILTIN_ADAPTERS = (
    LlavaNextAdapter,
    LlavaAdapter,
    LlavaOnevisionAdapter,
    Qwen2VLAdapter,
    Qwen3VLAdapter,
    InternVLAdapter,
    LlavaNextVideoAdapter,
    Idefics3Adapter,
    PaliGemmaAdapter,
    Gemma3Adapter,
    VideoLlavaAdapter,
    Llama4Adapter,
    Qwen35Adapter,
    Glm4vAdapter,
    Ernie45VLAdapter,
    PaddleOCRVLAdapter,
    Qwen25OmniThinkerAdapter,
    Qwen3OmniThinkerAdapter,
    AyaVisionAdapter,
    Cohere2VisionAdapter,
    Lfm2VlAdapter,
    Lfm3VlAdapter,
    Gemma4Adapter,
    MiniCPMVAdapter,
    Molmo2Adapter,
)


@tokenprune.hookimpl
def tokenprune_register_adapters(registry: AdapterRegistry) -> None:
    for adapter in BUILTIN_ADAPTERS:
        registry.add(adapter)
