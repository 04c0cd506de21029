"""The comparison config: which model, tasks and pipelines ``tokenprune compare`` runs.

.. code-block:: yaml

    model: bundled                 # the shipped mini VLM; or a local path, or a hub id
    dtype: float32
    device: cpu
    batch_size: 16
    seed: 0
    output: runs/compare
    tasks:
      - {name: synthvqa, per_type: 50}
      - {name: jsonl, path: data/questions.jsonl}
    pipelines:
      - file: pipelines/fastv.yaml            # a pipeline file (its `name:` or the file stem names it)
      - name: tome-then-fastv                 # an inline pipeline
        stages:
          - {at: post_projector, reducer: tome, keep: 0.5}
          - {at: {layer: 2}, reducer: fastv, keep: 0.5}
      - sweep:                                # one pipeline per reducer and budget
          reducers: [gprune, l2norm, random]
          keep: [0.5, 0.25, 0.1]
          seeds: 3                            # runs of a stochastic reducer (random): random-50%, random-50%@seed1, ...
    baseline: gprune-50%           # also compare every pipeline with this one (paired), besides unpruned
    resamples: 2000                # bootstrap resamples of the intervals and paired tests (seeded by `seed`)
    bucket: true                   # batches of similar length (sorted by visual-token count)
    timing: {batches: 1, warmup: 1, repeats: 5, memory: true}

The unpruned model always runs first, as ``unpruned``: it is the reference of the fidelity metrics
and of the FLOPs reduction.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tokenprune.errors import PipelineError, TokenpruneError
from tokenprune.pipeline import Pipeline, Registries, load_pipeline
from tokenprune.plugins import PipelineRegistry, PluginManager, ReducerRegistry

OWN_DISTRIBUTION = "tokenprune"
"""Reducers registered by this distribution's plugins form the default sweep."""

DEFAULT_KEEP = (0.5, 0.25, 0.1)
REFERENCE = "unpruned"
Metric = Literal["accuracy", "vqa_score", "agreement", "kl"]


class Sweep(BaseModel):
    """One single-stage pipeline per reducer and budget.

    ``at: auto`` puts each reducer after the projector when it supports that, else at layer 2 (FastV's
    default); a decode-only reducer at ``decode: 2``; a reducer that also runs inside the vision encoder runs
    there too: before the projector (``<name>-pre-50%``) and before vision layer 1 (``<name>-vl1-50%``).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    reducers: list[str] | None = Field(
        default=None, description="Reducer names; default: every training-free reducer tokenprune itself ships."
    )
    keep: list[float | int] = Field(default_factory=lambda: list(DEFAULT_KEEP))
    at: Literal["auto", "post_projector"] | dict[str, int] = "auto"
    params: dict[str, dict[str, Any]] = Field(default_factory=dict, description="Params per reducer name.")
    seeds: int = Field(
        default=3,
        ge=1,
        description="Seeds per stochastic reducer (one with a `seed` param that `params` does not fix): "
        "`<name>-50%` runs its default seed, `<name>-50%@seed1` ... the next ones.",
    )


class TimingConfig(BaseModel):
    """The cost pass (:mod:`tokenprune.bench.timing`): latency and peak memory on a few fixed batches."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    batches: int = Field(default=1, ge=1, description="Timing batches per task, spread evenly over its batches.")
    warmup: int = Field(default=1, ge=0, description="Untimed rounds over every pipeline first.")
    repeats: int = Field(default=5, ge=1, description="Timed rounds over every pipeline (round-robin).")
    memory: bool = Field(default=True, description="Measure peak memory (one more forward per pipeline and batch).")


