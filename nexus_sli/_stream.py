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
import re
import time
from collections.abc import Callable, Collection, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ._engine import TensorSource, check_tensors, fill_module, params_on_meta
from ._family import ArchitectureFamily, LayerContext
from ._store import ActivationStore
from .errors import CheckpointError, InputError, NexusSLIError, TensorMismatchError

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
        fill_module(stem, plan.stem_map, source, dtype=dtype, device=device, what="embeddings")
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
        del stem
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

        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nexus-sli-prefetch")

        def read(idx: int) -> dict[str, torch.Tensor]:
            return _read_tensors(source, plan.layer_maps[idx].values())

        pending: Future[dict[str, torch.Tensor]] | None = (
            pool.submit(read, start) if start < n_layers else None
        )
        try:
            for idx in range(start, n_layers):
                t0 = time.perf_counter()
                assert pending is not None
                tensors = pending.result()
                t1 = time.perf_counter()
                pending = pool.submit(read, idx + 1) if idx + 1 < n_layers else None
                layer = build_layer(idx)
                fill_module(
                    layer,
                    plan.layer_maps[idx],
                    source,
                    dtype=dtype,
                    device=device,
                    what=f"layer {idx}",
                    tensors=tensors,
                )
                del tensors
                layer, adapters = _wrap_custom(
                    layer,
                    overrides,
                    roles,
                    causal,
                    functools.partial(family.custom_output, config),
                    functools.partial(family.adds_residual, config),
                )
                layer.eval()
                target = hidden
                for i, ((s, e), ctx) in enumerate(zip(bounds, contexts, strict=True)):
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
                del layer, adapters, target
                _release_freed_memory()
                t2 = time.perf_counter()
                if store is not None:
                    store.save(idx, hidden)
                elif output_hidden_states and idx < n_layers - 1:
                    kept.append(hidden.clone())
                t3 = time.perf_counter()
                stats.read_wait += t1 - t0
                stats.compute += t2 - t1
                stats.write += t3 - t2
                stats.layers_run += 1
                stats.timeline.append((idx, t1 - t0, t2 - t1, t3 - t2))
                if progress is not None:
                    progress(1)
        finally:
            if pending is not None:
                pending.cancel()
            pool.shutdown(wait=True)

        final = _build(lambda: family.build_final(config, stack))
        fill_module(final, plan.final_map, source, dtype=dtype, device=device, what="final norm")
        final.eval()
        last_hidden = torch.cat(
            [
                family.finish(config, final, hidden[s:e], ctx, stack)
                for (s, e), ctx in zip(bounds, contexts, strict=True)
            ]
        )
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
