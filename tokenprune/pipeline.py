"""Pipelines: an ordered list of reduction stages, loaded from YAML and validated before a model runs.

.. code-block:: yaml

    name: tome-then-fastv
    positions: original          # or: compact
    stages:
      - at: post_projector
        reducer: tome
        keep: 0.5                # a fraction of the visual tokens present at this point
      - at: {layer: 2}           # between decoder layers 1 and 2
        reducer: fastv
        keep: 64                 # or an absolute count
        params: {source: last}

:func:`load_pipeline` checks the structure (pydantic) and then every stage against the installed
reducers: the name, its ``params``, and whether it runs at that insertion point. Each problem is
reported with the stage (index and reducer), the field and, for YAML, the line.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator

from tokenprune.errors import PipelineError
from tokenprune.reducer import (
    InsertionPoint,
    ReducerParams,
    Requirements,
    TokenReducer,
    class_requirements,
    legacy_overrides,
)

if TYPE_CHECKING:
    from tokenprune.plugins import PipelineRegistry, PluginManager, ReducerRegistry

PositionPolicy = Literal["original", "compact"]

_AT_HELP = (
    "'post_projector', {layer: k} with k >= 1 (the stage runs between decoder layers k-1 and k), {decode: k} "
    "(at every decoding step, on the cached visual tokens, for layers k onwards), 'pre_projector' (on the "
    "vision tower's features of each image or crop, before the projector), or {vision_layer: k} (between "
    "vision-tower layers k-1 and k)"
)
_KEEP_HELP = "a fraction in (0, 1] such as 0.25 (1.0 keeps all), or a token count >= 1 such as 64"


class LayerAt(BaseModel):
    """Between decoder layers ``layer - 1`` and ``layer``."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    layer: int = Field(ge=1, description="Decoder layer whose input is reduced (k >= 1).")


class VisionLayerAt(BaseModel):
    """Between vision-tower layers ``vision_layer - 1`` and ``vision_layer``."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    vision_layer: int = Field(ge=1, description="Vision-tower layer whose input is reduced (k >= 1).")


class DecodeAt(BaseModel):
    """At every decoding step, between decoder layers ``decode - 1`` and ``decode``, over the KV cache."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    decode: int = Field(ge=1, description="First decoder layer whose attention reads only the kept cached tokens.")


class Stage(BaseModel):
    """One reduction step."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    at: Literal["pre_projector", "post_projector"] | LayerAt | DecodeAt | VisionLayerAt = Field(
        description=f"Insertion point: {_AT_HELP}."
    )
    reducer: str = Field(description="Registry name of the reducer (see `tokenprune plugins`).")
    keep: float | int = Field(description=f"Tokens kept: {_KEEP_HELP}.")
    params: dict[str, Any] = Field(default_factory=dict, description="The reducer's parameters.")
    tokens: Literal["all", "image", "video"] = Field(
        default="all",
        description=(
            "Which visual tokens the stage reduces: 'all' (image and video tokens together, the default), "
            "'image' or 'video' (the others are kept, like text)."
        ),
    )

    @field_validator("at", mode="before")
    @classmethod
    def _parse_at(cls, value: Any) -> Any:
        if isinstance(value, InsertionPoint):
            return value.kind if value.kind in ("pre_projector", "post_projector") else {value.kind: value.layer}
        if value in ("pre_projector", "post_projector") or isinstance(value, (LayerAt, DecodeAt, VisionLayerAt)):
            return value
        if isinstance(value, Mapping) and len(value) == 1 and set(value) <= {"layer", "decode", "vision_layer"}:
            ((name, k),) = value.items()
            if isinstance(k, int) and not isinstance(k, bool) and k >= 1:
                return value
            raise ValueError(f"{name} must be an integer >= 1, got {k!r}; `at` is {_AT_HELP}")
        raise ValueError(f"`at` is {_AT_HELP}; got {value!r}")

    @field_validator("keep", mode="before")
    @classmethod
    def _parse_keep(cls, value: Any) -> Any:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"keep is {_KEEP_HELP}; got {value!r}")
        if isinstance(value, float) and not (0.0 < value <= 1.0 and math.isfinite(value)):
            raise ValueError(f"keep {value} is a fraction and must lie in (0, 1]; for a token count write an integer")
        if isinstance(value, int) and value < 1:
            raise ValueError(f"keep {value} is a token count and must be >= 1")
        return value

    @property
    def point(self) -> InsertionPoint:
        """The stage's :class:`~tokenprune.reducer.InsertionPoint`."""
        if isinstance(self.at, LayerAt):
            return InsertionPoint("layer", self.at.layer)
        if isinstance(self.at, DecodeAt):
            return InsertionPoint("decode", self.at.decode)
        if isinstance(self.at, VisionLayerAt):
            return InsertionPoint("vision_layer", self.at.vision_layer)
        return InsertionPoint(self.at)


