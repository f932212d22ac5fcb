"""The ``nexus-sli`` command: demo, run, detect, families, layers, check.

Bad input (a missing directory, a directory that is not a checkpoint, an unsupported
architecture, an unknown override, an unreadable input file, a module that cannot be
imported) prints one line on stderr naming the thing and exits with status 2; ``--debug`` (or
``NEXUS_SLI_DEBUG=1``) also prints the traceback. Other failures exit with status 1. Tables
and progress bars are drawn on a terminal; piped output is plain (tab-separated tables).
"""

from __future__ import annotations

import contextlib
import enum
import os
import sys
import time
import traceback
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

if TYPE_CHECKING:
    import torch

    from ._registry import ArchitectureRegistry

__all__ = ["app", "main"]

PROG = "nexus-sli"
_DEBUG_ENV = "NEXUS_SLI_DEBUG"


def _stdout_is_terminal() -> bool:
    return Console().is_terminal


app = typer.Typer(
    name=PROG,
    help=(
        "Stream transformer checkpoints layer by layer (Sequential Layer Ingestion) and "
        "check custom layer registrations."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # Rich help panels on a terminal, plain click help when piped.
    rich_markup_mode="rich" if _stdout_is_terminal() else None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


# ---------------------------------------------------------------------- output
class _BadInputError(Exception):
    """A command-line argument that names nothing usable: exit status 2."""


def _one_line(text: str) -> str:
    from ._check import one_line

    return one_line(text)


def _error(message: str) -> None:
    """One line on stderr (red ``error:`` on a terminal)."""
    line = _one_line(message)
    console = Console(stderr=True, highlight=False)
    if console.is_terminal:
        console.print(f"[bold red]{PROG}: error:[/] {escape(line)}", soft_wrap=True)
    else:
        print(f"{PROG}: error: {line}", file=sys.stderr, flush=True)


def _note(message: str) -> None:
    """A status line on stderr (dim on a terminal)."""
    console = Console(stderr=True, highlight=False)
    if console.is_terminal:
        console.print(f"[dim]{escape(message)}[/]", soft_wrap=True)
    else:
        print(message, file=sys.stderr, flush=True)


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], *, title: str = "") -> None:
    """A table on a terminal; tab-separated lines (header first) when piped."""
    console = Console(highlight=False)
    if console.is_terminal:
        table = Table(title=title or None, title_justify="left")
        for header in headers:
            table.add_column(header, overflow="fold")
        for row in rows:
            table.add_row(*(escape(cell) for cell in row))
        console.print(table)
        return
    lines = ["\t".join(headers), *("\t".join(_one_line(cell) for cell in row) for row in rows)]
    print("\n".join(lines), flush=True)


def _fields(rows: Sequence[tuple[str, str]]) -> None:
    """``label  value`` rows: a borderless two-column table on a terminal, aligned lines piped."""
    console = Console(highlight=False)
    if console.is_terminal:
        table = Table(show_header=False, box=None, pad_edge=False)
        table.add_column(style="bold")
        table.add_column(overflow="fold")
        for label, value in rows:
            table.add_row(escape(label), escape(value))
        console.print(table)
        return
    width = max((len(label) for label, _ in rows), default=0)
    print("\n".join(f"{label:<{width}}  {value}" for label, value in rows), flush=True)


def _is_bad_input(exc: BaseException) -> bool:
    from ._check import CheckInputError
    from .errors import (
        ActivationStoreError,
        CheckpointError,
        InputError,
        LookupFailedError,
        RemoteCodeError,
        ResumeMismatchError,
    )

    bad = (
        _BadInputError,
        CheckInputError,
        CheckpointError,
        InputError,
        LookupFailedError,
        RemoteCodeError,
        ResumeMismatchError,
        ActivationStoreError,
    )
    return isinstance(exc, bad)


@contextlib.contextmanager
def _reporting(debug: bool) -> Iterator[None]:
    """Turn exceptions into one line on stderr and an exit status (2: bad input, 1: failure)."""
    try:
        yield
    except (typer.Exit, typer.Abort, BrokenPipeError):
        raise  # BrokenPipeError (output piped into `head`): typer exits quietly
    except KeyboardInterrupt:
        _error("interrupted")
        raise typer.Exit(130) from None
    except Exception as exc:
        if debug or os.environ.get(_DEBUG_ENV, "") not in ("", "0"):
            traceback.print_exc()
        if _is_bad_input(exc):
            _error(str(exc))
            raise typer.Exit(2) from None
        _error(f"{type(exc).__name__}: {exc} (run with --debug for the traceback)")
        raise typer.Exit(1) from None


