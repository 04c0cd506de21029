"""Plugin discovery and the registries of reducers and adapters.

:func:`get_plugin_manager` builds a fresh manager each time it is called (there is no global one):
it loads every entry point of the ``tokenprune`` group, skipping the names listed in the
``TOKENPRUNE_DISABLE_PLUGINS`` environment variable (comma-separated), and reports a plugin that
fails to import with its distribution and error while still loading the others.

Two plugins that register the same name (a reducer, an adapter's model type, a task) with different
classes do not take the others down either: the registry records a :class:`Collision`, lists the
name, and raises :class:`~tokenprune.errors.PluginError` (naming both plugins and their
distributions, and how to disable one) only when the name is used.
"""

from __future__ import annotations

import copy
import difflib
import fnmatch
import os
import re
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, ClassVar, Generic, TypeVar, overload

import pluggy
from pydantic import BaseModel

from tokenprune import hookspecs
from tokenprune.adapters.base import ModelAdapter
from tokenprune.errors import (
    PipelineError,
    PluginError,
    PluginLoadWarning,
    UnknownReducerError,
    UnknownTaskError,
    UnsupportedModelError,
)
from tokenprune.reducer import Capabilities, TokenReducer, legacy_overrides

ENTRY_POINT_GROUP = "tokenprune"
DISABLE_ENV = "TOKENPRUNE_DISABLE_PLUGINS"
ADAPTER_DOCS = "docs/extending/adapters.md"
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


@dataclass(frozen=True)
class PluginInfo:
    """Where a plugin came from.

    Attributes:
        name: The plugin's name: its entry-point name, or the name it was registered under.
        module: The module (or object) that was registered.
        distribution: The installed distribution that declared the entry point (None when the
            plugin was registered directly, as tests do).
        version: That distribution's version.
    """

    name: str
    module: str
    distribution: str | None = None
    version: str | None = None

    def describe(self) -> str:
        """E.g. ``plugin 'random' (distribution tokenprune 0.1.0)``."""
        if self.distribution is None:
            return f"plugin {self.name!r} (registered directly, no distribution)"
        return f"plugin {self.name!r} (distribution {self.distribution} {self.version})"


@dataclass(frozen=True)
class PluginLoadFailure:
    """A plugin that could not be loaded; the others were."""

    name: str
    distribution: str | None
    version: str | None
    error: str

    def describe(self) -> str:
        dist = f"distribution {self.distribution} {self.version}" if self.distribution else "no distribution"
        return f"plugin {self.name!r} ({dist}) failed to load: {self.error}"


T = TypeVar("T")
R = TypeVar("R", bound="_Registry[Any]")


@dataclass(frozen=True)
class Claim(Generic[T]):
    """One registration of a name: the plugin that made it and the class it registered."""

    origin: PluginInfo | None
    value: T

    def describe(self) -> str:
        """E.g. ``plugin 'acme' (distribution acme-pruners 0.3) (acme.Norm)``."""
        return f"{_origin(self.origin)} ({_qualname(self.value)})"


@dataclass(frozen=True)
class Collision:
    """A name that several plugins registered with different classes.

    The other names of those plugins still work; only using this one is an error (:meth:`error`),
    until all but one of the claims is uninstalled or disabled.

    Attributes:
        kind: What the name is: ``reducer``, ``adapter for model_type`` or ``task``.
        name: The name (a model type for adapters).
        claims: Every registration of the name, in registration order.
    """

    kind: str
    name: str
    claims: tuple[Claim[Any], ...]

    def describe(self) -> str:
        """E.g. ``reducer 'x' is registered twice: by plugin 'a' (...) (a.X) and by plugin 'b' (...) (b.X)``."""
        times = "twice" if len(self.claims) == 2 else f"{len(self.claims)} times"
        by = " and by ".join(c.describe() for c in self.claims)
        return f"{self.kind} {self.name!r} is registered {times}: by {by}"

    def fix(self) -> str:
        """How to resolve it: uninstall a distribution, or disable a plugin by its entry-point name."""
        dists = sorted({c.origin.distribution for c in self.claims if c.origin and c.origin.distribution})
        plugins = sorted({c.origin.name for c in self.claims if c.origin and c.origin.distribution})
        ways = []
        if dists:
            ways.append("uninstall one of the distributions (" + ", ".join(dists) + ")")
        if plugins:
            settings = " or ".join(f"{DISABLE_ENV}={name}" for name in plugins)
            ways.append(f"disable one plugin with {settings} (that drops everything the plugin registers)")
        if len(plugins) < len(self.claims):
            ways.append("register only one of the classes")
        return "To use it, " + ", or ".join(ways) + "."

    def error(self) -> PluginError:
        """The error raised when a pipeline (or a lookup) uses the name."""
        return PluginError(f"{self.describe()}. {self.fix()}")