class Pipeline(BaseModel):
    """An ordered list of stages plus pipeline-wide options. An empty pipeline is a valid no-op."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str | None = Field(default=None, description="A label for reports.")
    positions: PositionPolicy = Field(
        default="original",
        description=(
            "Position ids of kept tokens: 'original' keeps each token's position from the unpruned "
            "sequence (as G-Prune's and FastV's code do); 'compact' renumbers the shortened sequence."
        ),
    )
    protect_newlines: bool = Field(
        default=True,
        description="Always keep row-end newline tokens (LLaVA-NeXT's image_newline), as G-Prune's code does.",
    )
    stages: list[Stage] = Field(default_factory=list, description="Applied in order.")

    def check(self, registry: ReducerRegistry) -> Pipeline:
        """Validate every stage against the installed reducers; returns ``self``.

        Raises:
            PipelineError: listing every problem (unknown reducer with the closest name, invalid
                params, an insertion point the reducer does not support, stages out of order).
        """
        problems = _check_against(self, registry, lines={})
        if problems:
            raise PipelineError(_format(problems, "pipeline"), problems)
        return self

    def build_reducers(self, registry: ReducerRegistry) -> list[TokenReducer]:
        """One reducer instance per stage, with validated params."""
        return [registry.get(stage.reducer)(stage.params) for stage in self.check(registry).stages]


@dataclass(frozen=True)
class Problem:
    """One defect of a pipeline document."""

    field: str
    message: str
    stage: int | None = None
    reducer: str | None = None
    line: int | None = None

    def __str__(self) -> str:
        where = []
        if self.stage is not None:
            where.append(f"stage {self.stage}" + (f" (reducer {self.reducer!r})" if self.reducer else ""))
        if self.line is not None:
            where.append(f"line {self.line}")
        prefix = ", ".join(where)
        return f"{prefix}: {self.field}: {self.message}" if prefix else f"{self.field}: {self.message}"


@dataclass(frozen=True)
class Registries:
    """What a pipeline document is resolved against: the reducers and the presets.

    A :class:`~tokenprune.plugins.PluginManager` has both as attributes, and is what callers pass
    to :func:`load_pipeline`; this pair is for a caller that holds the two registries apart.
    """

    reducers: ReducerRegistry
    pipelines: PipelineRegistry | None = None  # None: a fresh plugin manager's, when a document names a preset


def load_pipeline(
    source: str | os.PathLike[str] | Mapping[str, Any] | Pipeline,
    *,
    plugins: PluginManager | Registries | None = None,
    check: bool = True,
    registry: ReducerRegistry | None = None,
    presets: PipelineRegistry | None = None,
) -> Pipeline:
    """Load and validate a pipeline.

    A document ``{preset: NAME}`` (optionally with ``name:``) stands for the pipeline a plugin
    registered as that preset (``tokenprune plugins`` lists them).

    Args:
        source: A path to a YAML file, a YAML string, a mapping, or a :class:`Pipeline`.
        plugins: The plugin manager whose reducers the stages are validated against and whose presets
            ``preset:`` names (default: a fresh :func:`~tokenprune.plugins.get_plugin_manager`).
        check: Validate the stages against the reducers (False checks the structure only).
        registry: Deprecated, pass ``plugins=``: the reducers to validate against.
        presets: Deprecated, pass ``plugins=``: the presets ``preset:`` names.

    Raises:
        PipelineError: with every problem found, each naming its stage, field and YAML line.
        FileNotFoundError: ``source`` names a YAML file that does not exist.
        TypeError: ``plugins=`` given together with ``registry=`` or ``presets=``.
    """
    if registry is not None or presets is not None:
        if plugins is not None:
            raise TypeError("load_pipeline takes plugins= or the deprecated registry=/presets=, not both")
        warnings.warn(
            "load_pipeline(registry=..., presets=...) is deprecated; pass plugins=<PluginManager> so that the "
            "reducers and the presets come from the same manager",
            DeprecationWarning,
            stacklevel=2,
        )
    elif plugins is not None:
        registry, presets = plugins.reducers, plugins.pipelines
    return _load(source, registry, presets, check)


def _load(source: Any, registry: ReducerRegistry | None, presets: PipelineRegistry | None, check: bool) -> Pipeline:
    label, data, lines = _read(source)
    if isinstance(data, Pipeline):
        pipeline = data
    else:
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise PipelineError(
                f"{label}: a pipeline must be a mapping with a `stages:` list, got a {_yaml_kind(data)}; "
                "e.g.\nstages:\n  - {at: post_projector, reducer: random, keep: 0.5}",
                [Problem("<document>", f"expected a mapping, got a {_yaml_kind(data)}", line=1)],
            )
        if "preset" in data:
            data, lines = _expand_preset(data, label, presets), {}
        try:
            pipeline = Pipeline.model_validate(dict(data))
        except ValidationError as exc:
            problems = [_problem_from_error(err, data, lines) for err in exc.errors()]
            if check:  # every problem in one run: the reducers' checks on what can be checked
                problems += _check_stages(
                    _salvaged_stages(data), registry if registry is not None else _installed_reducers(), lines
                )
                problems.sort(key=lambda p: (p.stage is not None, p.stage or 0, p.line or 0))
            raise PipelineError(_format(problems, label), problems) from None
    if check:
        problems = _check_against(pipeline, registry if registry is not None else _installed_reducers(), lines)
        if problems:
            raise PipelineError(_format(problems, label), problems)
    return pipeline


def _expand_preset(data: Mapping[str, Any], label: str, presets: PipelineRegistry | None) -> dict[str, Any]:
    """The definition of the preset ``data["preset"]``, named ``data.get("name")`` or after the preset."""
    extra = sorted(set(data) - {"preset", "name"})
    if extra:
        raise PipelineError(
            f"{label}: a preset document holds only `preset:` and optionally `name:`, not {', '.join(extra)}; "
            "to change a preset, copy its stages (`tokenprune plugins --json` shows them) into a pipeline file",
            [Problem(key, "not allowed beside `preset:`") for key in extra],
        )
    if not isinstance(data["preset"], str):
        raise PipelineError(f"{label}: `preset:` must be a preset name, got {data['preset']!r}")
    if presets is None:
        from tokenprune.plugins import get_plugin_manager

        presets = get_plugin_manager().pipelines
    preset = presets.get(data["preset"])
    return {**preset.definition, "name": data.get("name", preset.name)}


def _installed_reducers() -> ReducerRegistry:
    from tokenprune.plugins import get_plugin_manager

    return get_plugin_manager().reducers


def pipeline_json_schema(registry: ReducerRegistry | None = None) -> dict[str, Any]:
    """The JSON schema of pipeline documents.

    With a registry, each stage is a choice between the installed reducers, and ``params`` carries
    that reducer's own schema (so editors can complete and check them).
    """
    if registry is None or len(registry) == 0:
        schema = Pipeline.model_json_schema()
    else:
        variants = []
        for name in registry:
            cls = registry.get(name)
            variants.append(
                create_model(
                    f"Stage_{name}",
                    __base__=Stage,
                    __doc__=(cls.__doc__ or f"A {name} stage.").strip().splitlines()[0],
                    reducer=(Literal[name], Field(description=f"The {name!r} reducer.")),  # type: ignore[valid-type]
                    params=(cls.Params, Field(default_factory=cls.Params, description=f"Parameters of {name!r}.")),
                )
            )
        stage_union: Any = variants[0]
        for v in variants[1:]:
            stage_union = stage_union | v
        typed = create_model(
            "Pipeline",
            __base__=Pipeline,
            __doc__=Pipeline.__doc__,
            stages=(list[stage_union], Field(default_factory=list, description="Applied in order.")),
        )
        schema = typed.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "tokenprune pipeline"
    return schema


# --- machinery -------------------------------------------------------------------------------------


def _read(source: Any) -> tuple[str, Any, dict[tuple[Any, ...], int]]:
    if isinstance(source, Pipeline):
        return "<pipeline>", source, {}
    if isinstance(source, Mapping):
        return "<mapping>", source, {}
    if isinstance(source, os.PathLike) or (
        isinstance(source, str)
        and "\n" not in source
        and (source.endswith((".yaml", ".yml")) or os.path.isfile(source))
    ):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"pipeline file {str(path)!r} does not exist")
        return str(path), *_parse_yaml(path.read_text(encoding="utf-8"), str(path))
    if isinstance(source, str):
        return "<yaml string>", *_parse_yaml(source, "<yaml string>")
    raise TypeError(f"load_pipeline takes a path, a YAML string, a mapping or a Pipeline, not {type(source).__name__}")


def _parse_yaml(text: str, label: str) -> tuple[Any, dict[tuple[Any, ...], int]]:
    try:
        data = yaml.safe_load(text)
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "unknown position"
        what = " ".join(str(p) for p in (exc.context, exc.problem) if p)
        raise PipelineError(
            f"{label}: YAML syntax error at {where}: {what}",
            [Problem("<yaml>", what, line=mark.line + 1 if mark else None)],
        ) from None
    except yaml.YAMLError as exc:
        raise PipelineError(f"{label}: YAML error: {exc}", [Problem("<yaml>", str(exc))]) from None
    lines: dict[tuple[Any, ...], int] = {}
    if node is not None:
        _record_lines(node, (), lines)
    return data, lines


def _record_lines(node: yaml.Node, path: tuple[Any, ...], lines: dict[tuple[Any, ...], int]) -> None:
    lines[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            child = (*path, key.value)
            _record_lines(value, child, lines)
            lines[child] = key.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for i, value in enumerate(node.value):
            _record_lines(value, (*path, i), lines)


def _line_for(path: tuple[Any, ...], lines: dict[tuple[Any, ...], int]) -> int | None:
    for end in range(len(path), -1, -1):
        if path[:end] in lines:
            return lines[path[:end]]
    return None


def _problem_from_error(err: Any, data: Mapping[str, Any], lines: dict[tuple[Any, ...], int]) -> Problem:
    loc = tuple(err["loc"])
    # Drop pydantic's union-branch tags such as 'literal['post_projector']' / 'LayerAt' / 'float'.
    clean = tuple(p for p in loc if isinstance(p, int) or not _is_branch_tag(p))
    message = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        message = f"unknown field; allowed here: {_allowed_fields(clean)}"
    if "input" in err and err["type"] not in ("extra_forbidden", "missing", "value_error"):
        message += f" (got {err['input']!r})"
    stage = reducer = None
    field = ".".join(str(p) for p in clean) or "<document>"
    if len(clean) >= 2 and clean[0] == "stages" and isinstance(clean[1], int):
        stage = clean[1]
        stages = data.get("stages")
        if isinstance(stages, list) and stage < len(stages) and isinstance(stages[stage], Mapping):
            name = stages[stage].get("reducer")
            reducer = name if isinstance(name, str) else None
        field = ".".join(str(p) for p in clean[2:]) or "<stage>"
    return Problem(field, message, stage, reducer, _line_for(clean, lines))


def _is_branch_tag(part: Any) -> bool:
    return isinstance(part, str) and (part.startswith(("literal[", "function-")) or part in {"LayerAt", "float", "int"})


def _allowed_fields(loc: tuple[Any, ...]) -> str:
    model: type[BaseModel] = Pipeline
    if len(loc) >= 3 and loc[0] == "stages":
        model = LayerAt if len(loc) >= 4 and loc[2] == "at" else Stage
    return ", ".join(model.model_fields)


def _check_against(pipeline: Pipeline, registry: ReducerRegistry, lines: dict[tuple[Any, ...], int]) -> list[Problem]:
    return _check_stages(list(enumerate(pipeline.stages)), registry, lines)


def _salvaged_stages(data: Mapping[str, Any]) -> list[tuple[int, Stage]]:
    """The stages of a structurally invalid document that can still be checked against the reducers.

    A stage whose ``keep`` or ``params`` is malformed (already reported) is checked with a neutral
    stand-in for that field, and unknown fields are left out, so its other problems (an unknown
    reducer or parameter, an unsupported or misordered insertion point) are reported in the same run.
    A stage whose ``at`` or ``reducer`` is malformed cannot be checked further.
    """
    stages = data.get("stages")
    if not isinstance(stages, list):
        return []
    out = []
    for i, raw in enumerate(stages):
        if not isinstance(raw, Mapping):
            continue
        known = {k: v for k, v in raw.items() if k in Stage.model_fields}
        for stand_in in ({}, {"keep": 1.0}, {"keep": 1.0, "params": {}}):
            try:
                out.append((i, Stage.model_validate({**known, **stand_in})))
                break
            except ValidationError:
                continue
    return out


def _check_stages(
    indexed: list[tuple[int, Stage]], registry: ReducerRegistry, lines: dict[tuple[Any, ...], int]
) -> list[Problem]:
    problems: list[Problem] = []
    previous: InsertionPoint | None = None
    decode_seen = False
    for i, stage in indexed:
        here = ("stages", i)

        def add(
            field: str, message: str, path: tuple[Any, ...], stage_index: int = i, name: str = stage.reducer
        ) -> None:
            problems.append(Problem(field, message, stage_index, name, _line_for(path, lines)))

        point = stage.point
        if point.kind == "decode":
            if decode_seen:
                add("at", "a pipeline has at most one decode stage; merge the two into one reducer", (*here, "at"))
            decode_seen = True
        if previous is not None and point.order < previous.order:
            add(
                "at",
                f"stages must be ordered by insertion point (vision layers, pre_projector, then post_projector, "
                f"then layers in increasing order, then the decode stage), but {point} comes after {previous}",
                (*here, "at"),
            )
        previous = point if previous is None or point.order > previous.order else previous
        if stage.reducer not in registry:
            add("reducer", registry.unknown_message(stage.reducer), (*here, "reducer"))
            continue
        cls = registry.get(stage.reducer)
        point_supported = point.kind in cls.capabilities.insertion_points
        if not point_supported:
            supported = ", ".join(sorted(cls.capabilities.insertion_points))
            add(
                "at",
                f"{stage.reducer!r} does not run at {point}; it supports: {supported}",
                (*here, "at"),
            )
        try:
            params = cls.Params.model_validate(stage.params)
        except ValidationError as exc:
            for loc, message in _params_problems(cls, stage.reducer, exc):
                add("params." + ".".join(str(p) for p in loc), message, (*here, "params", *loc))
            continue
        if point_supported:
            for field, message in _needs_problems(cls, stage, params):
                add(field, message, (*here, field))
    return problems


def _params_problems(cls: type[TokenReducer], name: str, exc: ValidationError) -> list[tuple[tuple[Any, ...], str]]:
    """``(location, message)`` for each error of a stage's ``params``, an unknown one listing the known."""
    out = []
    for err in exc.errors():
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            allowed = ", ".join(cls.Params.model_fields) or "none"
            message = f"unknown parameter of {name!r}; its parameters are: {allowed}"
        elif "input" in err and err["type"] != "missing":
            message += f" (got {err['input']!r})"
        out.append((tuple(err["loc"]), message))
    return out


