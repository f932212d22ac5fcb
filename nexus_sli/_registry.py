"""The registry: custom layers and architecture families, one shared instance.

Design:

* **Validate, then commit.** Every check runs before the registry changes; a failed
  registration leaves it exactly as it was.
* **Copy-on-write state.** A mutation builds new dicts under a lock and swaps them in, so
  lookups take no lock, stay O(1), and never see a half-made change.
* **Scopes.** :meth:`ArchitectureRegistry.scoped` starts a scope (a ContextVar holding a copy of
  the current state); registrations inside it touch only the scope and vanish on exit. Scopes
  nest, and are per thread / per asyncio task like any ContextVar.
* **Plugins.** Entry points of the group ``nexus_sli.layers`` are loaded lazily: on the first
  lookup miss, or by :meth:`ArchitectureRegistry.load_plugins`.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib.metadata
import inspect
import sys
import threading
import types
from collections.abc import Callable, Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from beartype import beartype

from ._beartype import CONF
from ._family import ArchitectureFamily
from ._protocols import LayerFactory, TLayerFactory
from ._validation import (
    check_callable,
    check_family_id,
    check_layer_name,
    check_signature,
    describe_callable,
    instantiate_on_meta,
)
from .errors import (
    ArgumentTypeError,
    DuplicateFamilyError,
    DuplicateLayerError,
    InvalidFamilyError,
    PluginLoadError,
    RemoteCodeError,
    UnknownFamilyError,
    UnknownLayerError,
    UnsupportedArchitectureError,
)

if TYPE_CHECKING:
    _FactoryArg = LayerFactory
    _NameArg = str
else:
    # beartype sees ``object`` so that the documented order of checks (name, duplicate,
    # callable, ...) decides the error, not the annotation; lookups check their name by hand.
    _FactoryArg = object
    _NameArg = object

__all__ = [
    "PLUGIN_GROUP",
    "ArchitectureRegistry",
    "DetectionExplanation",
    "FamilyRegistration",
    "LayerRegistration",
    "get_registry",
    "register_layer",
]

#: Entry-point group through which installed packages expose layers.
PLUGIN_GROUP = "nexus_sli.layers"

_SKIP_MODULES = ("nexus_sli._registry", "nexus_sli.architecture_registry", "beartype", "contextlib")


def _caller() -> tuple[str, int]:
    """Module name and line of the first frame outside the registry machinery."""
    frame: types.FrameType | None = sys._getframe(1)
    while frame is not None:
        module = str(frame.f_globals.get("__name__", "?"))
        if not module.startswith(_SKIP_MODULES) and not module.startswith("importlib"):
            return module, frame.f_lineno
        frame = frame.f_back
    return "?", 0


@dataclass(frozen=True)
class LayerRegistration:
    """One registered custom layer and where it came from."""

    name: str
    factory: LayerFactory
    module: str
    lineno: int
    origin: str = "call"
    validated: bool = True

    @property
    def registered_at(self) -> str:
        """``module:line`` of the registration call."""
        return f"{self.module}:{self.lineno}"

    @property
    def defined_at(self) -> str:
        """Where the factory itself was defined."""
        return describe_callable(self.factory)


@dataclass(frozen=True)
class FamilyRegistration:
    """One registered architecture family and where it came from."""

    family_id: str
    family: ArchitectureFamily
    module: str
    lineno: int

    @property
    def registered_at(self) -> str:
        return f"{self.module}:{self.lineno}"


@dataclass(frozen=True)
class DetectionExplanation:
    """Why :meth:`ArchitectureRegistry.detect_family` chose (or did not choose) a family."""

    model_type: str | None
    architectures: tuple[str, ...]
    family_id: str | None
    rule: str | None
    matched: str | None
    considered: tuple[str, ...]
    closest: tuple[str, ...] = ()

    def __str__(self) -> str:
        lines = [
            f"model_type: {self.model_type!r}",
            f"architectures: {list(self.architectures)}",
            f"families considered: {', '.join(self.considered) or '(none registered)'}",
        ]
        if self.family_id is None:
            lines.append("matched: nothing (no family claims this model_type or architecture)")
            if self.closest:
                lines.append(f"closest supported: {', '.join(self.closest)}")
        else:
            lines.append(f"matched: family {self.family_id!r} by {self.rule} == {self.matched!r}")
        return "\n".join(lines)


@dataclass
class _State:
    layers: dict[str, LayerRegistration] = field(default_factory=dict)
    families: dict[str, FamilyRegistration] = field(default_factory=dict)
    by_model_type: dict[str, str] = field(default_factory=dict)
    by_architecture: dict[str, str] = field(default_factory=dict)

    def copy(self) -> _State:
        return _State(
            dict(self.layers),
            dict(self.families),
            dict(self.by_model_type),
            dict(self.by_architecture),
        )


def _same_factory(a: object, b: object) -> bool:
    if a is b:
        return True
    if inspect.ismethod(a) and inspect.ismethod(b):
        return a.__func__ is b.__func__ and a.__self__ is b.__self__
    return False


def _config_field(config: Any, key: str) -> Any:
    if isinstance(config, Mapping):
        return config.get(key)
    return getattr(config, key, None)


class ArchitectureRegistry:
    """The registry of custom layers and architecture families (one shared instance).

    ``ArchitectureRegistry()`` and :func:`get_registry` return the same object. Use
    :meth:`isolated` for a separate registry, and :meth:`scoped` for temporary changes.
    """

    _shared: ClassVar[ArchitectureRegistry | None] = None
    _shared_lock: ClassVar[threading.Lock] = threading.Lock()

    _state: _State
    _scope_var: ContextVar[_State | None]
    _lock: threading.RLock
    _plugins_pending: bool
    _plugins_loading: bool

    def __new__(cls) -> ArchitectureRegistry:
        shared = cls._shared
        if shared is not None:
            return shared
        with cls._shared_lock:
            if cls._shared is None:
                cls._shared = cls._create()
            return cls._shared

    def __init__(self) -> None:
        # The shared instance is initialised once, in _create; calling the class again must
        # not reset it.
        pass

    @classmethod
    def _create(cls) -> ArchitectureRegistry:
        self = object.__new__(cls)
        self._state = _State()
        self._scope_var = ContextVar(f"nexus_sli_registry_scope_{id(self)}", default=None)
        self._lock = threading.RLock()
        self._plugins_pending = True
        self._plugins_loading = False
        from .families import builtin_families

        for family in builtin_families():
            self._commit_family(family.family_id, family, "nexus_sli.families", 0, replace=False)
        return self

    @classmethod
    def isolated(cls) -> ArchitectureRegistry:
        """A new registry, separate from the shared one: built-in families, no custom layers."""
        return cls._create()

    def __repr__(self) -> str:
        state = self._current()
        shared = " (shared)" if self is type(self)._shared else ""
        return (
            f"<ArchitectureRegistry{shared}: {len(state.layers)} custom layers, "
            f"{len(state.families)} families>"
        )

    # ------------------------------------------------------------------ state
    def _current(self) -> _State:
        scoped = self._scope_var.get()
        return self._state if scoped is None else scoped

    def _swap(self, mutate: Callable[[_State], None]) -> None:
        """Copy the current state, mutate the copy, and install it (global or scope)."""
        with self._lock:
            scoped = self._scope_var.get()
            new = (self._state if scoped is None else scoped).copy()
            mutate(new)
            if scoped is None:
                self._state = new
            else:
                scoped.layers = new.layers
                scoped.families = new.families
                scoped.by_model_type = new.by_model_type
                scoped.by_architecture = new.by_architecture

    @contextlib.contextmanager
    def scoped(
        self,
        layers: Mapping[str, LayerFactory] | None = None,
        *,
        replace: bool = False,
        validate: bool = True,
        probe_config: Any = None,
    ) -> Iterator[ArchitectureRegistry]:
        """Start a scope: changes inside it are undone on exit.

        ``layers`` are registered (validated as usual) on entry; ``replace=True`` lets them
        override layers of the same name for the scope's duration. Every register, replace,
        unregister or clear inside the ``with`` block also stays in the scope. Scopes nest.
        """
        token = self._scope_var.set(self._current().copy())
        try:
            for name, factory in (layers or {}).items():
                self.register_custom_layer(
                    name, factory, replace=replace, validate=validate, probe_config=probe_config
                )
            yield self
        finally:
            self._scope_var.reset(token)

    # ------------------------------------------------------------------ custom layers
    @beartype(conf=CONF)
    def register_custom_layer(
        self,
        layer_name: str,
        layer_factory: _FactoryArg,
        *,
        replace: bool = False,
        validate: bool = True,
        probe_config: Any = None,
    ) -> None:
        """Register ``layer_factory`` under ``layer_name``.

        Checks, in order: the name rule (``ValueError``), duplicates (``ValueError`` "already
        registered"; registering the identical object again is a no-op, ``replace=True``
        replaces), callability (``TypeError``), the ``(config, layer_idx)`` signature
        (``TypeError``), and a test build on the meta device with ``probe_config`` (``TypeError``
        with the cause chained; ``validate=False`` skips it, for factories whose calls have side
        effects). Nothing changes unless every check passes.
        """
        module, lineno = _caller()
        self._register(
            layer_name, layer_factory, module, lineno, "call", replace, validate, probe_config
        )

    def _register(
        self,
        name: str,
        factory: Any,
        module: str,
        lineno: int,
        origin: str,
        replace: bool,
        validate: bool,
        probe_config: Any,
    ) -> None:
        check_layer_name(name)
        existing = self._current().layers.get(name)
        if existing is not None and not replace:
            if _same_factory(existing.factory, factory):
                return
            raise self._duplicate(existing, name, factory, f"{module}:{lineno}")
        check_callable(name, factory)
        check_signature(name, factory)
        if validate:
            instantiate_on_meta(name, factory, probe_config)
        new = LayerRegistration(name, factory, module, lineno, origin, validate)

        def commit(state: _State) -> None:
            current = state.layers.get(name)
            if current is not None and not replace:
                if _same_factory(current.factory, factory):
                    return
                raise self._duplicate(current, name, factory, new.registered_at)
            # Replacing keeps the name's place in registration order.
            state.layers[name] = new

        self._swap(commit)

    @staticmethod
    def _duplicate(
        existing: LayerRegistration, name: str, factory: object, where: str
    ) -> DuplicateLayerError:
        return DuplicateLayerError(
            f"custom layer {name!r} is already registered: first at {existing.registered_at} "
            f"(factory {existing.defined_at}), again at {where} (factory "
            f"{describe_callable(factory)}). Pass replace=True to replace it on purpose, "
            f"use registry.scoped() for a temporary override, or unregister_custom_layer("
            f"{name!r}) first"
        )

    def get_layer_factory(self, layer_name: _NameArg) -> LayerFactory:
        """The factory registered under ``layer_name``; ``KeyError`` listing what is registered.

        The hot path of the registry (O(1), about a dict lookup): its one argument is checked by
        hand rather than by a beartype wrapper.
        """
        scoped = self._scope_var.get()
        if type(layer_name) is str:
            found = (self._state if scoped is None else scoped).layers.get(layer_name)
            if found is not None:
                return found.factory
        if not isinstance(layer_name, str):
            raise ArgumentTypeError(
                f"get_layer_factory() takes the layer name as a str, got "
                f"{type(layer_name).__name__} {layer_name!r}"
            )
        failures = self._load_pending_plugins()
        found = self._current().layers.get(layer_name)
        if found is not None:
            return found.factory
        raise self._unknown_layer(layer_name, failures)

    def _unknown_layer(self, name: str, failures: list[PluginLoadError]) -> UnknownLayerError:
        available = list(self._current().layers)
        close = difflib.get_close_matches(name, available, n=3, cutoff=0.6)
        hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        listing = ", ".join(repr(a) for a in available) if available else "(none)"
        plugins = "".join(f" Plugin failure: {f}." for f in failures)
        return UnknownLayerError(
            f"no custom layer registered as {name!r}.{hint} Available custom layers: {listing}."
            f"{plugins} Register one with registry.register_custom_layer({name!r}, factory)"
        )

    @beartype(conf=CONF)
    def get_layer_registration(self, layer_name: str) -> LayerRegistration:
        """The full record of a registered layer (factory, where registered, origin)."""
        found = self._current().layers.get(layer_name)
        if found is None:
            self.get_layer_factory(layer_name)  # loads plugins or raises UnknownLayerError
            found = self._current().layers[layer_name]
        return found

    @beartype(conf=CONF)
    def unregister_custom_layer(self, layer_name: str) -> bool:
        """Remove a custom layer: True if it was registered, False if it was not."""
        removed = False

        def drop(state: _State) -> None:
            nonlocal removed
            removed = state.layers.pop(layer_name, None) is not None

        self._swap(drop)
        return removed

    @beartype(conf=CONF)
    def list_custom_layers(self, pattern: str | None = None) -> list[str]:
        """Registered custom layer names in registration order (``fnmatch`` ``pattern`` filters)."""
        names = list(self._current().layers)
        if pattern is None:
            return names
        import fnmatch

        return [n for n in names if fnmatch.fnmatchcase(n, pattern)]

    @beartype(conf=CONF)
    def list_layer_registrations(self) -> list[LayerRegistration]:
        """Every custom layer record, in registration order."""
        return list(self._current().layers.values())

    def clear_custom_layers(self) -> None:
        """Remove every custom layer (in a scope: only for the scope's duration)."""

        def clear(state: _State) -> None:
            state.layers = {}

        self._swap(clear)

    # ------------------------------------------------------------------ plugins
    def _load_pending_plugins(self) -> list[PluginLoadError]:
        if not self._plugins_pending:
            return []
        # Under the (re-entrant) lock for the whole load: a lookup in another thread waits
        # for the plugins instead of missing a layer one of them provides.
        with self._lock:
            if not self._plugins_pending or self._plugins_loading:
                return []  # done meanwhile, or a plugin of this very load looking something up
            report = self.load_plugins()
        return [err for err in report.values() if err is not None]

    def load_plugins(self) -> dict[str, PluginLoadError | None]:
        """Load every ``nexus_sli.layers`` entry point; report each one's outcome.

        An entry point naming a module is imported (its registrations run on import); any
        other object is registered as a factory under the entry point's name, validated like
        any registration. A failing plugin is reported by name and does not stop the others.
        """
        with self._lock:
            self._plugins_loading = True
            try:
                return self._load_plugins()
            finally:
                self._plugins_loading = False
                self._plugins_pending = False

    def _load_plugins(self) -> dict[str, PluginLoadError | None]:
        report: dict[str, PluginLoadError | None] = {}
        for ep in importlib.metadata.entry_points(group=PLUGIN_GROUP):
            dist = ep.dist.name if ep.dist is not None else "?"
            label = f"{ep.name} = {ep.value} (distribution {dist})"
            try:
                loaded = ep.load()
                if not isinstance(loaded, types.ModuleType):
                    existing = self._current().layers.get(ep.name)
                    if existing is None or not _same_factory(existing.factory, loaded):
                        module = getattr(loaded, "__module__", ep.value)
                        self._register(
                            ep.name,
                            loaded,
                            str(module),
                            0,
                            f"entry point {label}",
                            False,
                            True,
                            None,
                        )
                report[label] = None
            except Exception as exc:
                error = PluginLoadError(
                    f"plugin entry point {label} of group {PLUGIN_GROUP!r} failed: "
                    f"{type(exc).__name__}: {exc}"
                )
                error.__cause__ = exc
                report[label] = error
        return report

    # ------------------------------------------------------------------ families
    @beartype(conf=CONF)
    def register(
        self, family_id: str, family: ArchitectureFamily, *, replace: bool = False
    ) -> None:
        """Register an architecture family under ``family_id``.

        The id must be snake_case and equal ``family.family_id``; the family must claim at
        least one model type or architecture. An id, model type or architecture already
        claimed by another family is a ``ValueError`` unless ``replace=True`` (the new family
        then takes those claims over).
        """
        module, lineno = _caller()
        self._commit_family(family_id, family, module, lineno, replace=replace)

    def _commit_family(
        self, family_id: str, family: ArchitectureFamily, module: str, lineno: int, *, replace: bool
    ) -> None:
        check_family_id(family_id)
        if family.family_id and family.family_id != family_id:
            raise InvalidFamilyError(
                f"family registered as {family_id!r} declares family_id {family.family_id!r}; "
                f"register it under its own id"
            )
        model_types = tuple(family.model_types)
        architectures = tuple(family.architectures)
        if not model_types and not architectures:
            raise InvalidFamilyError(
                f"family {family_id!r} ({type(family).__name__}) claims no model_types and no "
                f"architectures, so it could never be detected; set at least one"
            )
        new = FamilyRegistration(family_id, family, module, lineno)

        def commit(state: _State) -> None:
            existing = state.families.get(family_id)
            if existing is not None and not replace:
                if existing.family is family:
                    return
                raise DuplicateFamilyError(
                    f"family {family_id!r} is already registered (at {existing.registered_at}, "
                    f"{type(existing.family).__name__}); this registration at {new.registered_at}. "
                    f"Pass replace=True to replace it on purpose"
                )
            if not replace:
                for key, table, what in (
                    *((m, state.by_model_type, "model_type") for m in model_types),
                    *((a, state.by_architecture, "architecture") for a in architectures),
                ):
                    owner = table.get(key)
                    if owner is not None and owner != family_id:
                        raise DuplicateFamilyError(
                            f"{what} {key!r} is already claimed by family {owner!r} (registered "
                            f"at {state.families[owner].registered_at}); family {family_id!r} at "
                            f"{new.registered_at} claims it too. Pass replace=True to take it over"
                        )
            if existing is not None:
                self._drop_claims(state, family_id)
            state.families[family_id] = new
            for m in model_types:
                state.by_model_type[m] = family_id
            for a in architectures:
                state.by_architecture[a] = family_id

        self._swap(commit)

    @staticmethod
    def _drop_claims(state: _State, family_id: str) -> None:
        state.by_model_type = {k: v for k, v in state.by_model_type.items() if v != family_id}
        state.by_architecture = {k: v for k, v in state.by_architecture.items() if v != family_id}

    @beartype(conf=CONF)
    def unregister_family(self, family_id: str) -> bool:
        """Remove a family: True if it was registered, False if it was not."""
        removed = False

        def drop(state: _State) -> None:
            nonlocal removed
            removed = state.families.pop(family_id, None) is not None
            if removed:
                self._drop_claims(state, family_id)

        self._swap(drop)
        return removed

    @beartype(conf=CONF)
    def get_family(self, family_id: str) -> ArchitectureFamily:
        """The family registered under ``family_id``; ``KeyError`` listing the registered ids."""
        found = self._current().families.get(family_id)
        if found is None:
            ids = list(self._current().families)
            close = difflib.get_close_matches(family_id, ids, n=3, cutoff=0.6)
            hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
            raise UnknownFamilyError(
                f"no family registered as {family_id!r}.{hint} Registered families: "
                f"{', '.join(ids) or '(none)'}"
            )
        return found.family

    def list_families(self) -> list[str]:
        """Registered family ids, in registration order."""
        return list(self._current().families)

    @beartype(conf=CONF)
    def get_family_info(self, family_id: str) -> dict[str, Any]:
        """A plain description of a family: id, name, model types, architectures, origin."""
        family = self.get_family(family_id)
        record = self._current().families[family_id]
        return {
            "family_id": family_id,
            "family_name": family.family_name,
            "model_types": list(family.model_types),
            "architectures": list(family.architectures),
            "class": f"{type(family).__module__}.{type(family).__qualname__}",
            "registered_at": record.registered_at,
        }

    def explain(self, config: Any, *, trust_remote_code: bool = False) -> DetectionExplanation:
        """Which family :meth:`detect_family` picks for ``config``, by which rule, among which.

        ``config`` is a transformers config, any object with ``model_type`` / ``architectures``,
        or the dict of a ``config.json``. Detection matches ``model_type`` first, then exact
        ``architectures`` entries; it never guesses by substring.
        """
        self._refuse_remote_code(config, trust_remote_code)
        state = self._current()
        model_type = _config_field(config, "model_type")
        model_type = str(model_type) if model_type else None
        archs = tuple(str(a) for a in (_config_field(config, "architectures") or ()))
        considered = tuple(state.families)
        if model_type is not None and model_type in state.by_model_type:
            fid = state.by_model_type[model_type]
            return DetectionExplanation(
                model_type, archs, fid, "model_type", model_type, considered
            )
        for arch in archs:
            if arch in state.by_architecture:
                fid = state.by_architecture[arch]
                return DetectionExplanation(
                    model_type, archs, fid, "architectures", arch, considered
                )
        known = [*state.by_model_type, *state.by_architecture]
        closest: list[str] = []
        for query in [model_type or "", *archs]:
            for match in difflib.get_close_matches(query, known, n=3, cutoff=0.5):
                if match not in closest:
                    closest.append(match)
        if not closest:
            closest = sorted(state.by_model_type)[:5]
        return DetectionExplanation(model_type, archs, None, None, None, considered, tuple(closest))

    def detect_family(self, config: Any, *, trust_remote_code: bool = False) -> ArchitectureFamily:
        """The family that claims ``config`` (see :meth:`explain`).

        Raises :class:`UnsupportedArchitectureError` (a ``ValueError``) naming the model type
        and architectures and listing the closest supported ones; never falls back.
        """
        explanation = self.explain(config, trust_remote_code=trust_remote_code)
        if explanation.family_id is None:
            raise UnsupportedArchitectureError(
                f"unsupported architecture: model_type={explanation.model_type!r}, "
                f"architectures={list(explanation.architectures)}; no registered family claims "
                f"it. Closest supported: {', '.join(explanation.closest) or '(none)'}. "
                f"Supported model types: {', '.join(sorted(self._current().by_model_type))}. "
                f"Register an ArchitectureFamily with registry.register(family_id, family) to add it"
            )
        return self._current().families[explanation.family_id].family

    @staticmethod
    def _refuse_remote_code(config: Any, trust_remote_code: bool) -> None:
        auto_map = _config_field(config, "auto_map")
        if auto_map and not trust_remote_code:
            raise RemoteCodeError(
                f"this config asks for remote code (auto_map: {dict(auto_map)!r}); nexus_sli never "
                f"runs code shipped with a checkpoint unless you opt in by passing "
                f"trust_remote_code=True"
            )


def get_registry() -> ArchitectureRegistry:
    """The shared registry (the same object as ``ArchitectureRegistry()``)."""
    return ArchitectureRegistry()


def register_layer(
    layer_name: str,
    *,
    registry: ArchitectureRegistry | None = None,
    replace: bool = False,
    validate: bool = True,
    probe_config: Any = None,
) -> Callable[[TLayerFactory], TLayerFactory]:
    """Decorator: register a class or function as a custom layer and return it unchanged.

    >>> @register_layer("generic_identity")          # doctest: +SKIP
    ... class Identity(nn.Module):
    ...     def __init__(self, config, layer_idx): ...
    """
    if not isinstance(layer_name, str):
        raise ArgumentTypeError(f"register_layer() takes the layer name first, got {layer_name!r}")
    module, lineno = _caller()

    def decorate(factory: TLayerFactory) -> TLayerFactory:
        target = registry if registry is not None else get_registry()
        target._register(
            layer_name, factory, module, lineno, "decorator", replace, validate, probe_config
        )
        return factory

    return decorate