# ---------------------------------------------------------------------- shared options
DebugOption = Annotated[
    bool,
    typer.Option(
        "--debug",
        envvar=_DEBUG_ENV,
        help="Show the traceback of an error.",
    ),
]
PluginOption = Annotated[
    list[str] | None,
    typer.Option(
        "--plugin",
        metavar="MODULE",
        help=(
            "Import this module first (a module name, a path to a .py file, or a "
            "nexus_sli.layers entry point); its registrations apply. Repeatable."
        ),
    ),
]


def _registry(plugins: Sequence[str] | None = None) -> ArchitectureRegistry:
    """The shared registry, after importing ``--plugin`` modules (bad ones: exit status 2)."""
    from ._check import CheckInputError, import_target, validate_target
    from ._registry import get_registry

    for plugin in plugins or ():
        try:
            validate_target(plugin)  # before the (slow) registry is built
        except CheckInputError as exc:
            raise _BadInputError(f"--plugin {plugin}: {exc}") from exc
    registry = get_registry()
    for plugin in plugins or ():
        for outcome in import_target(registry, plugin):
            if outcome.error is not None:
                raise _BadInputError(f"--plugin {plugin}: {outcome.target}: {outcome.error}")
    return registry


def _checkpoint_config(model_dir: Path) -> dict[str, Any]:
    """The checkpoint's ``config.json`` (fast: no registry, no transformers)."""
    from ._checkpoint import read_config_dict

    return read_config_dict(model_dir.expanduser())


# ---------------------------------------------------------------------- callback
def _version(value: bool) -> None:
    if value:
        from . import __version__

        print(f"{PROG} {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version."),
    ] = False,
) -> None:
    """Stream transformer checkpoints layer by layer and check custom layer registrations."""


# ---------------------------------------------------------------------- demo
class DemoFamily(enum.StrEnum):
    """The demo checkpoints (see :data:`nexus_sli.demo.DEMO_FAMILIES`)."""

    llama = "llama"
    gpt2 = "gpt2"
    bert = "bert"


@app.command()
def demo(
    family: Annotated[
        DemoFamily, typer.Option("--family", help="Which small random checkpoint to stream.")
    ] = DemoFamily.llama,
    sequences: Annotated[
        int, typer.Option("--sequences", min=1, help="Number of random sequences.")
    ] = 8,
    tokens: Annotated[int, typer.Option("--tokens", min=1, help="Tokens per sequence.")] = 128,
    batch_size: Annotated[
        int, typer.Option("--batch-size", min=1, help="Sequences per micro-batch.")
    ] = 4,
    debug: DebugOption = False,
) -> None:
    """Build a small random checkpoint (once), stream it with a custom layer, compare.

    No network: the checkpoint (a Llama of about 175 MiB by default) is built with
    transformers into the user cache dir ($XDG_CACHE_HOME/nexus_sli, ~/.cache/nexus_sli by
    default) on the first run and reused afterwards. An example custom layer is registered
    and swapped into every layer; the report gives the family, layers, tokens, wall time, peak
    memory of the process, the memory the full model would need, and the max abs difference
    against transformers' in-memory forward. Exit status 1 if they differ.
    """
    with _reporting(debug):
        from .demo import format_report, run_demo

        report = run_demo(
            family.value,
            sequences=sequences,
            tokens=tokens,
            batch_size=batch_size,
            progress=None,
            status=_note,
        )
        _fields(format_report(report))
    if not report.ok:
        raise typer.Exit(1)


# ---------------------------------------------------------------------- run
def _parse_overrides(overrides: Sequence[str] | None) -> dict[str, str]:
    parsed: dict[str, str] = {}
    for item in overrides or ():
        role, sep, name = item.partition("=")
        role, name = role.strip(), name.strip()
        if not sep or not role or not name:
            raise _BadInputError(
                f"--override {item!r}: expected ROLE=NAME, e.g. --override attention=my_attention"
            )
        if role in parsed:
            raise _BadInputError(f"--override: role {role!r} is given twice")
        parsed[role] = name
    return parsed


def _read_input_ids(path: Path) -> tuple[torch.Tensor, torch.Tensor | None]:
    from safetensors.torch import load_file

    if not path.is_file():
        what = "does not exist" if not path.exists() else "is not a file"
        raise _BadInputError(f"input file {str(path)!r} {what}")
    try:
        tensors = load_file(str(path))
    except Exception as exc:
        raise _BadInputError(
            f"cannot read input file {str(path)!r} as safetensors: {type(exc).__name__}: {exc}"
        ) from exc
    if "input_ids" not in tensors:
        raise _BadInputError(
            f"input file {str(path)!r} has no 'input_ids' tensor (it holds: "
            f"{', '.join(sorted(tensors)) or 'nothing'})"
        )
    unexpected = sorted(set(tensors) - {"input_ids", "attention_mask"})
    if unexpected:
        raise _BadInputError(
            f"input file {str(path)!r} holds unexpected tensors {unexpected}; expected "
            f"'input_ids' and optionally 'attention_mask'"
        )
    return tensors["input_ids"], tensors.get("attention_mask")


