"""The ``nexus-sli`` command, driven as a subprocess the way a user runs it.

Every invocation is ``python -m nexus_sli.cli ...`` (what the console script runs) in a
workspace the tests build: a tiny random Llama saved with ``save_pretrained`` (and a tokenizer),
input files, plugin modules, a fake installed distribution declaring a ``nexus_sli.layers``
entry point. Each command costs seconds of imports (torch, transformers), so every invocation
is started up front, a few at a time, and the tests read the results.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from _checkpoints import save_llama
from safetensors import safe_open
from safetensors.torch import load_file, save_file

COMMANDS = ("demo", "run", "detect", "families", "layers", "check")
TIMEOUT = 600

GOOD_LAYERS = '''
import torch
from torch import nn

from nexus_sli import register_layer


@register_layer("llama_test_norm")
class TestNorm(nn.Module):
    """An RMSNorm that reads its width from the config."""

    def __init__(self, config, layer_idx):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(config.hidden_size))
        self.eps = config.rms_norm_eps

    def expected_output_shape(self, input_shape):
        return input_shape

    def forward(self, x):
        variance = x.float().pow(2).mean(-1, keepdim=True)
        return self.weight * (x.float() * torch.rsqrt(variance + self.eps)).to(x.dtype)
'''

BAD_LAYERS = """
import torch
from torch import nn

from nexus_sli import get_registry


class FixedWidth(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(64))  # hard-coded: only the 64-wide probe fits

    def expected_output_shape(self, input_shape):
        return input_shape

    def forward(self, x):
        return x * self.weight


class Liar(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.proj = nn.Linear(config.hidden_size, config.hidden_size)

    def expected_output_shape(self, input_shape):
        return (*input_shape[:-1], 2 * input_shape[-1])  # but forward keeps the width

    def forward(self, x):
        return self.proj(x)


get_registry().register_custom_layer("llama_fixed_width", FixedWidth)
get_registry().register_custom_layer("llama_liar", Liar, validate=False)
"""

REJECTED_LAYERS = """
from torch import nn

from nexus_sli import register_layer


@register_layer("llama_needs_missing")
class NeedsMissing(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.size = config.no_such_attribute
"""

EP_LAYERS = """
from torch import nn


class EntryPointNorm(nn.LayerNorm):
    def __init__(self, config, layer_idx):
        super().__init__(config.hidden_size)
"""


@dataclass(frozen=True)
class Workspace:
    root: Path
    llama: Path
    ids: Path
    ids_tensors: dict[str, torch.Tensor]
    cache: Path


@dataclass(frozen=True)
class Result:
    args: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str

    def __str__(self) -> str:
        return (
            f"nexus-sli {' '.join(self.args)} -> {self.returncode}\n"
            f"--- stdout\n{self.stdout}--- stderr\n{self.stderr}"
        )


@dataclass
class Runs:
    """Invocations started in the background; ``runs[name]`` waits for one."""

    futures: dict[str, Future[Result]] = field(default_factory=dict)

    def __getitem__(self, name: str) -> Result:
        return self.futures[name].result(timeout=TIMEOUT)


def _tokenizer(path: Path) -> None:
    """A word-level tokenizer: tokenizer.json plus the config that names its class."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<pad>", "<s>", "</s>", "<unk>", "the", "quick", "brown", "fox", "lazy", "dog"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.save(str(path / "tokenizer.json"))
    special = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **special}
    (path / "tokenizer_config.json").write_text(json.dumps(config))


def _fake_distribution(root: Path) -> None:
    """An installed-looking distribution (on sys.path via the working directory) that declares
    a ``nexus_sli.layers`` entry point."""
    info = root / "fake_nexus_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fake-nexus-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        "[nexus_sli.layers]\nllama_ep_norm = ep_layers:EntryPointNorm\n"
    )


