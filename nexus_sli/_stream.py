"""The layer-major streaming loop.

For one stack of layers: plan every module on meta and check every checkpoint tensor against
the plan (before any work), embed every micro-batch, then for each layer read only its tensors
(the next layer's are read in the background meanwhile), assign them into a meta skeleton, run
every micro-batch, store the output, free the layer. Then the final norm and, if asked, logits.
"""

from __future__ import annotations

import ctypes
import functools
import gc
import inspect
import itertools
import re
import threading
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from ._engine import (
    TensorSource,
    buffers_to,
    check_loaded,
    check_tensors,
    fill_module,
    params_on_meta,
    prepare_tensor,
)
from ._family import ArchitectureFamily, LayerContext
from ._store import ActivationStore
from .errors import (
    CheckpointError,
    InputError,
    NexusSLIError,
    StreamingError,
    TensorMismatchError,
)

__all__ = ["CustomLayerAdapter", "RunStats", "StreamOutput", "run_layer_major"]


@dataclass
class RunStats:
    """Where a run spent its time (seconds) and what it read."""

    read_wait: float = 0.0
    compute: float = 0.0
    write: float = 0.0
    layers_run: int = 0
    layers_resumed: int = 0
    timeline: list[tuple[int, float, float, float]] = field(default_factory=list)
    #: Most bytes of layer weights (as stored in the checkpoint) held at once: read ahead
    #: and not yet freed. About one layer for families with ``layer_stages``, two otherwise.
    peak_weight_bytes: int = 0


@dataclass
class StreamOutput:
    """The outputs of one layer-major pass (batch in input order)."""

    last_hidden_state: torch.Tensor
    hidden_states: tuple[torch.Tensor, ...] | None
    logits: torch.Tensor | None
    stats: RunStats


class CustomLayerAdapter(nn.Module):
    """Calls a registered custom layer with nexus_sli's documented convention.

    ``forward(hidden_states, attention_mask=None, position_embeddings=None)``: the mask is
    additive float, broadcastable to ``[batch, heads, query, key]``, 0 where attention is allowed
    and the dtype's most negative finite value where not (causal and padding applied);
    ``position_embeddings`` is the family's rotary ``(cos, sin)`` when it has one. Only the
    arguments the custom forward accepts are passed; a tuple result gives its first element.
    """

    def __init__(
        self,
        inner: nn.Module,
        role: str,
        causal: bool,
        wrap: Callable[[str, torch.Tensor], Any] | None = None,
        adds_residual: bool = False,
    ) -> None:
        super().__init__()
        self.inner = inner
        self.role = role
        self.causal = causal
        self.wrap = wrap
        self.adds_residual = adds_residual
        self.context: LayerContext = {}
        params = inspect.signature(inner.forward).parameters
        var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        self._accepts = {
            name for name in ("attention_mask", "position_embeddings") if var_kw or name in params
        }

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        call: dict[str, Any] = {}
        if "attention_mask" in self._accepts:
            call["attention_mask"] = additive_mask(
                self.context["_padding_mask"], hidden_states.dtype, causal=self.causal
            )
        if "position_embeddings" in self._accepts and "position_embeddings" in self.context:
            call["position_embeddings"] = self.context["position_embeddings"]
        out = self.inner(hidden_states, **call)
        if isinstance(out, tuple | list):
            out = out[0]
        if self.adds_residual:
            residual = kwargs["residual"] if "residual" in kwargs else args[0]
            out = out + residual
        return out if self.wrap is None else self.wrap(self.role, out)


def additive_mask(padding_mask: torch.Tensor, dtype: torch.dtype, *, causal: bool) -> torch.Tensor:
    """``[batch, 1, seq, seq]`` additive mask from a ``[batch, seq]`` 0/1 padding mask."""
    batch, seq = padding_mask.shape
    allowed = padding_mask.bool()[:, None, None, :].expand(batch, 1, seq, seq)
    if causal:
        tri = torch.ones(seq, seq, dtype=torch.bool, device=padding_mask.device).tril()
        allowed = allowed & tri
    # Rows with nothing allowed (a padded query under left padding) attend to themselves only,
    # so that no row is all -inf (NaN after softmax); their outputs are padding anyway.
    eye = torch.eye(seq, dtype=torch.bool, device=padding_mask.device)
    allowed = allowed | (~allowed.any(-1, keepdim=True) & eye)
    mask = torch.zeros(batch, 1, seq, seq, dtype=dtype, device=padding_mask.device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)


