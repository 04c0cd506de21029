"""The video invariants and ``tokens:`` tests of ``test_engine_invariants_video.py`` on the LLaVA video models.

LLaVA-NeXT-Video (pooled per-frame grids), LLaVA-OneVision (pooled per-frame grids and one newline
per video) and Video-LLaVA (per frame its [CLS] token, then its grid); a file of their own to keep each file short.
"""

from __future__ import annotations

import pytest
import tiny_models as tm
from test_engine_invariants_video import (  # noqa: F401  (the tests run here on this module's `tiny`)
    case,
    plugins,
    test_a_stage_reduces_the_tokens_it_names,
    test_a_video_stage_on_a_prompt_without_video_changes_nothing,
    test_check,
    test_downsample_plans_per_frame,
)

LLAVA = ["llava_next_video", "llava_onevision", "video_llava"]


@pytest.fixture(scope="module", params=LLAVA)
def tiny(request: pytest.FixtureRequest) -> tm.Tiny:
    return tm.BUILDERS[request.param]()


def test_every_video_model_is_tested():
    from engine_fixtures import VIDEO_SPECS
    from test_engine_invariants_video import QWEN

    assert sorted(QWEN + LLAVA) == sorted(VIDEO_SPECS)