def _build(root: Path) -> Workspace:
    llama = save_llama(root / "llama")
    _tokenizer(llama)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 128, (3, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    ids[1, 4:] = 0
    tensors = {"input_ids": ids, "attention_mask": mask}
    save_file(tensors, root / "ids.safetensors")
    (root / "garbage.safetensors").write_bytes(b"this is not a safetensors file")
    (root / "not_a_checkpoint").mkdir()
    (root / "alien").mkdir()
    (root / "alien" / "config.json").write_text(
        json.dumps({"model_type": "alien_net", "architectures": ["AlienForCausalLM"]})
    )
    probe = {"model_type": "llama", "hidden_size": 32, "num_attention_heads": 2}
    (root / "probe.json").write_text(json.dumps({**probe, "rms_norm_eps": 1e-5}))
    for name, source in [
        ("good_layers", GOOD_LAYERS),
        ("bad_layers", BAD_LAYERS),
        ("rejected_layers", REJECTED_LAYERS),
        ("ep_layers", EP_LAYERS),
    ]:
        (root / f"{name}.py").write_text(textwrap.dedent(source))
    _fake_distribution(root)
    return Workspace(root, llama, root / "ids.safetensors", tensors, root / "xdg-cache")


def _cases(ws: Workspace) -> dict[str, tuple[tuple[str, ...], Mapping[str, str]]]:
    """Every invocation the tests look at: name -> (arguments, extra environment)."""
    llama, ids, root = str(ws.llama), str(ws.ids), ws.root
    out = str(root / "unused.safetensors")
    plain: Mapping[str, str] = {}
    cases: dict[str, tuple[tuple[str, ...], Mapping[str, str]]] = {
        # The slowest first.
        "demo": (
            ("demo", "--sequences", "2", "--tokens", "16"),
            {"XDG_CACHE_HOME": str(ws.cache)},
        ),
        "run_ids": (
            (
                "run",
                llama,
                "--input-ids",
                ids,
                "--out",
                str(root / "out_ids.safetensors"),
                "--hidden-states",
                "--logits",
                "--batch-size",
                "2",
                "--override",
                "input_norm=llama_test_norm",
                "--plugin",
                "good_layers",
                "--activation-dir",
                str(root / "activations"),
                "--resume",
            ),
            plain,
        ),
        "run_text": (
            (
                "run",
                llama,
                "--text",
                "the quick brown fox",
                "--text",
                "lazy dog",
                "--out",
                str(root / "out_text.safetensors"),
            ),
            plain,
        ),
        "check_fail": (
            ("check", "good_layers", "bad_layers", "rejected_layers", "llama_ep_norm"),
            plain,
        ),
        "check_entry_points": (("check", "--config", str(root / "probe.json")), plain),
        "layers": (("layers", "--plugin", "good_layers"), {"FORCE_COLOR": "1"}),
        "families": (("families",), plain),
        "detect": (("detect", llama), plain),
        "detect_unsupported": (("detect", str(root / "alien")), plain),
        "unknown_override": (
            ("run", llama, "--input-ids", ids, "--out", out, "--override", "mlp=no_such_layer"),
            plain,
        ),
        # Bad input found before any model code runs.
        "missing_dir": (
            ("run", str(root / "no_such_dir"), "--input-ids", ids, "--out", out),
            plain,
        ),
        "not_a_checkpoint": (
            ("run", str(root / "not_a_checkpoint"), "--input-ids", ids, "--out", out),
            plain,
        ),
        "unreadable_input": (
            ("run", llama, "--input-ids", str(root / "garbage.safetensors"), "--out", out),
            plain,
        ),
        "two_inputs": (("run", llama, "--input-ids", ids, "--text", "x", "--out", out), plain),
        "resume_without_dir": (("run", llama, "--input-ids", ids, "--out", out, "--resume"), plain),
        "check_missing_module": (("check", "no_such_module_xyz"), plain),
        "debug": (("detect", str(root / "no_such_dir"), "--debug"), plain),
        "help": (("--help",), plain),
        "help_terminal": (("--help",), {"FORCE_COLOR": "1"}),
    }
    for command in COMMANDS:
        cases[f"help_{command}"] = ((command, "--help"), plain)
    return cases


def _environment(extra: Mapping[str, str]) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("FORCE_COLOR", "NO_COLOR", "TTY_COMPATIBLE", "NEXUS_SLI_DEBUG", "COLUMNS")
    }
    # Tiny tensors: one thread each, so that concurrent invocations do not fight for cores.
    env.update({"OMP_NUM_THREADS": "1", "COLUMNS": "200", "PYTHONDONTWRITEBYTECODE": "1"})
    env.update(extra)
    return env