@dataclass
class _Registry(Generic[T]):
    """Shared machinery: claims keyed by name, each remembering the plugin that made it.

    A name claimed with two different classes is a :class:`Collision`: it stays listed, and looking
    it up raises :class:`PluginError` naming both plugins; every other name keeps working.
    """

    kind: ClassVar[str] = "entry"
    hook: ClassVar[str] = ""
    _claims: dict[str, list[Claim[T]]] = field(default_factory=dict)
    _current: PluginInfo | None = None

    @contextmanager
    def _registering_for(self, info: PluginInfo | None) -> Iterator[None]:
        previous, self._current = self._current, info
        try:
            yield
        finally:
            self._current = previous

    def _who(self, value: object, ok: bool, expected: str) -> str:
        """The registering plugin's name for messages; raises unless ``ok`` (``value`` is an ``expected``)."""
        who = _origin(self._current)
        if not ok:
            raise PluginError(f"{who} registered {value!r}, which is not {expected}")
        return who

    def _put(self, key: str, value: T, exist_ok: bool) -> None:
        claims = self._claims.setdefault(key, [])
        if exist_ok:
            claims[:] = [Claim(self._current, value)]
        elif not any(c.value is value for c in claims):  # the same class twice is not a collision
            claims.append(Claim(self._current, value))

    def _value(self, key: str) -> T:
        """The class registered as ``key``; KeyError if none, PluginError if it collides."""
        claims = self._claims[key]
        if len(claims) > 1:
            raise self._collision(key, claims).error()
        return claims[0].value

    def get(self, key: str) -> T:
        """The class (or preset) registered as ``key``.

        Raises:
            TokenpruneError: nothing is registered as ``key`` (the subclass's error, listing what is and
                the closest name).
            PluginError: several plugins registered ``key`` (naming them, and how to disable one).
        """
        try:
            return self._value(key)
        except KeyError:
            raise self._unknown(key) from None

    def _unknown(self, key: str) -> Exception:
        """The error :meth:`get` raises for a name nobody registered."""
        return KeyError(f"no {self.kind} {key!r}")

    def _did_you_mean(self, name: str) -> str:
        """``"; did you mean 'x'?"`` for the closest registered name, or ``""``."""
        close = difflib.get_close_matches(name, list(self), n=1)
        return f"; did you mean {close[0]!r}?" if close else ""

    def _collision(self, key: str, claims: list[Claim[T]]) -> Collision:
        return Collision(self.kind, key, tuple(claims))

    @property
    def collisions(self) -> list[Collision]:
        """The names registered more than once with different classes, by name."""
        return [self._collision(k, self._claims[k]) for k in self if len(self._claims[k]) > 1]

    def claims(self, key: str) -> list[Claim[T]]:
        """Every registration of ``key`` (one, unless it collides)."""
        return list(self._claims[key])

    def registered_by(self, key: str, plugin_name: str) -> T:
        """The class that the plugin ``plugin_name`` registered as ``key`` (even if the name collides)."""
        for claim in self._claims[key]:
            if claim.origin is not None and claim.origin.name == plugin_name:
                return claim.value
        raise KeyError(f"plugin {plugin_name!r} did not register {self.kind} {key!r}")

    def origin(self, key: str) -> PluginInfo | None:
        """The plugin that registered ``key`` (None if registered outside any plugin).

        Raises:
            PluginError: several plugins registered ``key``.
        """
        claims = self._claims[key]
        if len(claims) > 1:
            raise self._collision(key, claims).error()
        return claims[0].origin

    def provided_by(self, plugin_name: str) -> list[str]:
        """The names that the plugin ``plugin_name`` registered (colliding ones included)."""
        return [k for k in self if any(c.origin is not None and c.origin.name == plugin_name for c in self._claims[k])]

    def unambiguous(self: R) -> R:
        """A copy without the colliding names (e.g. for a schema of everything that can be used)."""
        copy = type(self)()
        copy._claims = {k: list(v) for k, v in self._claims.items() if len(v) == 1}
        return copy

    def __contains__(self, key: object) -> bool:
        return key in self._claims

    def __len__(self) -> int:
        return len(self._claims)

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._claims))


