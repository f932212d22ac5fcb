"""Contract checks of registered layers, for ``nexus-sli check`` (library authors' CI).

A layer passes when its factory binds ``(config, layer_idx)``, builds on the meta device from
every probe config (a built-in set of small Llama-, GPT-2- and BERT-like configs, or the
user's JSON configs), and keeps its forward-shape contract where it declares one.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import json
import re
import sys
import types
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._registry import PLUGIN_GROUP, ArchitectureRegistry, LayerRegistration
from ._validation import check_signature, default_probe_config, instantiate_on_meta

__all__ = [
    "CheckInputError",
    "ImportOutcome",
    "LayerOutcome",
    "ProbeConfig",
    "builtin_probe_configs",
    "check_layer",
    "import_target",
    "load_entry_points",
    "load_probe_configs",
    "validate_target",
]


class CheckInputError(ValueError):
    """A command-line argument names nothing usable (no such module, unreadable config)."""


@dataclass(frozen=True)
class ProbeConfig:
    """A config that layer factories are test-built from, with a name for reports."""

    name: str
    config: Any


@dataclass(frozen=True)
class ImportOutcome:
    """The outcome of importing one module or loading one entry point."""

    target: str
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class LayerOutcome:
    """The contract check of one registered layer against every probe config."""

    registration: LayerRegistration
    probes: tuple[str, ...]
    failures: tuple[tuple[str, str], ...]

    @property
    def ok(self) -> bool:
        return not self.failures


def one_line(text: str) -> str:
    """``text`` on one line (messages of chained errors may hold newlines)."""
    return re.sub(r"\s*\n\s*", " ", text).strip()


def describe_error(exc: BaseException) -> str:
    return one_line(f"{type(exc).__name__}: {exc}")


# ---------------------------------------------------------------------- probe configs
_METADATA = frozenset(
    {
        "architectures",
        "dtype",
        "torch_dtype",
        "transformers_version",
        "model_type",
        "id2label",
        "label2id",
        "problem_type",
        "tokenizer_class",
        "task_specific_params",
        "finetuning_task",
        "name_or_path",
    }
)


def _sizes(hidden: int, heads: int, kv_heads: int, intermediate: int) -> dict[str, int]:
    """Every spelling of the common sizes (Llama, GPT-2, BERT, T5 names), consistent."""
    head_dim = hidden // heads
    return {
        "hidden_size": hidden,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "intermediate_size": intermediate,
        "num_hidden_layers": 2,
        "max_position_embeddings": 128,
        "vocab_size": 256,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "n_embd": hidden,
        "n_head": heads,
        "n_inner": intermediate,
        "n_layer": 2,
        "n_positions": 128,
        "d_model": hidden,
        "d_ff": intermediate,
        "d_kv": head_dim,
        "num_heads": heads,
        "num_layers": 2,
        "moe_intermediate_size": max(intermediate // 4, 1),
    }


def builtin_probe_configs() -> list[ProbeConfig]:
    """Three small configs with the common attributes and different widths.

    ``llama-like`` (a ``LlamaConfig``, hidden 64, 4 heads, 2 key/value heads), ``gpt2-like``
    (a ``GPT2Config``, hidden 96, 6 heads) and ``bert-like`` (a ``BertConfig``, hidden 128,
    8 heads). Every size is set under each common spelling (``hidden_size``, ``n_embd``,
    ``d_model``, ...), and each config also carries every other attribute the other two have
    (norm eps, activation, dropout, biases, expert counts, ...), so a layer that reads its sizes
    from the config builds from all three, and one with a hard-coded width does not.
    """
    from transformers import BertConfig, GPT2Config

    configs: list[tuple[str, Any, dict[str, int]]] = [
        ("llama-like", default_probe_config(), _sizes(64, 4, 2, 128)),
        ("gpt2-like", GPT2Config(), _sizes(96, 6, 6, 384)),
        ("bert-like", BertConfig(), _sizes(128, 8, 4, 512)),
    ]
    for _, config, sizes in configs:
        for key, value in sizes.items():
            setattr(config, key, value)
    defaults: dict[str, Any] = {}
    for _, config, sizes in configs:
        for key, value in vars(config).items():
            if key.startswith("_") or key in _METADATA or key in sizes:
                continue
            defaults.setdefault(key, value)
    probes = []
    for name, config, _ in configs:
        for key, value in defaults.items():
            if not hasattr(config, key):
                setattr(config, key, value)
        config._attn_implementation = "sdpa"
        probes.append(ProbeConfig(name, config))
    return probes


def _config_from_dict(data: dict[str, Any]) -> Any:
    from transformers import CONFIG_MAPPING, AutoConfig, PretrainedConfig

    model_type = data.get("model_type")
    if isinstance(model_type, str) and model_type in CONFIG_MAPPING:
        fields = {k: v for k, v in data.items() if k != "model_type"}
        config = AutoConfig.for_model(model_type, **fields)
    else:
        config = PretrainedConfig(**data)
    config._attn_implementation = "sdpa"
    return config


def load_probe_configs(paths: Sequence[Path]) -> list[ProbeConfig]:
    """Probe configs from JSON files: an object (a ``config.json``) or a list of objects.

    An object whose ``model_type`` transformers knows becomes that config class; any other
    object becomes a plain ``PretrainedConfig`` holding its keys as attributes.
    """
    probes: list[ProbeConfig] = []
    for path in paths:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as exc:
            raise CheckInputError(f"cannot read probe config {str(path)!r}: {exc}") from exc
        except json.JSONDecodeError as exc:
            raise CheckInputError(f"probe config {str(path)!r} is not valid JSON: {exc}") from exc
        items = data if isinstance(data, list) else [data]
        if not items or not all(isinstance(item, dict) for item in items):
            raise CheckInputError(
                f"probe config {str(path)!r} must hold a JSON object (a config.json) or a "
                f"non-empty list of objects"
            )
        for i, item in enumerate(items):
            name = path.name if len(items) == 1 else f"{path.name}[{i}]"
            try:
                config = _config_from_dict(item)
            except Exception as exc:
                raise CheckInputError(
                    f"probe config {name!r} is not a valid config: {describe_error(exc)}"
                ) from exc
            probes.append(ProbeConfig(name, config))
    return probes


# ---------------------------------------------------------------------- imports and plugins
def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _entry_points_for(target: str) -> list[importlib.metadata.EntryPoint]:
    found = []
    for ep in importlib.metadata.entry_points(group=PLUGIN_GROUP):
        dist = ep.dist.name if ep.dist is not None else None
        if ep.name == target or (dist is not None and _normalise(dist) == _normalise(target)):
            found.append(ep)
    return found


def _label(ep: importlib.metadata.EntryPoint) -> str:
    dist = ep.dist.name if ep.dist is not None else "?"
    return f"entry point {ep.name} = {ep.value} (distribution {dist})"


def _load_entry_point(registry: ArchitectureRegistry, ep: importlib.metadata.EntryPoint) -> None:
    """Load one entry point the way :meth:`ArchitectureRegistry.load_plugins` loads each."""
    loaded = ep.load()
    if isinstance(loaded, types.ModuleType):
        return  # its registrations ran on import
    module = str(getattr(loaded, "__module__", ep.value))
    origin = _label(ep)
    registry._register(ep.name, loaded, module, 0, origin, False, True, None)


def load_entry_points(registry: ArchitectureRegistry) -> list[ImportOutcome]:
    """Load every ``nexus_sli.layers`` entry point of the installed packages."""
    report = registry.load_plugins()
    return [
        ImportOutcome(label, None if error is None else one_line(str(error)))
        for label, error in report.items()
    ]


def _import_file(path: Path) -> None:
    name = path.stem
    if name in sys.modules:
        raise CheckInputError(
            f"cannot import {str(path)!r}: a module named {name!r} is already imported; rename "
            f"the file or name the module instead"
        )
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise CheckInputError(f"cannot import {str(path)!r} as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise


def _module_exists(target: str) -> bool:
    try:
        return importlib.util.find_spec(target) is not None
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        # The target itself (or a parent) is missing; otherwise a parent package exists but
        # failed, and import_module reports that.
        return not (missing and (target == missing or target.startswith(missing + ".")))
    except ValueError:
        return False  # empty or relative name
    except Exception:
        return True  # a parent package failed to import: import_module reports it


def _ensure_cwd_importable() -> None:
    # ``python -m`` puts the working directory on sys.path, a console script does not; a
    # module in the working directory should be found either way (installed ones come first).
    cwd = str(Path.cwd())
    if cwd not in sys.path and "" not in sys.path:
        sys.path.append(cwd)


def validate_target(target: str) -> None:
    """Raise :class:`CheckInputError` unless ``target`` names a ``.py`` file, an entry point
    or distribution of the ``nexus_sli.layers`` group, or an importable module."""
    _ensure_cwd_importable()
    if target.endswith(".py"):
        if not Path(target).is_file():
            raise CheckInputError(f"no Python file {target!r}")
        return
    if _entry_points_for(target) or _module_exists(target):
        return
    raise CheckInputError(
        f"no module, .py file or {PLUGIN_GROUP!r} entry point named {target!r} "
        f"(is the package installed, or the module on PYTHONPATH?)"
    )


def import_target(registry: ArchitectureRegistry, target: str) -> list[ImportOutcome]:
    """Import ``target``: a ``.py`` file, an entry point or distribution, or a module name.

    Entry points are those of the ``nexus_sli.layers`` group, matched by entry point name or
    by the name of the distribution that declares them. Raises :class:`CheckInputError` when
    ``target`` names none of these; an import that fails (a registration in the module was
    rejected, a missing dependency) is reported in the outcome instead.
    """
    validate_target(target)
    if target.endswith(".py"):
        try:
            _import_file(Path(target))
        except CheckInputError:
            raise
        except (Exception, SystemExit) as exc:
            return [ImportOutcome(f"file {target}", f"import failed: {describe_error(exc)}")]
        return [ImportOutcome(f"file {target}")]
    eps = _entry_points_for(target)
    if eps:
        outcomes = []
        for ep in eps:
            try:
                _load_entry_point(registry, ep)
            except (Exception, SystemExit) as exc:
                outcomes.append(ImportOutcome(_label(ep), f"load failed: {describe_error(exc)}"))
            else:
                outcomes.append(ImportOutcome(_label(ep)))
        return outcomes
    try:
        importlib.import_module(target)
    except (Exception, SystemExit) as exc:
        return [ImportOutcome(f"module {target}", f"import failed: {describe_error(exc)}")]
    return [ImportOutcome(f"module {target}")]


# ---------------------------------------------------------------------- layer contracts
def check_layer(registration: LayerRegistration, probes: Iterable[ProbeConfig]) -> LayerOutcome:
    """Signature, meta-device build and forward-shape contract against every probe config."""
    name, factory = registration.name, registration.factory
    probes = list(probes)
    names = tuple(p.name for p in probes)
    try:
        check_signature(name, factory)
    except Exception as exc:
        return LayerOutcome(registration, names, (("signature", describe_error(exc)),))
    failures: list[tuple[str, str]] = []
    for probe in probes:
        try:
            instantiate_on_meta(name, factory, probe.config)
        except Exception as exc:
            cause = exc.__cause__
            why = describe_error(exc)
            if cause is not None and type(cause).__name__ not in why:
                why += f" (caused by {describe_error(cause)})"
            failures.append((probe.name, why))
    return LayerOutcome(registration, names, tuple(failures))