def _check_out(out: Path) -> None:
    parent = out.parent if str(out.parent) else Path(".")
    if out.is_dir():
        raise _BadInputError(f"--out {str(out)!r} is a directory; give a file name (.safetensors)")
    if not parent.is_dir():
        raise _BadInputError(f"--out {str(out)!r}: directory {str(parent)!r} does not exist")
    if not os.access(parent, os.W_OK):
        raise _BadInputError(f"--out {str(out)!r}: directory {str(parent)!r} is not writable")


def _save_outputs(tensors: dict[str, torch.Tensor], out: Path, metadata: dict[str, str]) -> None:
    """Write ``tensors`` to ``out`` atomically (a temporary file renamed into place)."""
    from safetensors.torch import save_file

    seen: set[int] = set()
    ready: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        t = tensor.detach().to("cpu").contiguous()
        if t.data_ptr() in seen:  # hidden_states[-1] is last_hidden_state
            t = t.clone()
        seen.add(t.data_ptr())
        ready[name] = t
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        save_file(ready, str(tmp), metadata=metadata)
        os.replace(tmp, out)
    except OSError as exc:
        raise _BadInputError(f"cannot write --out {str(out)!r}: {exc}") from exc
    finally:
        tmp.unlink(missing_ok=True)


@app.command()
def run(
    model_dir: Annotated[
        Path,
        typer.Argument(
            metavar="MODEL_DIR",
            help="Checkpoint directory: config.json and *.safetensors (save_pretrained).",
            show_default=False,
        ),
    ],
    out: Annotated[
        Path,
        typer.Option("--out", "-o", metavar="FILE.safetensors", help="Where to write the outputs."),
    ],
    text: Annotated[
        list[str] | None,
        typer.Option(
            "--text",
            metavar="TEXT",
            help="A text to run (repeatable), tokenized with the checkpoint's tokenizer.",
        ),
    ] = None,
    input_ids: Annotated[
        Path | None,
        typer.Option(
            "--input-ids",
            metavar="FILE.safetensors",
            help="A safetensors file with an 'input_ids' [batch, seq] tensor and an optional "
            "'attention_mask'.",
        ),
    ] = None,
    batch_size: Annotated[
        int, typer.Option("--batch-size", min=1, help="Sequences per micro-batch.")
    ] = 8,
    max_tokens_per_call: Annotated[
        int,
        typer.Option(
            "--max-tokens-per-call",
            min=0,
            help="Split micro-batches so one layer call sees at most this many tokens (whole "
            "sequences); 0 = no limit. Bounds activation memory; results do not change.",
        ),
    ] = 1024,
    hidden_states: Annotated[
        bool,
        typer.Option("--hidden-states", help="Also write hidden_states.<i> (embeddings first)."),
    ] = False,
    logits: Annotated[bool, typer.Option("--logits", help="Also write logits.")] = False,
    override: Annotated[
        list[str] | None,
        typer.Option(
            "--override",
            metavar="ROLE=NAME",
            help="Replace ROLE (attention, mlp, layer, ...; see 'nexus-sli detect') in every "
            "layer by the custom layer registered as NAME. Repeatable.",
        ),
    ] = None,
    plugin: PluginOption = None,
    resume: Annotated[
        bool,
        typer.Option("--resume", help="Continue an interrupted run stored in --activation-dir."),
    ] = False,
    activation_dir: Annotated[
        Path | None,
        typer.Option(
            "--activation-dir",
            metavar="DIR",
            help="Write per-layer activations here (needed for --resume); otherwise they "
            "stay in memory and nothing is written.",
        ),
    ] = None,
    debug: DebugOption = False,
) -> None:
    """Stream MODEL_DIR over texts or token ids; write the outputs to a safetensors file.

    The file holds last_hidden_state [batch, seq, hidden] and attention_mask [batch, seq],
    plus hidden_states.0 ... hidden_states.N with --hidden-states and logits with --logits.
    """
    with _reporting(debug):
        if (text is None) == (input_ids is None):
            raise _BadInputError("give exactly one of --text TEXT (repeatable) or --input-ids FILE")
        if resume and activation_dir is None:
            raise _BadInputError(
                "--resume needs --activation-dir DIR (where the interrupted run is)"
            )
        overrides = _parse_overrides(override)
        _check_out(out)
        _checkpoint_config(model_dir)
        ids, mask = _read_input_ids(input_ids) if input_ids is not None else (None, None)

        registry = _registry(plugin)
        from .universal_sli import UniversalSLIProcessor

        processor = UniversalSLIProcessor(
            model_dir,
            custom_layer_overrides=overrides,
            activation_dir=activation_dir,
            registry=registry,
            progress=None,
        )
        start = time.perf_counter()
        options: dict[str, Any] = {
            "batch_size": batch_size,
            "max_tokens_per_call": max_tokens_per_call or None,
            "output_hidden_states": hidden_states,
            "output_logits": logits,
            "resume": resume,
        }
        if ids is not None:
            result = processor.run(ids, mask, **options)
        else:
            result = processor.run_texts(list(text or ()), **options)
        wall = time.perf_counter() - start

        tensors: dict[str, torch.Tensor] = {"last_hidden_state": result.last_hidden_state}
        for i, hidden in enumerate(result.hidden_states or ()):
            tensors[f"hidden_states.{i}"] = hidden
        if result.logits is not None:
            tensors["logits"] = result.logits
        tensors["attention_mask"] = result.attention_mask
        from . import __version__

        metadata = {
            "format": "nexus_sli.run/1",
            "nexus_sli_version": __version__,
            "model_dir": str(model_dir.expanduser().resolve()),
            "family": processor.family.family_id,
            "overrides": ",".join(f"{r}={n}" for r, n in overrides.items()),
        }
        _save_outputs(tensors, out, metadata)
        batch, seq = result.attention_mask.shape
        _note(
            f"wrote {len(tensors)} tensors to {out} (family {processor.family.family_id}, "
            f"{processor.family.num_layers(processor.config)} layers, {batch} x {seq} tokens, "
            f"{wall:.2f} s)"
        )
        _table(
            ["tensor", "shape", "dtype"],
            [
                (n, str(list(t.shape)), str(t.dtype).removeprefix("torch."))
                for n, t in tensors.items()
            ],
        )