class ReducerRegistry(_Registry[type[TokenReducer]]):
    """Reducer classes by registry name. Filled by the ``tokenprune_register_reducers`` hook."""

    kind: ClassVar[str] = "reducer"
    hook: ClassVar[str] = "tokenprune_register_reducers"

    def add(self, reducer: type[TokenReducer], *, exist_ok: bool = False) -> None:
        """Register a reducer class under ``reducer.name``.

        A name that another plugin registered with a different class is recorded as a
        :class:`Collision` (``exist_ok`` replaces the earlier class instead): the name stays listed,
        and :meth:`get` raises for it.

        Raises:
            PluginError: the class breaks the contract.
        """
        is_reducer = isinstance(reducer, type) and issubclass(reducer, TokenReducer)
        who = self._who(reducer, is_reducer, "a subclass of tokenprune.TokenReducer")
        name = getattr(reducer, "name", None)
        if not isinstance(name, str) or not _NAME.match(name):
            raise PluginError(
                f"{who} registered {_qualname(reducer)} with name {name!r}; a reducer name is lower case "
                "letters, digits and '_', starting with a letter"
            )
        params = reducer.Params
        if not (isinstance(params, type) and issubclass(params, BaseModel)):
            raise PluginError(f"{who}: {_qualname(reducer)}.Params must be a pydantic model (a ReducerParams subclass)")
        if params.model_config.get("extra") != "forbid":
            raise PluginError(
                f"{who}: {_qualname(reducer)}.Params must forbid unknown fields; subclass tokenprune.ReducerParams "
                "or set model_config = ConfigDict(extra='forbid')"
            )
        if not isinstance(reducer.capabilities, Capabilities):
            raise PluginError(f"{who}: {_qualname(reducer)}.capabilities must be a tokenprune.Capabilities")
        if reducer.__abstractmethods__:
            missing = ", ".join(sorted(reducer.__abstractmethods__))
            raise PluginError(f"{who}: {_qualname(reducer)} does not implement {missing}")
        if legacy := legacy_overrides(reducer):
            warnings.warn(
                f"{who}: {_qualname(reducer)} overrides {', '.join(legacy)}, deprecated; override "
                "requirements(cls, params) -> tokenprune.Requirements instead (it still works for now)",
                DeprecationWarning,
                stacklevel=2,
            )
        self._put(name, reducer, exist_ok)

    def _unknown(self, key: str) -> Exception:
        return UnknownReducerError(self.unknown_message(key))

    def unknown_message(self, name: str) -> str:
        """``unknown reducer 'x'; did you mean 'y'? Installed: ...``."""
        installed = ", ".join(self) or "none"
        hint = self._did_you_mean(name)
        return (
            f"unknown reducer {name!r}{hint} Installed reducers: {installed}. "
            "Install the plugin that provides it, or check `tokenprune plugins`."
        )

    def describe(self, name: str) -> str:
        """E.g. ``reducer 'random' (plugin 'random', distribution tokenprune 0.1.0)``."""
        info = self.origin(name)
        if info is None:
            return f"reducer {name!r} (registered outside a plugin)"
        dist = f"distribution {info.distribution} {info.version}" if info.distribution else "no distribution"
        return f"reducer {name!r} (plugin {info.name!r}, {dist})"