def _invoke(root: Path, args: tuple[str, ...], extra: Mapping[str, str]) -> Result:
    done = subprocess.run(
        [sys.executable, "-m", "nexus_sli.cli", *args],
        cwd=root,
        env=_environment(extra),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    return Result(args, done.returncode, done.stdout, done.stderr)


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> Workspace:
    return _build(tmp_path_factory.mktemp("cli"))


@pytest.fixture(scope="module")
def runs(ws: Workspace) -> Iterator[Runs]:
    workers = max(2, min(4, (os.cpu_count() or 2) + 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        started = Runs()
        for name, (args, extra) in _cases(ws).items():
            started.futures[name] = pool.submit(_invoke, ws.root, args, extra)
        yield started


def assert_bad_input(result: Result, *needles: str) -> None:
    """Exit status 2, one line on stderr naming the thing, no traceback."""
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result
    assert lines[0].startswith("nexus-sli: error: "), result
    for needle in needles:
        assert needle in lines[0], result
    assert "Traceback" not in result.stderr


# ---------------------------------------------------------------------- help
def test_help_lists_every_command(runs: Runs) -> None:
    result = runs["help"]
    assert result.returncode == 0, result
    assert result.stdout.startswith("Usage: nexus-sli")
    for command in COMMANDS:
        assert command in result.stdout
    assert "╭" not in result.stdout  # plain when piped


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(runs: Runs, command: str) -> None:
    result = runs[f"help_{command}"]
    assert result.returncode == 0, result
    assert f"Usage: nexus-sli {command}" in result.stdout
    assert "--debug" in result.stdout


def test_help_is_rich_on_a_terminal(runs: Runs) -> None:
    result = runs["help_terminal"]
    assert result.returncode == 0, result
    assert "╭" in result.stdout and "Commands" in result.stdout


# ---------------------------------------------------------------------- demo
def test_demo_builds_once_into_the_cache_and_reports(runs: Runs, ws: Workspace) -> None:
    result = runs["demo"]
    assert result.returncode == 0, result
    built = list((ws.cache / "nexus_sli").glob("demo-llama-*"))
    assert len(built) == 1 and (built[0] / "config.json").is_file()
    assert not list((ws.cache / "nexus_sli").glob(".demo-*")), "temporary build left behind"
    weights = sum(p.stat().st_size for p in built[0].glob("*.safetensors"))
    assert weights < 400 * 2**20
    labels = [line.split("  ")[0] for line in result.stdout.splitlines()]
    for label in ("family", "layers", "tokens", "wall time", "peak memory", "full model"):
        assert label in labels, result
    assert "max abs diff" in labels, result
    assert "llama" in result.stdout and "demo_rms_norm" in result.stdout
    assert "32 (2 x 16" in result.stdout
    assert "MiB of weights" in result.stdout
    assert ": match" in result.stdout


# ---------------------------------------------------------------------- run
def _oracle(ws: Workspace) -> tuple[torch.Tensor, tuple[torch.Tensor, ...], torch.Tensor]:
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(ws.llama)
    with torch.no_grad():
        out = model(
            input_ids=ws.ids_tensors["input_ids"],
            attention_mask=ws.ids_tensors["attention_mask"],
            output_hidden_states=True,
        )
    return out.hidden_states[-1], out.hidden_states, out.logits


def test_run_writes_outputs_equal_to_transformers(runs: Runs, ws: Workspace) -> None:
    result = runs["run_ids"]
    assert result.returncode == 0, result
    path = ws.root / "out_ids.safetensors"
    tensors = load_file(path)
    n_layers = 3
    assert set(tensors) == {
        "last_hidden_state",
        "logits",
        "attention_mask",
        *(f"hidden_states.{i}" for i in range(n_layers + 1)),
    }
    last, hidden, logits = _oracle(ws)
    keep = ws.ids_tensors["attention_mask"].bool()

    def close(actual: torch.Tensor, expected: torch.Tensor) -> None:
        torch.testing.assert_close(actual[keep], expected[keep], rtol=1e-4, atol=1e-4)

    close(tensors["last_hidden_state"], last)
    close(tensors["logits"], logits)
    for i, expected in enumerate(hidden):
        close(tensors[f"hidden_states.{i}"], expected)
    assert torch.equal(tensors["attention_mask"], ws.ids_tensors["attention_mask"])
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    assert metadata["family"] == "llama"
    assert metadata["overrides"] == "input_norm=llama_test_norm"
    assert (ws.root / "activations" / "manifest.json").is_file()
    assert not list(ws.root.glob(".out_ids*")), "temporary output left behind"
    # Piped: a plain tab-separated table of what was written.
    assert "last_hidden_state\t[3, 7, 64]\tfloat32" in result.stdout
    assert "wrote 7 tensors" in result.stderr


def test_run_tokenizes_texts(runs: Runs, ws: Workspace) -> None:
    result = runs["run_text"]
    assert result.returncode == 0, result
    tensors = load_file(ws.root / "out_text.safetensors")
    assert set(tensors) == {"last_hidden_state", "attention_mask"}
    assert tensors["last_hidden_state"].shape == (2, 4, 64)
    assert tensors["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]


# ---------------------------------------------------------------------- bad input
def test_missing_directory(runs: Runs, ws: Workspace) -> None:
    assert_bad_input(runs["missing_dir"], str(ws.root / "no_such_dir"), "does not exist")


def test_directory_that_is_not_a_checkpoint(runs: Runs) -> None:
    assert_bad_input(runs["not_a_checkpoint"], "not_a_checkpoint", "config.json")


def test_unsupported_architecture(runs: Runs) -> None:
    result = runs["detect_unsupported"]
    assert_bad_input(result, "unsupported architecture", "alien_net")
    assert "closest supported" in result.stdout


def test_unknown_override_name(runs: Runs) -> None:
    assert_bad_input(runs["unknown_override"], "no_such_layer")


def test_unreadable_input_file(runs: Runs) -> None:
    assert_bad_input(runs["unreadable_input"], "garbage.safetensors")


def test_text_and_input_ids_together(runs: Runs) -> None:
    assert_bad_input(runs["two_inputs"], "--text", "--input-ids")


def test_resume_needs_an_activation_dir(runs: Runs) -> None:
    assert_bad_input(runs["resume_without_dir"], "--resume", "--activation-dir")


def test_check_of_a_module_that_does_not_exist(runs: Runs) -> None:
    assert_bad_input(runs["check_missing_module"], "no_such_module_xyz")


def test_debug_shows_the_traceback(runs: Runs) -> None:
    result = runs["debug"]
    assert result.returncode == 2, result
    assert "Traceback (most recent call last)" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("nexus-sli: error: ")


# ---------------------------------------------------------------------- detect, families, layers
def test_detect_explains(runs: Runs) -> None:
    result = runs["detect"]
    assert result.returncode == 0, result
    fields = {}
    for line in result.stdout.splitlines():
        label, _, value = line.partition("  ")
        fields[label] = value.strip()
    assert fields["family"] == "llama (Llama-style decoders)"
    assert fields["matched by"] == "model_type == 'llama'"
    assert fields["decoder layers"] == "3"
    assert "attention, mlp" in fields["roles"]


def test_families_is_a_plain_table_when_piped(runs: Runs) -> None:
    result = runs["families"]
    assert result.returncode == 0, result
    rows = [line.split("\t") for line in result.stdout.splitlines()]
    assert rows[0] == ["family", "name", "model types"]
    by_id = {row[0]: row for row in rows[1:]}
    assert "llama" in by_id["llama"][2].split(", ")
    assert "gpt2" in by_id["gpt"][2].split(", ")
    assert "bert" in by_id


def test_layers_shows_where_each_was_registered(runs: Runs) -> None:
    result = runs["layers"]
    assert result.returncode == 0, result
    assert "┃" in result.stdout or "│" in result.stdout  # a table (terminal forced)
    assert "llama_test_norm" in result.stdout and "good_layers:" in result.stdout
    assert "llama_ep_norm" in result.stdout and "entry point" in result.stdout


# ---------------------------------------------------------------------- check
def test_check_reports_every_layer_and_fails(runs: Runs) -> None:
    result = runs["check_fail"]
    assert result.returncode == 1, result
    lines = result.stdout.splitlines()
    by_name = {}
    for line in lines:
        status, rest = line.split(" ", 1)
        by_name[rest.split(" ", 1)[0]] = (status, rest)
    assert by_name["llama_test_norm"][0] == "PASS"
    assert "llama-like, gpt2-like, bert-like" in by_name["llama_test_norm"][1]
    status, why = by_name["llama_fixed_width"]
    assert status == "FAIL" and "fails on gpt2-like, bert-like" in why
    status, why = by_name["llama_liar"]
    assert status == "FAIL" and "forward-shape contract" in why
    status, why = by_name["module"]
    assert status == "FAIL" and "rejected_layers" in why and "FactoryContractError" in why
    assert "no_such_attribute" in why
    status, why = by_name["llama_ep_norm"]  # an entry point named on the command line
    assert status == "PASS" and "from entry point llama_ep_norm" in why
    assert "2 passed, 2 failed; 1 import failed" in result.stderr
    assert "Traceback" not in result.stderr


def test_check_loads_installed_entry_points_with_probe_configs(runs: Runs) -> None:
    result = runs["check_entry_points"]
    assert result.returncode == 0, result
    (line,) = result.stdout.splitlines()
    assert line.startswith("PASS llama_ep_norm (from entry point llama_ep_norm = ep_layers:")
    assert "(distribution fake-nexus-plugin)" in line
    assert line.endswith("builds on probe.json")
    assert "1 layer checked against 1 probe config: 1 passed, 0 failed" in result.stderr