# ---------------------------------------------------------------------- detect
@app.command()
def detect(
    model_dir: Annotated[
        Path,
        typer.Argument(
            metavar="MODEL_DIR", help="Checkpoint directory (its config.json).", show_default=False
        ),
    ],
    plugin: PluginOption = None,
    debug: DebugOption = False,
) -> None:
    """Which architecture family handles MODEL_DIR, and why (the registry's explain).

    Also lists the family's layers and the roles that 'nexus-sli run --override' can replace.
    Exit status 2 when no family claims the checkpoint.
    """
    with _reporting(debug):
        data = _checkpoint_config(model_dir)
        registry = _registry(plugin)
        why = registry.explain(data)
        rows = [
            ("model_type", str(why.model_type)),
            ("architectures", ", ".join(why.architectures) or "(none)"),
            ("families considered", ", ".join(why.considered) or "(none registered)"),
        ]
        if why.family_id is None:
            rows.append(("matched", "nothing: no family claims this model_type or architecture"))
            rows.append(("closest supported", ", ".join(why.closest) or "(none)"))
            _fields(rows)
            raise _BadInputError(
                f"unsupported architecture in {str(model_dir)!r}: model_type="
                f"{why.model_type!r}, architectures={list(why.architectures)}; closest "
                f"supported: {', '.join(why.closest) or '(none)'}"
            )
        info = registry.get_family_info(why.family_id)
        rows[:0] = [
            ("family", f"{why.family_id} ({info['family_name']})"),
            ("matched by", f"{why.rule} == {why.matched!r}"),
        ]
        from ._checkpoint import load_config

        family = registry.get_family(why.family_id)
        config = load_config(model_dir.expanduser())
        for stack in family.layer_types(config):
            rows.append((f"{stack} layers", str(family.num_layers(config, stack))))
        stack = family.layer_types(config)[0]
        rows.append(("roles", ", ".join(family.layer_roles(config, stack))))
        _fields(rows)


# ---------------------------------------------------------------------- families, layers
@app.command()
def families(debug: DebugOption = False) -> None:
    """The registered architecture families and the model types each one claims."""
    with _reporting(debug):
        registry = _registry()
        rows = []
        for family_id in registry.list_families():
            info = registry.get_family_info(family_id)
            rows.append((family_id, str(info["family_name"]), ", ".join(info["model_types"])))
        _table(["family", "name", "model types"], rows, title="Architecture families")


