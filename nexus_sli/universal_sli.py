"""Sequential Layer Ingestion (seed module path ``universal_sli``).

:class:`UniversalSLIProcessor` streams a local checkpoint one layer at a time from its
safetensors files and returns exactly what transformers' in-memory forward returns, holding
about two layers' weights plus the activations in memory.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from beartype import beartype

from ._beartype import CONF
from ._checkpoint import SafetensorsCheckpoint, load_config, read_config_dict
from ._family import ArchitectureFamily
from ._registry import ArchitectureRegistry, get_registry
from ._store import FORMAT, ActivationStore
from ._stream import RunStats, run_layer_major
from ._validation import describe_callable
from .errors import CheckpointError, InputError

__all__ = ["DEFAULT_MAX_TOKENS_PER_CALL", "SLIResult", "UniversalSLIProcessor"]

#: Default cap on the tokens one layer call sees (``run(max_tokens_per_call=...)``): 4
#: sequences of 256 tokens. Larger calls gain little speed on CPU and cost activation memory.
DEFAULT_MAX_TOKENS_PER_CALL = 1024


@dataclass(frozen=True)
class SLIResult:
    """Outputs of :meth:`UniversalSLIProcessor.run`.

    ``hidden_states`` is shaped like transformers' ``output_hidden_states``: the embeddings,
    then the output of every layer, the last one after the final norm (so
    ``hidden_states[-1] is last_hidden_state``).
    """

    last_hidden_state: torch.Tensor
    hidden_states: tuple[torch.Tensor, ...] | None
    logits: torch.Tensor | None
    attention_mask: torch.Tensor
    stats: RunStats


def _digest(*tensors: torch.Tensor) -> str:
    h = hashlib.sha256()
    for tensor in tensors:
        t = tensor.detach().to("cpu")
        h.update(f"{t.dtype}:{tuple(t.shape)}".encode())
        # A fresh 1-D copy: a "contiguous" tensor with size-1 dims may keep odd strides.
        flat = torch.empty(t.numel(), dtype=t.dtype).copy_(t.reshape(-1))
        h.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
    return h.hexdigest()


def _check_device(device: str | torch.device) -> torch.device:
    try:
        resolved = torch.device(device)
    except (RuntimeError, ValueError) as exc:
        raise InputError(f"device {device!r} is not a torch device: {exc}") from exc
    try:
        torch.empty(1, device=resolved)
    except (RuntimeError, AssertionError, NotImplementedError) as exc:
        raise InputError(f"device {str(resolved)!r} is not available here: {exc}") from exc
    if resolved.type == "meta":
        raise InputError("device 'meta' holds no values; stream on 'cpu' or an accelerator")
    return resolved


class UniversalSLIProcessor:
    """Stream a checkpoint directory layer by layer.

    Args:
        model_name: path of a local checkpoint directory (``config.json`` + ``*.safetensors``,
            plus ``model.safetensors.index.json`` when sharded). Nothing is downloaded.
        custom_layer_overrides: ``{role: registered layer name}``, e.g. ``{"attention":
            "custom_attn"}``: the family's submodule for that role is replaced in every layer
            by ``registry.get_layer_factory(name)(config, layer_idx)``, loaded from the
            checkpoint tensors under that role's prefix. Roles: see
            ``family.layer_roles(config)`` (at least ``layer``, ``attention``, ``mlp``).
        device: where layers run (``"cpu"``).
        dtype: compute dtype; ``None`` keeps the checkpoint's own.
        activation_dir: where per-layer activations are written, for resuming (``None``: kept in
            memory only, nothing written).
        registry: the registry to resolve families and custom layers (the shared one).
        trust_remote_code: must be ``True`` for a config that asks for remote code (``auto_map``);
            even then no code from the checkpoint is imported, for the model or the tokenizer
            (the architecture must be one a registered family handles).
        progress: a progress bar per layer on stderr; ``None`` shows it on a terminal only.
    """

    @beartype(conf=CONF)
    def __init__(
        self,
        model_name: str | Path,
        *,
        custom_layer_overrides: Mapping[str, str] | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        activation_dir: str | Path | None = None,
        registry: ArchitectureRegistry | None = None,
        trust_remote_code: bool = False,
        progress: bool | None = None,
    ) -> None:
        self.model_dir = Path(model_name).expanduser()
        self.registry = registry if registry is not None else get_registry()
        self.trust_remote_code = trust_remote_code
        raw = read_config_dict(self.model_dir)
        if raw.get("auto_map") and not trust_remote_code:
            load_config(self.model_dir, trust_remote_code=False)  # raises RemoteCodeError
        self.family: ArchitectureFamily = self.registry.detect_family(
            raw, trust_remote_code=trust_remote_code
        )
        # The attention implementation stays as the config says (None): each family picks what
        # transformers' from_pretrained would, so results match the in-memory model.
        self.config = load_config(self.model_dir, trust_remote_code=trust_remote_code)
        self.checkpoint = SafetensorsCheckpoint(self.model_dir)
        self.device = _check_device(device)
        if dtype is not None and not dtype.is_floating_point:
            raise InputError(
                f"dtype must be a floating point dtype (torch.float32, torch.bfloat16, ...), "
                f"got {dtype}"
            )
        self.dtype = dtype if dtype is not None else self.checkpoint.dominant_dtype()
        self.activation_dir = Path(activation_dir) if activation_dir is not None else None
        self.progress = progress
        self.custom_layer_overrides = dict(custom_layer_overrides or {})
        stack = self.family.layer_types(self.config)[0]
        roles = self.family.layer_roles(self.config, stack)
        self._factories: dict[str, Any] = {}
        for role, name in self.custom_layer_overrides.items():
            if role not in roles:
                raise InputError(
                    f"unknown role {role!r} in custom_layer_overrides for family "
                    f"{self.family.family_id!r}; roles: {', '.join(sorted(roles))}"
                )
            self._factories[role] = self.registry.get_layer_factory(name)  # KeyError if unknown
        if "layer" in self._factories and len(self._factories) > 1:
            raise InputError(
                "custom_layer_overrides replaces the whole 'layer' and other roles at once; "
                "a whole-layer override already replaces its attention and mlp"
            )

    def _has_lm_head(self) -> bool:
        from ._engine import params_on_meta

        with params_on_meta():
            return self.family.build_lm_head(self.config) is not None

    def __repr__(self) -> str:
        return (
            f"UniversalSLIProcessor({str(self.model_dir)!r}, family={self.family.family_id!r}, "
            f"dtype={self.dtype}, overrides={self.custom_layer_overrides})"
        )

    # ------------------------------------------------------------------ inputs
    def _check_inputs(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, batch_size: int
    ) -> torch.Tensor:
        for label, tensor in (("input_ids", input_ids), ("attention_mask", attention_mask)):
            if tensor is None:
                continue
            if tensor.layout is not torch.strided or tensor.is_nested:
                raise InputError(f"{label} must be a dense tensor, got layout {tensor.layout}")
            if tensor.device.type == "meta":
                raise InputError(f"{label} is on the meta device: it holds no values")
        if input_ids.dim() != 2:
            raise InputError(
                f"input_ids must be 2-D [batch, seq], got shape {list(input_ids.shape)}"
            )
        if input_ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
            raise InputError(f"input_ids must hold integers, got dtype {input_ids.dtype}")
        if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
            raise InputError(f"input_ids is empty: shape {list(input_ids.shape)}")
        vocab = int(getattr(self.config, "vocab_size", 0) or 0)
        low, high = int(input_ids.min()), int(input_ids.max())
        if low < 0 or (vocab and high >= vocab):
            raise InputError(
                f"input_ids must lie in [0, {vocab}) (the vocabulary of this checkpoint), got "
                f"values from {low} to {high}"
            )
        limit = self.family.max_sequence_length(self.config)
        if limit is not None and input_ids.shape[1] > limit:
            raise InputError(
                f"sequences of {input_ids.shape[1]} tokens are longer than this checkpoint's "
                f"learned position table ({limit} positions)"
            )
        if batch_size < 1:
            raise InputError(f"batch_size must be at least 1, got {batch_size}")
        if attention_mask is None:
            return torch.ones_like(input_ids, dtype=torch.long)
        if tuple(attention_mask.shape) != tuple(input_ids.shape):
            raise InputError(
                f"attention_mask has shape {list(attention_mask.shape)}, input_ids has "
                f"{list(input_ids.shape)}; they must match"
            )
        if attention_mask.dtype.is_floating_point or attention_mask.dtype.is_complex:
            raise InputError(f"attention_mask must hold 0/1 integers, got {attention_mask.dtype}")
        if not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
            raise InputError("attention_mask must hold only 0 and 1")
        if not bool((attention_mask.sum(-1) > 0).all()):
            raise InputError("every row of attention_mask needs at least one 1 (a real token)")
        return attention_mask.to(torch.long)

    def _manifest(self, input_ids: torch.Tensor, mask: torch.Tensor) -> dict[str, Any]:
        overrides = {
            role: f"{self.custom_layer_overrides[role]}={describe_callable(f)}"
            for role, f in self._factories.items()
        }
        run = json.dumps({"dtype": str(self.dtype), "overrides": overrides}, sort_keys=True)
        return {
            "format": FORMAT,
            "checkpoint": self.checkpoint.fingerprint(),
            "checkpoint_dir": str(self.model_dir.resolve()),
            "inputs": _digest(input_ids, mask),
            "run": hashlib.sha256(run.encode()).hexdigest(),
            "family": self.family.family_id,
            "shape": list(input_ids.shape),
        }

    # ------------------------------------------------------------------ running
    @beartype(conf=CONF)
    def run(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        batch_size: int = 8,
        output_hidden_states: bool = False,
        output_logits: bool = False,
        resume: bool = False,
        max_tokens_per_call: int | None = DEFAULT_MAX_TOKENS_PER_CALL,
    ) -> SLIResult:
        """Stream every layer over ``input_ids`` in micro-batches of ``batch_size``.

        Each layer is read once and run over every micro-batch. A micro-batch is further split
        so that one layer call sees at most ``max_tokens_per_call`` tokens (whole sequences, at
        least one): this bounds the memory of a layer's intermediate activations (the MLP's are
        several times the hidden states) at no cost in reads. ``None`` calls each layer on
        whole micro-batches. Results equal transformers' in-memory forward and depend on
        neither setting.
        With ``resume=True`` a run continues after the last layer stored complete in
        ``activation_dir`` (and refuses a directory made for another checkpoint or inputs).
        """
        mask = self._check_inputs(input_ids, attention_mask, batch_size)
        if max_tokens_per_call is not None and max_tokens_per_call < 1:
            raise InputError(
                f"max_tokens_per_call must be at least 1 (or None), got {max_tokens_per_call}"
            )
        if max_tokens_per_call is not None:
            batch_size = min(batch_size, max(1, max_tokens_per_call // input_ids.shape[1]))
        input_ids = input_ids.to(torch.long)
        if output_logits and not self._has_lm_head():
            raise InputError(
                f"output_logits=True, but family {self.family.family_id!r} streams a stack "
                f"without an LM head"
            )
        directory = self.activation_dir
        # Without activation_dir nothing is written: activations stay in memory (and
        # resume=True has nothing to resume from, so the run is whole).
        store = (
            ActivationStore(directory, self._manifest(input_ids, mask), resume=resume)
            if directory is not None
            else None
        )
        bar: Any = None
        try:
            show = self.progress if self.progress is not None else sys.stderr.isatty()

            def on_plan(n_layers: int) -> None:
                nonlocal bar
                if show:
                    from tqdm import tqdm

                    bar = tqdm(total=n_layers, desc="layers", unit="layer", file=sys.stderr)

            out = run_layer_major(
                self.family,
                self.config,
                self.checkpoint,
                input_ids,
                mask,
                batch_size=batch_size,
                output_hidden_states=output_hidden_states,
                output_logits=output_logits,
                dtype=self.dtype,
                device=self.device,
                overrides=self._factories,
                store=store,
                progress=(lambda k: bar.update(k)) if show else None,
                on_plan=on_plan,
            )
        except KeyboardInterrupt:
            if store is not None:
                print(
                    f"nexus-sli: interrupted; completed layers are kept in {str(directory)!r}: "
                    f"run again with resume=True to continue",
                    file=sys.stderr,
                )
            raise
        finally:
            if bar is not None:
                bar.close()
            if store is not None:
                store.close()
        return SLIResult(out.last_hidden_state, out.hidden_states, out.logits, mask, out.stats)

    @beartype(conf=CONF)
    def run_texts(
        self,
        texts: Sequence[str],
        *,
        batch_size: int = 8,
        output_hidden_states: bool = False,
        output_logits: bool = False,
        resume: bool = False,
        max_tokens_per_call: int | None = DEFAULT_MAX_TOKENS_PER_CALL,
    ) -> SLIResult:
        """Tokenize ``texts`` with the checkpoint's tokenizer (padding as it says) and run."""
        if isinstance(texts, str):
            raise InputError("run_texts takes a list of strings, got a single string")
        if not texts:
            raise InputError("run_texts got no texts")
        try:
            from transformers import AutoTokenizer

            # Never trust_remote_code here: nexus_sli imports no code shipped with a checkpoint.
            tokenizer = AutoTokenizer.from_pretrained(str(self.model_dir), trust_remote_code=False)
        except Exception as exc:
            raise CheckpointError(
                f"{str(self.model_dir)!r} has no usable tokenizer ({type(exc).__name__}: {exc}); "
                f"pass input_ids to run() instead"
            ) from exc
        if tokenizer.pad_token is None:
            if tokenizer.eos_token is None:
                raise CheckpointError(
                    f"the tokenizer in {str(self.model_dir)!r} has no pad token and no eos token "
                    f"to pad a batch with"
                )
            tokenizer.pad_token = tokenizer.eos_token
        encoded = tokenizer(list(texts), return_tensors="pt", padding=True)
        return self.run(
            encoded["input_ids"],
            encoded["attention_mask"],
            batch_size=batch_size,
            output_hidden_states=output_hidden_states,
            output_logits=output_logits,
            resume=resume,
            max_tokens_per_call=max_tokens_per_call,
        )