class AdapterRegistry(_Registry[type[ModelAdapter]]):
    """Adapter classes by ``model_type``. Filled by the ``tokenprune_register_adapters`` hook."""

    kind: ClassVar[str] = "adapter for model_type"
    hook: ClassVar[str] = "tokenprune_register_adapters"

    def add(self, adapter: type[ModelAdapter], *, exist_ok: bool = False) -> None:
        """Register ``adapter`` for each of its ``model_types``.

        A model type that another plugin claimed with a different class is recorded as a
        :class:`Collision` (``exist_ok`` replaces the earlier class instead); :meth:`get` raises for it.

        Raises:
            PluginError: the class is not a ModelAdapter, or declares no model type.
        """
        is_adapter = isinstance(adapter, type) and issubclass(adapter, ModelAdapter)
        who = self._who(adapter, is_adapter, "a tokenprune.adapters.ModelAdapter")
        types = getattr(adapter, "model_types", ())
        if isinstance(types, str) or not types or not all(isinstance(t, str) and t for t in types):
            raise PluginError(
                f"{who}: {_qualname(adapter)}.model_types must be a non-empty tuple of model_type strings"
            )
        for model_type in types:
            self._put(model_type, adapter, exist_ok)

    def _unknown(self, key: str) -> Exception:
        supported = ", ".join(self) or "none"
        return UnsupportedModelError(
            f"no adapter supports model_type {key!r}. Supported: {supported}. "
            f"To add an architecture, write an adapter plugin ({ADAPTER_DOCS})."
        )


class _NamedRegistry(_Registry[T]):
    """A registry of objects registered under their own ``name`` (tasks, signal channels)."""

    def add(self, value: T, *, exist_ok: bool = False) -> None:
        """Register ``value`` under its ``name``.

        A name that another plugin registered with a different value is recorded as a
        :class:`Collision`; :meth:`get` raises for it.

        Raises:
            PluginError: ``value`` is not what this registry holds, or its name is not allowed.
        """
        self._put(self._checked_name(value), value, exist_ok)

    def _checked_name(self, value: T) -> str:
        """``value``'s name, once the registry's checks pass (else :class:`PluginError`)."""
        raise NotImplementedError


class TaskRegistry(_NamedRegistry[type]):
    """Evaluation task classes (:class:`~tokenprune.bench.tasks.Task`) by name. Filled by the
    ``tokenprune_register_tasks`` hook."""

    kind: ClassVar[str] = "task"
    hook: ClassVar[str] = "tokenprune_register_tasks"

    def _checked_name(self, task: type) -> str:
        from tokenprune.bench.tasks import Task

        who = self._who(task, isinstance(task, type) and issubclass(task, Task), "a tokenprune.bench.tasks.Task")
        name = getattr(task, "name", None)
        if not isinstance(name, str) or not _NAME.match(name):
            raise PluginError(f"{who} registered {_qualname(task)} with invalid task name {name!r}")
        return name

    def _unknown(self, key: str) -> Exception:
        installed = ", ".join(self) or "none"
        return UnknownTaskError(f"unknown task {key!r}{self._did_you_mean(key)} Installed tasks: {installed}.")