class PipelineEntry(BaseModel):
    """A pipeline file, a preset (a name or a pattern), an inline pipeline (``name`` + fields), or a sweep."""

    model_config = ConfigDict(extra="allow", frozen=True)
    name: str | None = None
    file: Path | None = None
    preset: str | None = None
    sweep: Sweep | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> PipelineEntry:
        inline = bool(self.model_extra)
        kinds = sum([self.file is not None, self.preset is not None, self.sweep is not None, inline])
        if kinds != 1:
            raise ValueError(
                "a pipelines entry is either `file: PATH`, `preset: NAME`, `sweep: {...}`, or an inline pipeline "
                "with `stages:`"
            )
        return self


class CompareConfig(BaseModel):
    """Everything a comparison run depends on (see the module docstring)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    model: str = Field(default="bundled", description="'bundled', a local path, or a hub id.")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = "cpu"
    batch_size: int = Field(default=16, ge=1)
    seed: int = 0
    output: Path = Path("runs/compare")
    tasks: list[dict[str, Any]] = Field(default_factory=lambda: [{"name": "synthvqa"}])
    pipelines: list[PipelineEntry] = Field(default_factory=lambda: [PipelineEntry(sweep=Sweep())])
    metrics: list[Metric] = Field(
        default_factory=lambda: ["accuracy", "vqa_score", "agreement", "kl"],
        description="The metrics reported (columns of summary.csv, summary.json and report.md), in any order; "
        "every result still stores all four, so changing the list recomputes nothing.",
    )
    prompt: str | None = Field(
        default=None,
        description="Prompt template with {image} (the placeholders) and {question}; default: the task's prompt.",
    )
    max_new_tokens: int | None = Field(default=None, ge=1, description="Override the tasks' answer length.")
    heatmaps: int = Field(default=3, ge=0, description="Kept-token heatmaps drawn per pipeline (first examples).")
    bucket: bool = Field(
        default=True, description="Batch examples sorted by visual-token count (then prompt length): less padding."
    )
    timing: TimingConfig = Field(default_factory=TimingConfig)
    baseline: str | None = Field(
        default=None, description="A pipeline every other one is also compared with (paired), besides `unpruned`."
    )
    resamples: int = Field(default=2000, ge=100, description="Bootstrap resamples of the intervals and paired tests.")

    @field_validator("metrics")
    @classmethod
    def _ranked_by_one(cls, metrics: list[str]) -> list[str]:
        repeated = sorted({m for m in metrics if metrics.count(m) > 1})
        if repeated:
            raise ValueError(f"metrics: {', '.join(repeated)} listed twice; list each metric once")
        if not {"accuracy", "agreement"} & set(metrics):
            raise ValueError(
                f"metrics: {metrics} has neither `accuracy` nor `agreement`, which rank the pipelines; "
                "add one of them (for example `metrics: [accuracy, kl]`)"
            )
        return metrics

    def digest(self) -> str:
        """A short hash of the whole config (recorded with every result)."""
        return _digest(self.model_dump(mode="json"))


def load_config(source: str | Path | dict[str, Any] | None) -> CompareConfig:
    """Read a comparison config from a YAML file, a mapping, or None (the offline default).

    Raises:
        TokenpruneError: naming the file and every invalid field.
    """
    if source is None:
        return CompareConfig()
    label = "<mapping>"
    base = Path.cwd()
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"comparison config {str(path)!r} does not exist")
        label, base = str(path), path.parent
        try:
            source = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise TokenpruneError(f"{label}: YAML error: {exc}") from None
    if not isinstance(source, dict):
        raise TokenpruneError(f"{label}: a comparison config must be a mapping")
    try:
        config = CompareConfig.model_validate(source)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise TokenpruneError(f"{label}: invalid comparison config: {problems}") from None
    # Pipeline files are relative to the config's folder.
    entries = [
        e.model_copy(update={"file": (base / e.file) if e.file and not e.file.is_absolute() else e.file})
        for e in config.pipelines
    ]
    return config.model_copy(update={"pipelines": entries})


def resolve_pipelines(
    config: CompareConfig, registry: PluginManager | ReducerRegistry, presets: PipelineRegistry | None = None
) -> list[tuple[str, Pipeline]]:
    """The named pipelines to run, the unpruned reference first; every one validated.

    Args:
        config: The comparison config.
        registry: The plugin manager whose reducers validate and whose presets ``preset:`` entries name
            (or only the reducers, with ``presets``).
        presets: With a reducer registry: the pipeline presets (default: a fresh plugin manager's).

    Raises:
        PipelineError: an invalid pipeline (named), or two pipelines with the same name.
    """
    plugins = registry if isinstance(registry, PluginManager) else Registries(registry, presets)
    out: list[tuple[str, Pipeline]] = [(REFERENCE, Pipeline(name=REFERENCE))]
    for entry in config.pipelines:
        if entry.sweep is not None:
            out += _sweep(entry.sweep, plugins)
        elif entry.preset is not None:
            out += _presets(entry, plugins)
        elif entry.file is not None:
            pipe = load_pipeline(entry.file, plugins=plugins)
            out.append((entry.name or pipe.name or entry.file.stem, pipe))
        else:
            body = dict(entry.model_extra or {})
            try:
                pipe = load_pipeline({"name": entry.name, **body}, plugins=plugins)
            except PipelineError as exc:
                raise PipelineError(f"pipeline {entry.name!r}: {exc}", exc.problems) from None
            out.append((entry.name or _auto_name(pipe), pipe))
    names = [n for n, _ in out]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise PipelineError(f"pipeline names must be unique; repeated: {', '.join(duplicates)}")
    if config.baseline is not None and config.baseline not in names:
        raise PipelineError(
            f"baseline: {config.baseline!r} is not one of the comparison's pipelines ({', '.join(names)}); "
            "name one of them"
        )
    return out


def pipeline_key(name: str, pipeline: Pipeline, config: CompareConfig, task: dict[str, Any]) -> str:
    """What a result depends on: model, dtype, device, seed, prompt, task and the pipeline itself.

    Results carry this key; a rerun reuses a result only if its key matches, so changing a
    pipeline's definition recomputes it while the other pipelines' results are kept.
    """
    return _digest(
        {
            "pipeline": name,
            "definition": pipeline.model_dump(mode="json"),
            "model": config.model,
            "dtype": config.dtype,
            "device": config.device,
            "seed": config.seed,
            "prompt": config.prompt,
            "max_new_tokens": config.max_new_tokens,
            "task": task,
        }
    )


def default_sweep_reducers(registry: ReducerRegistry) -> list[str]:
    """The reducers of the default sweep: the training-free ones that tokenprune's own plugins register.

    Read from the registry, so a disabled plugin (``TOKENPRUNE_DISABLE_PLUGINS``) drops out and a new
    built-in joins without an edit here; third-party reducers join a comparison by name. Trainable
    reducers (ATP) are left out: they need weights; so are video-only ones (DyCoke), which keep every image
    token, reducers whose default params read further fixed vision-tower layers (HiPrune's object layer 9, a
    paper model's, deeper than the bundled model's tower; add them by name with their params), and a name two
    plugins register (a collision: ``tokenprune plugins`` marks it).
    """
    usable = [name for name in registry if len(registry.claims(name)) == 1]  # a collision is listed, not run
    return [
        name
        for name in usable
        if (origin := registry.origin(name)) is not None
        and origin.distribution == OWN_DISTRIBUTION
        and not registry.get(name).capabilities.trainable
        and "image" in registry.get(name).capabilities.media
        and registry.get(name).capabilities.insertion_points != {"decode"}
        and not _reads_fixed_tower_layers(registry.get(name))
    ]


def _reads_fixed_tower_layers(reducer: type[Any]) -> bool:
    """Whether a reducer's default params ask the vision probe for further fixed tower layers (``also_at``)."""
    request = reducer.requirements(reducer.Params()).vision_attention
    return request is not None and bool(request.also_at)


def _sweep(sweep: Sweep, plugins: PluginManager | Registries) -> list[tuple[str, Pipeline]]:
    registry, out = plugins.reducers, []
    names = default_sweep_reducers(registry) if sweep.reducers is None else sweep.reducers
    for name in names:
        if name not in registry:
            raise PipelineError(f"sweep: {registry.unknown_message(name)}")
        for at, tag in _sweep_points(sweep, registry.get(name).capabilities.insertion_points):
            for keep in sweep.keep:
                base = f"{name}{tag}-{round(keep * 100)}%" if isinstance(keep, float) else f"{name}{tag}-{keep}tok"
                for label, params in _seeded(base, name, sweep, registry):
                    stage = {"at": at, "reducer": name, "keep": keep, "params": params}
                    try:
                        out.append((label, load_pipeline({"name": label, "stages": [stage]}, plugins=plugins)))
                    except PipelineError as exc:
                        raise PipelineError(f"sweep pipeline {label!r}: {exc}", exc.problems) from None
    return out


def _sweep_points(sweep: Sweep, points: frozenset[str]) -> list[tuple[Any, str]]:
    """Where a sweep runs a reducer, with each point's label tag: ``at: auto`` puts it after the projector (else at
    layer 2, a decode-only one at ``decode: 2``), and also inside the vision encoder where it runs there: before
    the projector (``-pre``) and before vision layer 1 (``-vl1``)."""
    if sweep.at != "auto":
        return [(sweep.at, "")]
    at: Any = "post_projector" if "post_projector" in points else {"layer": 2}
    out: list[tuple[Any, str]] = [({"decode": 2} if points == {"decode"} else at, "")]
    if "pre_projector" in points:
        out.append(("pre_projector", "-pre"))
    if "vision_layer" in points:
        out.append(({"vision_layer": 1}, "-vl1"))
    return out


def _seeded(label: str, reducer: str, sweep: Sweep, registry: ReducerRegistry) -> list[tuple[str, dict[str, Any]]]:
    """``(name, params)`` per seed: ``sweep.seeds`` of them for a reducer with a ``seed`` param left free, else one.

    The first keeps the plain name and the reducer's default seed (so its results are those of a
    one-seed run); the k-th is ``<label>@seed<k>`` with the default seed plus ``k``.
    """
    params = sweep.params.get(reducer, {})
    field = registry.get(reducer).Params.model_fields.get("seed")
    if field is None or "seed" in params or sweep.seeds == 1:
        return [(label, params)]
    first = field.default if isinstance(field.default, int) else 0
    return [(label, params)] + [(f"{label}@seed{k}", {**params, "seed": first + k}) for k in range(1, sweep.seeds)]


def _presets(entry: PipelineEntry, plugins: PluginManager | Registries) -> list[tuple[str, Pipeline]]:
    """The presets a ``preset:`` entry names (a name, or a pattern such as ``sparsevlm-*``), validated."""
    presets = plugins.pipelines
    if presets is None:
        from tokenprune.plugins import get_plugin_manager

        presets = get_plugin_manager().pipelines
    names = presets.matching(str(entry.preset))
    if entry.name is not None and len(names) > 1:
        raise PipelineError(f"preset {entry.preset!r} matches {len(names)} presets; `name:` needs exactly one")
    out = []
    for name in names:
        try:
            pipe = load_pipeline({"preset": name}, plugins=Registries(plugins.reducers, presets))
        except PipelineError as exc:
            raise PipelineError(f"preset {name!r}: {exc}", exc.problems) from None
        out.append((entry.name or name, pipe))
    return out


def _auto_name(pipe: Pipeline) -> str:
    return "+".join(f"{s.reducer}-{s.keep}" for s in pipe.stages) or "empty"


def stable_digest(data: Any) -> str:
    """A short hash of JSON-able ``data`` (keys sorted)."""
    return _digest(data)


def _digest(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]