def _submodule_parent(layer: nn.Module, path: str) -> tuple[nn.Module, str]:
    parts = path.split(".")
    parent = layer.get_submodule(".".join(parts[:-1])) if len(parts) > 1 else layer
    return parent, parts[-1]


def _build(build: Callable[[], nn.Module]) -> nn.Module:
    with params_on_meta():
        return build()


@dataclass
class _Plan:
    model_prefix: str
    stem: Callable[[], nn.Module]
    stem_map: dict[str, str]
    layer_maps: list[dict[str, str]]
    final_map: dict[str, str]
    head_map: dict[str, str]


def plan_run(
    family: ArchitectureFamily,
    config: Any,
    source: TensorSource,
    stack: str,
    build_layer: Callable[[int], nn.Module],
) -> _Plan:
    """Build every module on meta, map it to checkpoint names and check all of them, up front.

    A config that transformers accepts but whose modules cannot be built (an unknown
    activation, an impossible size) is a :class:`CheckpointError` here, before any work.
    """
    try:
        return _plan_run(family, config, source, stack, build_layer)
    except NexusSLIError:
        raise
    except Exception as exc:
        raise CheckpointError(
            f"cannot build the {family.family_id!r} modules from this config.json: "
            f"{type(exc).__name__}: {exc}"
        ) from exc


def _plan_run(
    family: ArchitectureFamily,
    config: Any,
    source: TensorSource,
    stack: str,
    build_layer: Callable[[int], nn.Module],
) -> _Plan:
    names = source.names()
    model_prefix = family.resolve_model_prefix(config, names)
    stem = _build(lambda: family.build_stem(config, stack))
    stem_map = family.stem_tensor_names(
        config,
        list(stem.state_dict(keep_vars=True)),
        model_prefix=model_prefix,
        available=names,
        layer_type=stack,
    )
    check_tensors(stem, stem_map, source, "embeddings")
    layer_maps: list[dict[str, str]] = []
    for idx in range(family.num_layers(config, stack)):
        layer = build_layer(idx)
        prefix = family.get_layer_prefix(idx, stack, model_prefix=model_prefix)
        mapping = {key: prefix + key for key in layer.state_dict(keep_vars=True)}
        check_tensors(layer, mapping, source, f"layer {idx}")
        layer_maps.append(mapping)
        del layer
    final = _build(lambda: family.build_final(config, stack))
    final_map = {key: model_prefix + key for key in final.state_dict(keep_vars=True)}
    check_tensors(final, final_map, source, "final norm")
    head = _build(lambda: family.build_lm_head(config) or nn.Identity())
    head_map: dict[str, str] = {}
    if not isinstance(head, nn.Identity):
        head_module = head
        candidate = family.lm_head_tensor_map(
            config,
            list(head_module.state_dict(keep_vars=True)),
            model_prefix=model_prefix,
            available=names,
        )
        if all(name in names for name in candidate.values()):
            check_tensors(head_module, candidate, source, "lm head")
            head_map = candidate
    used: set[str] = {*stem_map.values(), *final_map.values(), *head_map.values()}
    for mapping in layer_maps:
        used.update(mapping.values())
    allowed = [
        re.compile(p) for p in (*family.ignored_tensor_patterns, *family.unused_tensor_patterns)
    ]
    unexpected = sorted(n for n in names if n not in used and not any(p.search(n) for p in allowed))
    if unexpected:
        shown = ", ".join(f"{n!r} ({source.where(n)})" for n in unexpected[:5])
        more = f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else ""
        raise TensorMismatchError(
            f"unexpected tensors in the checkpoint for family {family.family_id!r}: {shown}{more}. "
            f"They belong to no layer, embedding, norm or head of this architecture; is the "
            f"config right for these weights?"
        )
    return _Plan(
        model_prefix,
        lambda: _build(lambda: family.build_stem(config, stack)),
        stem_map,
        layer_maps,
        final_map,
        head_map,
    )