class SignalRegistry(_NamedRegistry[Any]):
    """Signal channels (:class:`~tokenprune.channels.SignalChannel`) by name; a built-in signal's name is refused.
    Filled by the ``tokenprune_register_signals`` hook."""

    kind: ClassVar[str] = "signal"
    hook: ClassVar[str] = "tokenprune_register_signals"

    def _checked_name(self, channel: Any) -> str:
        from tokenprune.channels import SignalChannel
        from tokenprune.reducer import BUILTIN_SIGNALS

        who = self._who(channel, isinstance(channel, SignalChannel), "a tokenprune.channels.SignalChannel")
        if channel.name in BUILTIN_SIGNALS:
            raise PluginError(f"{who} registered the signal {channel.name!r}, which the engine itself provides")
        return channel.name

    def _unknown(self, key: str) -> Exception:
        installed = ", ".join(self) or "none"
        return PluginError(f"unknown signal {key!r}{self._did_you_mean(key)} Registered signals: {installed}.")


PRESET_NAME = re.compile(r"^[a-z][a-z0-9_.-]*$")


@dataclass(frozen=True)
class Preset:
    """A named pipeline a plugin ships: typically the configuration of a paper's main table.

    Attributes:
        name: The preset's name (``preset: NAME`` in YAML, ``tokenprune compare --preset NAME``).
        definition: The pipeline as a YAML document holds it (``stages``, ``positions``, ...).
        paper: The paper, e.g. ``"FastV (Chen et al., ECCV 2024), arXiv 2403.06764"``.
        table: What it reproduces, e.g. ``"Table 1, LLaVA-NeXT-8B, 70% pruned"``.
        description: One line for ``tokenprune plugins``.
    """

    name: str
    definition: dict[str, Any]
    paper: str
    table: str
    description: str = ""


class PipelineRegistry(_Registry[Preset]):
    """Named pipelines (presets) by name. Filled by the ``tokenprune_register_pipelines`` hook."""

    kind: ClassVar[str] = "pipeline preset"
    hook: ClassVar[str] = "tokenprune_register_pipelines"

    def add(
        self,
        name: str,
        definition: Mapping[str, Any],
        *,
        paper: str,
        table: str,
        description: str = "",
        exist_ok: bool = False,
    ) -> None:
        """Register the pipeline ``definition`` (a mapping as in a YAML file) as the preset ``name``.

        The definition is checked for its shape here (a ``stages`` list, no ``name`` or ``preset``
        key); its stages are validated against the installed reducers when the preset is used.

        Raises:
            PluginError: the name or the definition is malformed, or ``paper`` / ``table`` is empty.
        """
        who = _origin(self._current)
        if not isinstance(name, str) or not PRESET_NAME.match(name):
            raise PluginError(
                f"{who} registered the preset name {name!r}; a preset name is lower case letters, digits, "
                "'_', '-' and '.', starting with a letter"
            )
        if not isinstance(definition, Mapping) or not isinstance(definition.get("stages"), list):
            raise PluginError(f"{who}: preset {name!r} must be a mapping with a `stages:` list")
        if {"name", "preset"} & set(definition):
            raise PluginError(f"{who}: preset {name!r} must not set `name` or `preset` (the preset name names it)")
        if not (isinstance(paper, str) and paper.strip() and isinstance(table, str) and table.strip()):
            raise PluginError(f"{who}: preset {name!r} must name its paper and the table it reproduces")
        self._put(name, Preset(name, copy.deepcopy(dict(definition)), paper, table, description), exist_ok)

    def _unknown(self, key: str) -> Exception:
        return PipelineError(
            f"unknown pipeline preset {key!r}{self._did_you_mean(key)} Installed presets: "
            f"{', '.join(self) or 'none'} (see `tokenprune plugins`)."
        )

    def matching(self, pattern: str) -> list[str]:
        """The preset names matching ``pattern`` (``fnmatch``: ``sparsevlm-*``), or ``pattern`` itself.

        Raises:
            PipelineError: nothing matches (listing the presets).
        """
        if not any(ch in pattern for ch in "*?["):
            self.get(pattern)
            return [pattern]
        names = [n for n in self if fnmatch.fnmatchcase(n, pattern)]
        if not names:
            raise PipelineError(f"no pipeline preset matches {pattern!r}; installed: {', '.join(self) or 'none'}")
        return names


