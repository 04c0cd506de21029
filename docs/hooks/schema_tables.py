"""mkdocs hook: render the pipeline YAML reference from the pydantic models, so it is never written twice.

A page containing ``<!-- pipeline-reference -->`` gets one table per model (pipeline, stage, layer
point), built from the fields' types, defaults and descriptions, and one table per installed
built-in reducer's ``Params``.
"""

from __future__ import annotations

from typing import Any

MARKER = "<!-- pipeline-reference -->"


def on_page_markdown(markdown: str, **kwargs: Any) -> str:
    if MARKER not in markdown:
        return markdown
    from tokenprune.pipeline import LayerAt, Pipeline, Stage
    from tokenprune.plugins import get_plugin_manager

    parts = [
        _table("Pipeline (the document)", Pipeline),
        _table("Stage (`stages[]`)", Stage),
        _table("`at: {layer: k}`", LayerAt),
    ]
    registry = get_plugin_manager().reducers
    for name in registry:
        origin = registry.origin(name)
        if origin is not None and origin.distribution == "tokenprune":
            parts.append(_table(f"`params` of `{name}`", registry.get(name).Params))
    return markdown.replace(MARKER, "\n\n".join(parts))


def _table(title: str, model: Any) -> str:
    schema = model.model_json_schema()
    rows = [f"### {title}", "", "| field | type | default | description |", "|---|---|---|---|"]
    required = set(schema.get("required", []))
    for name, spec in schema.get("properties", {}).items():
        default = "required" if name in required else f"`{spec.get('default')!r}`" if "default" in spec else ""
        rows.append(f"| `{name}` | {_type(spec)} | {default} | {spec.get('description', '')} |")
    if len(rows) == 4:
        rows.append("| (none) | | | |")
    return "\n".join(rows)


def _type(spec: dict[str, Any]) -> str:
    if "enum" in spec:
        return " \\| ".join(f"`{v}`" for v in spec["enum"])
    if "const" in spec:
        return f"`{spec['const']}`"
    if "anyOf" in spec:
        return " or ".join(_type(s) for s in spec["anyOf"])
    if "$ref" in spec:
        return spec["$ref"].rsplit("/", 1)[-1]
    kind = spec.get("type", "any")
    if kind == "array":
        return f"list of {_type(spec.get('items', {}))}"
    bounds = [f"{k} {spec[k]}" for k in ("minimum", "exclusiveMinimum", "maximum", "exclusiveMaximum") if k in spec]
    return kind + (f" ({', '.join(bounds)})" if bounds else "")