def _needs_problems(cls: type[TokenReducer], stage: Stage, params: ReducerParams) -> list[tuple[str, str]]:
    """``(field, message)`` for what a stage's reducer reads that its insertion point cannot serve."""
    needs, kind = stage_requirements(cls, params), stage.point.kind
    if kind == "decode":
        return [("at", message) for message in _decode_problems(cls, needs)]
    if kind in ("vision_layer", "pre_projector"):
        return _pre_projector_problems(stage, needs)
    if needs.attention and kind == "post_projector":
        return [
            (
                "at",
                f"{stage.reducer!r} reads attention scores ({', '.join(sorted(needs.attention))}), which exist only "
                "inside the LLM; put it at {layer: k}",
            )
        ]
    return []


def _pre_projector_problems(stage: Stage, needs: Requirements) -> list[tuple[str, str]]:
    """What a ``pre_projector`` stage cannot serve, as ``(field, message)``: only the tower's features and its
    attention exist there, and only image features go through it."""
    problems = []
    unserved = sorted(needs.attention | needs.own_attention) + sorted(needs.signals) + (["text"] if needs.text else [])
    if unserved:
        problems.append(
            (
                "at",
                f"before the projector only the vision tower's features and attention exist; {stage.reducer!r} reads "
                f"{unserved}: put it at post_projector or {{layer: k}}",
            )
        )
    if stage.point.kind == "vision_layer" and needs.vision_attention is not None:
        problems.append(("at", f"{stage.reducer!r} reads vision attention, which a vision_layer stage is not served"))
    if stage.tokens == "video":
        problems.append(
            ("tokens", f"a {stage.point.kind} stage reduces image features only; `tokens: video` needs post_projector")
        )
    return problems