def reducers_hook(*reducers: type[TokenReducer]) -> Callable[[ReducerRegistry], None]:
    """A ``tokenprune_register_reducers`` implementation that registers ``reducers``: the whole hook of a plugin
    that only adds its classes, bound to the hook's name in the plugin module::

        tokenprune_register_reducers = tokenprune.plugins.reducers_hook(OutlierTokens)

    It is the decorated function that calls ``registry.add`` for each class, in order.
    """

    @hookspecs.hookimpl
    def tokenprune_register_reducers(registry: ReducerRegistry) -> None:
        for reducer in reducers:
            registry.add(reducer)

    return tokenprune_register_reducers


class _RegistryOf(Generic[R]):
    """A :class:`PluginManager` attribute: one registry, filled from its hook on first use."""

    def __init__(self, kind: type[R], doc: str) -> None:
        self.kind = kind
        self.__doc__ = doc

    @overload
    def __get__(self, manager: None, owner: type) -> _RegistryOf[R]: ...

    @overload
    def __get__(self, manager: PluginManager, owner: type) -> R: ...

    def __get__(self, manager: PluginManager | None, owner: type) -> R | _RegistryOf[R]:
        return self if manager is None else manager._registry(self.kind)


class PluginManager:
    """The loaded plugins, with typed access to what they register.

    Build it with :func:`get_plugin_manager`. The registries are built on first use from the
    plugins' hooks, each entry remembering which plugin added it.
    """

    def __init__(
        self, pm: pluggy.PluginManager, infos: dict[str, PluginInfo], failures: list[PluginLoadFailure]
    ) -> None:
        self.pluggy = pm
        self._infos = infos
        self.failures = failures
        self._registries: dict[str, _Registry[Any]] = {}

    def register(self, plugin: object, name: str | None = None) -> str:
        """Register a plugin object directly (tests, notebooks); returns its name."""
        registered = self.pluggy.register(plugin, name=name)
        if registered is None:
            raise PluginError(f"plugin {name or plugin!r} is blocked ({DISABLE_ENV}) or already registered")
        self._infos[registered] = PluginInfo(registered, _module_name(plugin))
        self.pluggy.check_pending()
        self._registries.clear()
        return registered

    @property
    def plugins(self) -> list[PluginInfo]:
        """The loaded plugins, by name."""
        return [self._infos[name] for name in sorted(self._infos)]

    reducers = _RegistryOf(ReducerRegistry, "Every registered reducer class.")
    adapters = _RegistryOf(AdapterRegistry, "Every registered adapter class.")
    tasks = _RegistryOf(TaskRegistry, "Every registered evaluation task class.")
    pipelines = _RegistryOf(PipelineRegistry, "Every registered pipeline preset.")
    signals = _RegistryOf(SignalRegistry, "Every registered signal channel.")

    @property
    def collisions(self) -> list[Collision]:
        """Names that several plugins registered differently: reducers, adapters, tasks, presets."""
        return [
            *self.reducers.collisions,
            *self.adapters.collisions,
            *self.tasks.collisions,
            *self.pipelines.collisions,
            *self.signals.collisions,
        ]

    def _registry(self, kind: type[R]) -> R:
        """The registry of ``kind``, filled from ``kind.hook`` on first use."""
        if kind.hook not in self._registries:
            registry = kind()
            self._collect(kind.hook, registry)
            self._registries[kind.hook] = registry
        return self._registries[kind.hook]  # type: ignore[return-value]

    def _collect(self, hook_name: str, registry: _Registry[Any]) -> None:
        hook = getattr(self.pluggy.hook, hook_name)
        everyone = self.pluggy.get_plugins()
        # Call each plugin's implementation on its own, so every entry knows its origin.
        for impl in reversed(hook.get_hookimpls()):  # pluggy lists them last-registered first
            caller = self.pluggy.subset_hook_caller(
                hook_name, remove_plugins=[p for p in everyone if p is not impl.plugin]
            )
            with registry._registering_for(self._infos.get(impl.plugin_name)):
                caller(registry=registry)