def run_layer_major(
    family: ArchitectureFamily,
    config: Any,
    source: TensorSource,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    batch_size: int,
    output_hidden_states: bool,
    output_logits: bool,
    dtype: torch.dtype | None,
    device: torch.device,
    overrides: Mapping[str, Any] | None = None,
    store: ActivationStore | None = None,
    progress: Callable[[int], None] | None = None,
    on_plan: Callable[[int], None] | None = None,
    stack: str | None = None,
) -> StreamOutput:
    """Run one stack of a checkpoint layer-major over every micro-batch (see module doc)."""
    stack = stack or family.layer_types(config)[0]
    roles = family.layer_roles(config, stack)
    causal = family.attention_is_causal(config, stack)
    overrides = dict(overrides or {})

    def build_layer(idx: int) -> nn.Module:
        layer = _build(functools.partial(family.create_layer, config, idx, stack))
        for role, factory in overrides.items():
            path = roles[role]
            custom = _build(functools.partial(factory, config, idx))
            if path == "":
                layer = custom
            else:
                parent, attr = _submodule_parent(layer, path)
                setattr(parent, attr, custom)
        return layer

    plan = plan_run(family, config, source, stack, build_layer)
    n_layers = len(plan.layer_maps)
    if on_plan is not None:
        on_plan(n_layers)
    stats = RunStats()
    n = input_ids.shape[0]
    bounds = [(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]

    with torch.no_grad():
        stem = plan.stem()
        gathered = _gathered_embeddings(stem, plan.stem_map)
        fill_module(
            stem,
            plan.stem_map,
            source,
            dtype=dtype,
            device=device,
            what="embeddings",
            lazy=gathered,
        )
        hooks = [
            handle
            for key, module in gathered.items()
            for handle in _gather_rows(module, plan.stem_map[key], source, dtype, device)
        ]
        stem.eval()
        embedded: list[torch.Tensor] = []
        contexts: list[LayerContext] = []
        for s, e in bounds:
            chunk, ctx = family.embed(
                config, stem, input_ids[s:e].to(device), attention_mask[s:e].to(device), stack
            )
            ctx["_padding_mask"] = attention_mask[s:e].to(device)
            embedded.append(chunk)
            contexts.append(ctx)
        for handle in hooks:
            handle.remove()
        del stem, hooks
        gc.collect()
        # One activation buffer for the whole batch, updated in place micro-batch by
        # micro-batch: a micro-batch's input is dead once its output exists.
        hidden = torch.cat(embedded)
        del embedded
        start = 0
        if store is not None:
            last = store.last_complete(n_layers, tuple(hidden.shape))
            if last >= -1:
                start = last + 1
                stats.layers_resumed = start
                if last >= 0:
                    hidden = store.load(last).to(device)
            else:
                store.save(-1, hidden)
        kept: list[torch.Tensor] = []
        if output_hidden_states and store is None:
            kept.append(hidden.clone())
        if progress is not None and start:
            progress(start)

        staged = "" not in (roles[r] for r in overrides)
        stages = family.layer_stages(config, stack) if staged else ()
        units = [
            _layer_units(idx, plan.layer_maps[idx], stages, source)
            for idx in range(start, n_layers)
        ]
        prefetch = _Prefetcher(source, [u for layer_units in units for u in layer_units])
        try:
            first_unit = 0
            for idx in range(start, n_layers):
                t0 = time.perf_counter()
                layer_units = units[idx - start]
                layer = build_layer(idx)
                buffers_to(layer, device)
                fill = _StagedFill(
                    layer, layer_units, first_unit, stages, prefetch, dtype, device, idx
                )
                first_unit += len(layer_units)
                wait_before = prefetch.waited
                fill.fill_upto(0)
                layer, adapters = _wrap_custom(
                    layer,
                    overrides,
                    roles,
                    causal,
                    functools.partial(family.custom_output, config),
                    functools.partial(family.adds_residual, config),
                )
                layer.eval()
                fill.hook(layer, adapters, roles)
                target = hidden
                for i, ((s, e), ctx) in enumerate(zip(bounds, contexts, strict=True)):
                    fill.first_call, fill.last_call = i == 0, i == len(bounds) - 1
                    for adapter in adapters:
                        adapter.context = ctx
                    if isinstance(layer, CustomLayerAdapter):
                        out = layer(hidden[s:e])
                    else:
                        out = family.call_layer(config, layer, hidden[s:e], ctx, idx, stack)
                    if i == 0 and (out.dtype != hidden.dtype or out.shape[1:] != hidden.shape[1:]):
                        target = torch.empty(
                            (n, *out.shape[1:]), dtype=out.dtype, device=out.device
                        )
                    target[s:e] = out
                    del out
                hidden = target
                for adapter in adapters:
                    adapter.context = {}
                fill.finish()
                del layer, adapters, target, fill
                _release_freed_memory()
                t2 = time.perf_counter()
                if store is not None:
                    store.save(idx, hidden)
                elif output_hidden_states and idx < n_layers - 1:
                    kept.append(hidden.clone())
                t3 = time.perf_counter()
                waited = prefetch.waited - wait_before
                stats.read_wait += waited
                stats.compute += t2 - t0 - waited
                stats.write += t3 - t2
                stats.layers_run += 1
                stats.timeline.append((idx, waited, t2 - t0 - waited, t3 - t2))
                if progress is not None:
                    progress(1)
        finally:
            prefetch.close()
            stats.peak_weight_bytes = prefetch.peak_held

        final = _build(lambda: family.build_final(config, stack))
        fill_module(final, plan.final_map, source, dtype=dtype, device=device, what="final norm")
        final.eval()
        # In place when the final modules keep shape and dtype (the layers' outputs are dead
        # once finished), so the end of a run holds one activation buffer, not three.
        last_hidden = hidden
        for i, ((s, e), ctx) in enumerate(zip(bounds, contexts, strict=True)):
            out = family.finish(config, final, hidden[s:e], ctx, stack)
            if i == 0 and (out.dtype != hidden.dtype or out.shape[1:] != hidden.shape[1:]):
                last_hidden = torch.empty((n, *out.shape[1:]), dtype=out.dtype, device=out.device)
            last_hidden[s:e] = out
            del out
        del final, hidden
        hidden_states: tuple[torch.Tensor, ...] | None = None
        if output_hidden_states:
            if store is not None:
                kept = [store.load(i).to(device) for i in range(-1, n_layers - 1)]
            hidden_states = (*kept, last_hidden)
        logits = None
        if output_logits:
            logits = _logits(family, config, source, plan, last_hidden, dtype, device)
    return StreamOutput(last_hidden, hidden_states, logits, stats)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        libc = ctypes.CDLL("libc.so.6")
        trim: Callable[[int], int] = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    return trim


def _release_freed_memory() -> None:
    """Give the freed layer's heap pages back to the OS (glibc keeps them otherwise)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _read_tensors(source: TensorSource, names: Collection[str]) -> dict[str, torch.Tensor]:
    many = getattr(source, "get_many", None)
    if many is not None:
        result: dict[str, torch.Tensor] = many(names)
        return result
    return {name: source.get(name) for name in names}


def _wrap_custom(
    layer: nn.Module,
    overrides: Mapping[str, Any],
    roles: Mapping[str, str],
    causal: bool,
    wrap: Callable[[str, torch.Tensor], Any],
    adds_residual: Callable[[str], bool],
) -> tuple[nn.Module, list[CustomLayerAdapter]]:
    """Put each custom module (already filled with its weights) behind an adapter."""
    adapters: list[CustomLayerAdapter] = []
    for role in overrides:
        path = roles[role]
        if path == "":
            whole = CustomLayerAdapter(layer, role, causal)
            return whole, [whole]
        parent, attr = _submodule_parent(layer, path)
        adapter = CustomLayerAdapter(getattr(parent, attr), role, causal, wrap, adds_residual(role))
        setattr(parent, attr, adapter)
        adapters.append(adapter)
    return layer, adapters


def _logits(
    family: ArchitectureFamily,
    config: Any,
    source: TensorSource,
    plan: _Plan,
    last_hidden: torch.Tensor,
    dtype: torch.dtype | None,
    device: torch.device,
) -> torch.Tensor:
    head = _build(lambda: family.build_lm_head(config) or nn.Identity())
    if not plan.head_map and head.state_dict():
        raise InputError(
            "output_logits=True, but this checkpoint has no LM head tensors (it was saved from "
            "the base model); run with output_logits=False"
        )
    fill_module(head, plan.head_map, source, dtype=dtype, device=device, what="lm head")
    head.eval()
    return family.compute_logits(config, head, last_hidden)


# ---------------------------------------------------------------------- embeddings by rows
def _gathered_embeddings(stem: nn.Module, stem_map: Mapping[str, str]) -> dict[str, nn.Embedding]:
    """Plain ``nn.Embedding`` modules of the stem: their tables are read row by row.

    Only modules whose forward is ``nn.Embedding.forward`` itself (the table is only indexed
    by the call's argument) and that do not renormalise rows (``max_norm``).
    """
    found: dict[str, nn.Embedding] = {}
    for path, module in stem.named_modules():
        if (
            isinstance(module, nn.Embedding)
            and type(module).forward is nn.Embedding.forward
            and module.max_norm is None
        ):
            key = f"{path}.weight" if path else "weight"
            if key in stem_map:
                found[key] = module
    return found


def _read_rows(source: TensorSource, name: str, rows: list[int]) -> torch.Tensor:
    get_rows = getattr(source, "get_rows", None)
    if get_rows is not None:
        result: torch.Tensor = get_rows(name, rows)
        return result
    table = source.get(name)
    if rows and (rows[0] < 0 or rows[-1] >= table.shape[0]):
        raise InputError(
            f"index {rows[0] if rows[0] < 0 else rows[-1]} is out of range for tensor "
            f"{name!r} with {table.shape[0]} rows"
        )
    return table[torch.tensor(rows, dtype=torch.long)]


def _gather_rows(
    module: nn.Embedding,
    name: str,
    source: TensorSource,
    dtype: torch.dtype | None,
    device: torch.device,
) -> list[RemovableHandle]:
    """Make ``module`` read only the rows its call indexes (its weight stays on meta otherwise).

    Before each call the distinct indices are read from the checkpoint into a compact table
    and the indices remapped into it; after the call the table is dropped. The output is the
    same as with the whole table (``padding_idx`` only matters for gradients).
    """
    meta_weight = module.weight
    padding_idx = module.padding_idx

    def before(mod: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        ids = args[0]
        distinct, inverse = torch.unique(ids, sorted=True, return_inverse=True)
        rows = _read_rows(source, name, [int(x) for x in distinct.tolist()])
        table = prepare_tensor(rows, dtype=dtype, device=device)
        module.weight = nn.Parameter(table, requires_grad=False)
        module.padding_idx = None
        return (inverse.reshape(ids.shape), *args[1:])

    def after(mod: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        module.weight = meta_weight
        module.padding_idx = padding_idx

    return [module.register_forward_pre_hook(before), module.register_forward_hook(after)]


# ---------------------------------------------------------------------- layers by stages
@dataclass(frozen=True)
class _Unit:
    """Tensors of one layer read together: a stage of it, or all of it."""

    layer: int
    stage: int
    keys: tuple[str, ...]
    names: tuple[str, ...]
    nbytes: int


def _layer_units(
    idx: int,
    mapping: Mapping[str, str],
    stages: tuple[tuple[str, ...], ...],
    source: TensorSource,
) -> list[_Unit]:
    """Split a layer's tensors by stage (see ``ArchitectureFamily.layer_stages``)."""
    stage_of = {child: k for k, children in enumerate(stages) for child in children}
    groups: dict[int, list[str]] = {}
    for key in mapping:
        head, dot, _ = key.partition(".")
        groups.setdefault(stage_of.get(head, 0) if dot else 0, []).append(key)
    units = []
    for stage in sorted(groups):
        keys = tuple(groups[stage])
        names = tuple(mapping[k] for k in keys)
        nbytes = sum(
            source.dtype(n).itemsize * int(torch.Size(source.shape(n)).numel()) for n in names
        )
        units.append(_Unit(idx, stage, keys, names, nbytes))
    return units


def _budget(units: list[_Unit]) -> int:
    """Bytes of units that may be held at once: a whole layer, or the end of one layer and the
    start of the next, whichever is more (so a layer never waits on itself)."""
    per_layer: dict[int, int] = {}
    for unit in units:
        per_layer[unit.layer] = per_layer.get(unit.layer, 0) + unit.nbytes
    pairs = [a.nbytes + b.nbytes for a, b in itertools.pairwise(units)]
    return max([*per_layer.values(), *pairs, 1])


class _Prefetcher:
    """Reads units in order on one background thread, within a byte budget.

    A unit is read once the units held (read and not yet released) leave room for it in the
    budget, so reading runs ahead of compute by about one layer's worth of stages and no more.
    """

    def __init__(self, source: TensorSource, units: list[_Unit]) -> None:
        self._source = source
        self._units = units
        self._budget = _budget(units)
        self._cond = threading.Condition()
        self._held = 0
        self._results: dict[int, dict[str, torch.Tensor] | BaseException] = {}
        self._closed = False
        self.waited = 0.0
        self.peak_held = 0
        self._thread = threading.Thread(target=self._work, name="nexus-sli-prefetch", daemon=True)
        self._thread.start()

    def _work(self) -> None:
        hint = getattr(self._source, "will_need", None)
        for j, unit in enumerate(self._units):
            if hint is not None:  # the disk starts on it while the budget is not yet free
                hint(unit.names)
            with self._cond:
                while not self._closed and self._held and self._held + unit.nbytes > self._budget:
                    self._cond.wait()
                if self._closed:
                    return
                self._held += unit.nbytes
                self.peak_held = max(self.peak_held, self._held)
            result: dict[str, torch.Tensor] | BaseException
            try:
                result = _read_tensors(self._source, unit.names)
            except BaseException as exc:  # handed to the compute thread
                result = exc
            with self._cond:
                self._results[j] = result
                self._cond.notify_all()
            if isinstance(result, BaseException):
                return

    def take(self, j: int) -> dict[str, torch.Tensor]:
        """Unit ``j``'s tensors, waiting for the read if needed."""
        start = time.perf_counter()
        with self._cond:
            while j not in self._results:
                self._cond.wait()
            result = self._results.pop(j)
        self.waited += time.perf_counter() - start
        if isinstance(result, BaseException):
            raise result
        return result

    def release(self, j: int) -> None:
        """Unit ``j`` is no longer held: its budget goes to the next reads."""
        with self._cond:
            self._held -= self._units[j].nbytes
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._results.clear()
            self._cond.notify_all()
        self._thread.join()


class _StagedFill:
    """Fills one layer stage by stage as its forward reaches each stage, and frees stages
    once the last micro-batch is past them.

    Filling goes through the layer's own ``load_state_dict`` (so layers whose state dict is
    translated by hooks, such as fused MoE experts, load as they do whole); custom modules are
    unwrapped from their adapters for the moment of loading. Freeing puts the stage's
    children's parameters back on meta.
    """

    def __init__(
        self,
        layer: nn.Module,
        units: list[_Unit],
        first: int,
        stages: tuple[tuple[str, ...], ...],
        prefetch: _Prefetcher,
        dtype: torch.dtype | None,
        device: torch.device,
        idx: int,
    ) -> None:
        self._layer = layer
        self._children = dict(layer.named_children())
        self._units = units
        self._first = first
        self._stages = stages
        self._prefetch = prefetch
        self._dtype = dtype
        self._device = device
        self._idx = idx
        self._filled = [False] * len(units)
        self._released = [False] * len(units)
        self._handles: list[RemovableHandle] = []
        self._wrapped: list[tuple[nn.Module, str, CustomLayerAdapter]] = []
        self.first_call = self.last_call = False

    def hook(
        self, layer: nn.Module, adapters: list[CustomLayerAdapter], roles: Mapping[str, str]
    ) -> None:
        """Fill stage ``k`` (and any before it) when the forward first calls one of its children."""
        if layer is not self._layer:  # the whole layer is a custom module: nothing is staged
            return
        for adapter in adapters:
            parent, attr = _submodule_parent(layer, roles[adapter.role])
            self._wrapped.append((parent, attr, adapter))
        for pos, unit in enumerate(self._units):
            if pos == 0:
                continue
            for child in self._stages[unit.stage]:
                module = getattr(layer, child, None)
                if isinstance(module, nn.Module):
                    self._handles.append(
                        module.register_forward_pre_hook(functools.partial(self._enter, pos))
                    )

    def _enter(self, pos: int, module: nn.Module, args: tuple[Any, ...]) -> None:
        self.fill_upto(pos)
        if self.last_call:
            for earlier in range(pos):
                self._release(earlier)
        if self.first_call:
            # The previous stage's freed activations go back to the OS before this stage
            # allocates its own; later calls of the layer reuse what this call's stage takes.
            _release_freed_memory()

    def fill_upto(self, pos: int) -> None:
        for k in range(pos + 1):
            if self._filled[k]:
                continue
            unit = self._units[k]
            tensors = self._prefetch.take(self._first + k)
            partial = {
                key: prepare_tensor(tensors.pop(name), dtype=self._dtype, device=self._device)
                for key, name in zip(unit.keys, unit.names, strict=True)
            }
            for parent, attr, adapter in self._wrapped:
                setattr(parent, attr, adapter.inner)
            try:
                # strict=False because the other stages' keys are not loaded yet; once every
                # stage is in, check_loaded below proves that nothing was left out.
                _, unexpected = self._layer.load_state_dict(partial, strict=False, assign=True)
            finally:
                for parent, attr, adapter in self._wrapped:
                    setattr(parent, attr, adapter)
            if unexpected:
                raise CheckpointError(f"layer {self._idx}: no place for tensors {unexpected}")
            self._filled[k] = True
            self._check_filled()

    def _check_filled(self) -> None:
        """Nothing of the stages filled so far (and not yet freed) is left on meta."""
        absent = {
            child
            for unit, filled, released in zip(
                self._units, self._filled, self._released, strict=True
            )
            if not filled or released
            for child in (self._stages[unit.stage] if self._stages else ())
        }
        skip = {id(p) for name, p in self._layer.named_parameters() if name.split(".")[0] in absent}
        check_loaded(self._layer, f"layer {self._idx}", skip=skip)

    def _release(self, pos: int) -> None:
        if self._released[pos] or not self._filled[pos]:
            return
        if self._stages:
            for child in self._stages[self._units[pos].stage]:
                module = self._children.get(child)
                for sub in module.modules() if module is not None else ():
                    for pname, param in list(sub._parameters.items()):
                        if param is not None and not param.is_meta:
                            sub._parameters[pname] = nn.Parameter(
                                torch.empty_like(param, device="meta"),
                                requires_grad=param.requires_grad,
                            )
        self._released[pos] = True
        self._prefetch.release(self._first + pos)

    def finish(self) -> None:
        """After the last micro-batch: every stage must have run; free them all."""
        for handle in self._handles:
            handle.remove()
        unused = [u for u, filled in zip(self._units, self._filled, strict=True) if not filled]
        for pos in range(len(self._units)):
            self._release(pos)
        if unused:
            children = ", ".join(self._stages[unused[0].stage]) if self._stages else "the layer"
            raise StreamingError(
                f"layer {self._idx}: its forward never called {children}, whose weights "
                f"{list(unused[0].names)[:3]} were read for it; the family's layer_stages() "
                f"does not match this layer"
            )