def _decode_problems(cls: type[TokenReducer], needs: Requirements) -> list[str]:
    """What a ``decode`` stage cannot serve: only the last query row's attention and the cached keys exist there."""
    problems = []
    caps = cls.capabilities
    unserved = sorted(needs.attention - {"last"}) + sorted(needs.own_attention)
    if unserved:
        problems.append(f"at a decode stage only the `last` attention exists; {cls.name!r} reads {unserved}")
    vision = sorted(caps.vision_attention) if needs.vision_attention is not None else []
    extra = sorted(needs.signals) + (["text"] if needs.text else []) + vision
    if extra or caps.merges:
        what = ", ".join(extra + (["merges"] if caps.merges else []))
        problems.append(f"a decode stage serves only attention and the cached keys; {cls.name!r} needs {what}")
    return problems


def stage_requirements(cls: type[TokenReducer], params: ReducerParams) -> Requirements:
    """What a stage of ``cls`` with ``params`` reads (:meth:`TokenReducer.requirements`), without building it;
    a reducer that still overrides a deprecated per-need instance method (``attention_sources``, ...) is
    built to ask."""
    if any(name in _INSTANCE_NEEDS for name in legacy_overrides(cls)):
        return cls(params).needs()
    return class_requirements(cls, params)


_INSTANCE_NEEDS = ("attention_sources", "own_attention_sources", "vision_attention_request")


def _format(problems: list[Problem], label: str) -> str:
    head = f"{label}: invalid pipeline ({len(problems)} problem{'s' if len(problems) != 1 else ''}):"
    return "\n".join([head, *(f"- {p}" for p in problems)])


def _yaml_kind(data: Any) -> str:
    return {list: "list", str: "string", int: "number", float: "number", bool: "boolean"}.get(
        type(data), type(data).__name__
    )
