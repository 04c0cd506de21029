"""tokenprune: reduce the visual tokens of vision-language models, and compare the strategies fairly.

>>> import tokenprune as tp
>>> pipe = tp.load_pipeline("pipeline.yaml")      # doctest: +SKIP
>>> tp.list_reducers()                            # doctest: +SKIP
['random', ...]
"""

from tokenprune.budget import tokens_to_keep
from tokenprune.engine import PreparedPipeline, SoftKeep, SoftMaskReducer, SoftMaskRun, apply, prepare
from tokenprune.errors import (
    PipelineError,
    PluginError,
    PluginLoadWarning,
    ReducerInputError,
    ReducerOutputError,
    TokenpruneError,
    UnknownReducerError,
    UnsupportedModelError,
    UnsupportedTransformersError,
)
from tokenprune.hookspecs import hookimpl
from tokenprune.layout import TokenLayout
from tokenprune.pipeline import Pipeline, Stage, load_pipeline, pipeline_json_schema
from tokenprune.plugins import get_plugin_manager, list_adapters, list_reducers
from tokenprune.reducer import (
    Capabilities,
    InsertionPoint,
    Merge,
    ReduceContext,
    ReducerParams,
    Requirements,
    ScoringReducer,
    Selection,
    TokenReducer,
    VisionAttentionRequest,
)

__version__ = "0.1.0"

__all__ = [
    "Capabilities",
    "InsertionPoint",
    "Merge",
    "Pipeline",
    "PipelineError",
    "PluginError",
    "PluginLoadWarning",
    "PreparedPipeline",
    "ReduceContext",
    "ReducerInputError",
    "ReducerOutputError",
    "ReducerParams",
    "Requirements",
    "ScoringReducer",
    "Selection",
    "SoftKeep",
    "SoftMaskReducer",
    "SoftMaskRun",
    "Stage",
    "TokenLayout",
    "TokenReducer",
    "TokenpruneError",
    "UnknownReducerError",
    "UnsupportedModelError",
    "UnsupportedTransformersError",
    "VisionAttentionRequest",
    "__version__",
    "apply",
    "get_plugin_manager",
    "hookimpl",
    "list_adapters",
    "list_reducers",
    "load_pipeline",
    "pipeline_json_schema",
    "prepare",
    "tokens_to_keep",
]