@app.command()
def layers(plugin: PluginOption = None, debug: DebugOption = False) -> None:
    """The registered custom layers, with where each was registered and defined.

    Loads the nexus_sli.layers entry points of the installed packages and the --plugin
    modules first. Exit status 1 when an entry point fails to load.
    """
    with _reporting(debug):
        from ._check import load_entry_points

        registry = _registry(plugin)
        failed = [o for o in load_entry_points(registry) if not o.ok]
        rows = [
            (r.name, r.registered_at, r.origin, r.defined_at)
            for r in registry.list_layer_registrations()
        ]
        if rows:
            _table(["layer", "registered at", "origin", "defined at"], rows, title="Custom layers")
        else:
            _note("no custom layers registered (use --plugin MODULE to import some)")
        for outcome in failed:
            _error(f"{outcome.error}")
        if failed:
            raise typer.Exit(1)


# ---------------------------------------------------------------------- check
def _say_result(ok: bool, text: str) -> None:
    console = Console(highlight=False)
    if console.is_terminal:
        status = "[bold green]PASS[/]" if ok else "[bold red]FAIL[/]"
        console.print(f"{status} {escape(text)}", soft_wrap=True)
    else:
        print(f"{'PASS' if ok else 'FAIL'} {_one_line(text)}", flush=True)


@app.command()
def check(
    targets: Annotated[
        list[str] | None,
        typer.Argument(
            metavar="MODULE_OR_ENTRYPOINT",
            help="Modules (or .py files, nexus_sli.layers entry points, distributions) whose "
            "layers to check; none: every installed nexus_sli.layers entry point.",
            show_default=False,
        ),
    ] = None,
    config: Annotated[
        list[Path] | None,
        typer.Option(
            "--config",
            metavar="FILE.json",
            help="A probe config (a config.json object, or a list of them). Repeatable; "
            "replaces the built-in small Llama-, GPT-2- and BERT-like configs.",
        ),
    ] = None,
    debug: DebugOption = False,
) -> None:
    """Check every registered custom layer's contract (for library authors' CI).

    Imports the modules (or loads the installed packages' nexus_sli.layers entry points when
    none is given), then checks each registered layer: the factory binds (config, layer_idx),
    builds on the meta device from every probe config, and keeps its forward-shape contract
    (expected_output_shape) where it declares one. One line per layer; exit status 1 when
    anything fails, a module whose import failed (a rejected registration) included, or when
    there is nothing to check. Exit status 2 when a module does not exist.
    """
    with _reporting(debug):
        from ._check import (
            builtin_probe_configs,
            check_layer,
            import_target,
            load_entry_points,
            load_probe_configs,
            validate_target,
        )

        probes = load_probe_configs(config) if config else None
        for target in targets or ():
            validate_target(target)  # exit status 2 before the (slow) registry is built
        registry = _registry()
        if targets:
            imports = [outcome for target in targets for outcome in import_target(registry, target)]
        else:
            imports = load_entry_points(registry)
        if probes is None:
            probes = builtin_probe_configs()
        failed_imports = failed_layers = checked = 0
        for outcome in imports:
            if outcome.error is not None:
                failed_imports += 1
                _say_result(False, f"{outcome.target}: {outcome.error}")
        for registration in registry.list_layer_registrations():
            result = check_layer(registration, probes)
            checked += 1
            where = f"registered at {registration.registered_at}"
            if registration.origin.startswith("entry point"):
                where = f"from {registration.origin}"
            if result.ok:
                _say_result(
                    True,
                    f"{registration.name} ({where}): builds on {', '.join(result.probes)}",
                )
            else:
                failed_layers += 1
                failing = ", ".join(probe for probe, _ in result.failures)
                why = result.failures[0][1]
                _say_result(False, f"{registration.name} ({where}): fails on {failing}: {why}")
        if checked == 0 and failed_imports == 0:
            source = "the given modules" if targets else "installed nexus_sli.layers entry points"
            _error(f"nothing to check: no custom layer is registered by {source}")
            raise typer.Exit(1)
        summary = (
            f"{checked} layer{'s' * (checked != 1)} checked against {len(probes)} probe "
            f"config{'s' * (len(probes) != 1)}: {checked - failed_layers} passed, "
            f"{failed_layers} failed"
        )
        if failed_imports:
            summary += f"; {failed_imports} import{'s' * (failed_imports != 1)} failed"
        _note(summary)
        if failed_layers or failed_imports:
            raise typer.Exit(1)


def main() -> None:
    """Entry point of the ``nexus-sli`` console script."""
    app(prog_name=PROG)


if __name__ == "__main__":
    main()