def get_plugin_manager(
    *,
    entry_points: bool = True,
    disabled: Iterable[str] | None = None,
    plugins: Iterable[object] = (),
) -> PluginManager:
    """Build a plugin manager.

    Args:
        entry_points: Load the ``tokenprune`` entry-point group (the built-ins are there too).
        disabled: Plugin names not to load; defaults to ``TOKENPRUNE_DISABLE_PLUGINS``.
        plugins: Extra plugin objects to register directly.

    A plugin that fails to import, or whose hook implementations do not match the specifications,
    is recorded in :attr:`PluginManager.failures` and reported with a :class:`PluginLoadWarning`;
    the other plugins still load.
    """
    pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    pm.add_hookspecs(hookspecs)
    if disabled is None:
        disabled = [n.strip() for n in os.environ.get(DISABLE_ENV, "").split(",") if n.strip()]
    for name in disabled:
        pm.set_blocked(name)
    infos: dict[str, PluginInfo] = {}
    failures: list[PluginLoadFailure] = []
    if entry_points:
        seen: set[tuple[str, str]] = set()
        for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
            if (ep.name, ep.value) in seen or pm.is_blocked(ep.name):
                continue
            seen.add((ep.name, ep.value))
            dist = ep.dist.metadata["Name"] if ep.dist is not None else None
            version = ep.dist.version if ep.dist is not None else None
            try:
                plugin = ep.load()
                pm.register(plugin, name=ep.name)
                _check_pending(pm, ep.name)
            except Exception as exc:  # a broken plugin must not take the others down
                if pm.has_plugin(ep.name):
                    pm.unregister(name=ep.name)
                failure = PluginLoadFailure(ep.name, dist, version, f"{type(exc).__name__}: {exc}")
                failures.append(failure)
                warnings.warn(failure.describe(), PluginLoadWarning, stacklevel=2)
                continue
            infos[ep.name] = PluginInfo(ep.name, _module_name(plugin), dist, version)
    manager = PluginManager(pm, infos, failures)
    for plugin in plugins:
        manager.register(plugin)
    return manager


def list_reducers(manager: PluginManager | None = None) -> list[str]:
    """Names of the installed reducers."""
    return list((manager or get_plugin_manager()).reducers)


def list_adapters(manager: PluginManager | None = None) -> list[str]:
    """Model types that installed adapters support."""
    return list((manager or get_plugin_manager()).adapters)


def _check_pending(pm: pluggy.PluginManager, name: str) -> None:
    """Catch the two silent plugin mistakes: a misspelt hook, and a hook missing ``@hookimpl``."""
    plugin = pm.get_plugin(name)
    implemented = {caller.name for caller in pm.get_hookcallers(plugin) or []}
    for attr in dir(plugin):
        if not attr.startswith("tokenprune_") or not callable(getattr(plugin, attr, None)):
            continue
        if not hasattr(hookspecs, attr):
            known = ", ".join(n for n in dir(hookspecs) if n.startswith("tokenprune_"))
            raise PluginError(f"it defines {attr!r}, which is not a tokenprune hook (known hooks: {known})")
        if attr not in implemented:
            raise PluginError(f"its {attr!r} is not marked with @tokenprune.hookimpl, so it would never be called")
    pm.check_pending()


def _module_name(plugin: object) -> str:
    return getattr(plugin, "__name__", None) or type(plugin).__qualname__


def _qualname(obj: object) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', obj)}"


def _origin(info: PluginInfo | None) -> str:
    return info.describe() if info is not None else "code outside any plugin"


__all__ = [
    "ADAPTER_DOCS",
    "DISABLE_ENV",
    "ENTRY_POINT_GROUP",
    "AdapterRegistry",
    "Claim",
    "Collision",
    "PluginInfo",
    "PluginLoadFailure",
    "PluginManager",
    "ReducerRegistry",
    "TaskRegistry",
    "get_plugin_manager",
    "list_adapters",
    "list_reducers",
]
