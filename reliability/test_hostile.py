"""Hostile checkpoints and activation directories.

* A config with ``auto_map`` and ``.py`` files beside it is refused without
  ``trust_remote_code=True``, and the code is never imported (a marker file would appear).
* Pickle files (``*.bin``, ``*.pt``, ...) are never unpickled: each planted pickle would
  create a marker file when unpickled, and the unpicklers are watched.
* An activation directory holding a planted pickle, a foreign file, a symlink, or a manifest
  made for another checkpoint / other inputs / other settings is refused or never trusted.
"""

from __future__ import annotations

import io
import json
import pickle
import shutil
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch

from nexus_sli import (
    ActivationStoreError,
    CheckpointError,
    RemoteCodeError,
    ResumeMismatchError,
    UniversalSLIProcessor,
    get_registry,
)
from nexus_sli._checkpoint import load_config, read_config_dict

from ._helpers import (
    DEEP_LAYERS,
    assert_identical,
    dir_state,
    lock_is_free,
    result_tensors,
    save_llama,
    stream,
    without_lock,
)

Inputs = tuple[torch.Tensor, torch.Tensor]


class _OpenOnUnpickle:
    """Unpickling this object calls ``open(marker, "w")``: the marker proves it happened."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return (open, (str(self.marker), "w"))


def evil_pickle(marker: Path) -> bytes:
    return pickle.dumps(_OpenOnUnpickle(marker))


def evil_torch_zip(marker: Path) -> bytes:
    """What torch.save writes (a zip with data.pkl), with a malicious data.pkl."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("archive/data.pkl", evil_pickle(marker))
        archive.writestr("archive/version", "3\n")
    return buffer.getvalue()


@pytest.fixture
def unpickle_spy(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every way to unpickle, watched: a call is recorded (and refused)."""
    calls: list[str] = []

    def refuse(what: str) -> Any:
        def spy(*args: Any, **kwargs: Any) -> Any:
            calls.append(what)
            raise AssertionError(f"{what} called")

        return spy

    monkeypatch.setattr(pickle, "load", refuse("pickle.load"))
    monkeypatch.setattr(pickle, "loads", refuse("pickle.loads"))
    monkeypatch.setattr(pickle, "Unpickler", refuse("pickle.Unpickler"))
    monkeypatch.setattr(torch, "load", refuse("torch.load"))
    return calls


# ---------------------------------------------------------------------- remote code
def _with_remote_code(source: Path, root: Path) -> tuple[Path, Path]:
    d = root / "ckpt"
    shutil.copytree(source, d)
    marker = root / "imported"
    config = json.loads((d / "config.json").read_text())
    config["auto_map"] = {
        "AutoConfig": "configuration_evil.EvilConfig",
        "AutoModel": "modeling_evil.EvilModel",
        "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM",
    }
    (d / "config.json").write_text(json.dumps(config))
    for name in ("configuration_evil", "modeling_evil", "__init__"):
        (d / f"{name}.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n")
    return d, marker


def _assert_never_imported(marker: Path) -> None:
    assert not marker.exists(), marker.read_text()
    assert not [m for m in sys.modules if "evil" in m], [m for m in sys.modules if "evil" in m]


def test_remote_code_refused_without_trust(tiny_llama: Path, tmp_path: Path) -> None:
    d, marker = _with_remote_code(tiny_llama, tmp_path)
    with pytest.raises(RemoteCodeError) as info:
        UniversalSLIProcessor(d, progress=False)
    message = str(info.value)
    assert "trust_remote_code=True" in message and "config.json" in message
    assert "modeling_evil.py" in message  # names the code files it refuses
    with pytest.raises(RemoteCodeError):
        load_config(d)
    with pytest.raises(RemoteCodeError):
        get_registry().detect_family(read_config_dict(d))
    with pytest.raises(RemoteCodeError):
        get_registry().explain(read_config_dict(d))
    _assert_never_imported(marker)


def test_trust_remote_code_still_imports_nothing(
    tiny_llama: Path, tmp_path: Path, unpickle_spy: list[str]
) -> None:
    """With trust_remote_code=True the registered family runs it; the .py files stay unread."""
    d, marker = _with_remote_code(tiny_llama, tmp_path)
    proc = UniversalSLIProcessor(d, trust_remote_code=True, progress=False)
    assert proc.family.family_id == "llama"
    ids = torch.randint(3, 64, (2, 5))
    got = proc.run(ids, output_logits=True)
    want = UniversalSLIProcessor(tiny_llama, progress=False).run(ids, output_logits=True)
    assert_identical(result_tensors(got), result_tensors(want))
    _assert_never_imported(marker)
    assert unpickle_spy == []


def _with_remote_tokenizer(source: Path, root: Path) -> tuple[Path, Path]:
    d = root / "ckpt"
    shutil.copytree(source, d)
    marker = root / "tokenizer-imported"
    (d / "tokenization_evil.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n"
        "from transformers import PreTrainedTokenizer\n"
        "class EvilTokenizer(PreTrainedTokenizer):\n    pass\n"
    )
    (d / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "auto_map": {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]},
                "tokenizer_class": "EvilTokenizer",
            }
        )
    )
    return d, marker


def test_remote_tokenizer_refused_without_trust(tiny_llama: Path, tmp_path: Path) -> None:
    d, marker = _with_remote_tokenizer(tiny_llama, tmp_path)
    with pytest.raises(CheckpointError, match="tokenizer"):
        UniversalSLIProcessor(d, progress=False).run_texts(["hello"])
    assert not marker.exists()


# Regression test (bug found by this suite): UniversalSLIProcessor documents that even with
# trust_remote_code=True no code from the checkpoint is imported, but run_texts passed
# trust_remote_code on to AutoTokenizer.from_pretrained, which imported the tokenizer's .py.
def test_trust_remote_code_never_imports_tokenizer_code(tiny_llama: Path, tmp_path: Path) -> None:
    d, marker = _with_remote_tokenizer(tiny_llama, tmp_path)
    try:
        UniversalSLIProcessor(d, trust_remote_code=True, progress=False).run_texts(["hello"])
    except CheckpointError:
        pass
    finally:
        _drop_module_copies(marker)
    assert not marker.exists(), "the checkpoint's tokenization_evil.py was imported"


def _drop_module_copies(marker: Path) -> None:
    """transformers copies imported remote code into its modules cache: remove our copy."""
    from transformers.utils.hub import HF_MODULES_CACHE

    for copy in Path(HF_MODULES_CACHE).glob("transformers_modules/**/tokenization_evil.py"):
        if str(marker) in copy.read_text():
            shutil.rmtree(copy.parent, ignore_errors=True)


# ---------------------------------------------------------------------- pickles
PICKLE_NAMES = [
    "pytorch_model.bin",
    "training_args.bin",
    "optimizer.pt",
    "rng_state.pth",
    "scheduler.pkl",
    "model.ckpt",
]


def _plant_pickles(d: Path, marker: Path) -> None:
    for name in PICKLE_NAMES:
        data = evil_torch_zip(marker) if name.endswith(".bin") else evil_pickle(marker)
        (d / name).write_bytes(data)


def test_pickles_beside_safetensors_never_unpickled(
    tiny_llama: Path, tmp_path: Path, unpickle_spy: list[str]
) -> None:
    d = tmp_path / "ckpt"
    shutil.copytree(tiny_llama, d)
    marker = tmp_path / "unpickled"
    _plant_pickles(d, marker)
    ids = torch.randint(3, 64, (2, 5))
    got = UniversalSLIProcessor(d, progress=False).run(ids, output_hidden_states=True)
    want = UniversalSLIProcessor(tiny_llama, progress=False).run(ids, output_hidden_states=True)
    assert_identical(result_tensors(got), result_tensors(want))
    with pytest.raises(CheckpointError):
        UniversalSLIProcessor(d, progress=False).run_texts(["hello"])  # no tokenizer
    assert not marker.exists() and unpickle_spy == []


def test_only_pickles_refused_without_unpickling(
    tiny_llama: Path, tmp_path: Path, unpickle_spy: list[str]
) -> None:
    d = tmp_path / "ckpt"
    d.mkdir()
    shutil.copy(tiny_llama / "config.json", d / "config.json")
    marker = tmp_path / "unpickled"
    _plant_pickles(d, marker)
    with pytest.raises(CheckpointError) as info:
        UniversalSLIProcessor(d, progress=False)
    message = str(info.value)
    assert "pytorch_model.bin" in message and "never loads" in message
    assert not marker.exists() and unpickle_spy == []


@pytest.mark.parametrize("name", ["model.safetensors", "model-00001-of-00001.safetensors"])
def test_pickle_disguised_as_safetensors_refused(
    name: str, tiny_llama: Path, tmp_path: Path, unpickle_spy: list[str]
) -> None:
    d = tmp_path / "ckpt"
    d.mkdir()
    shutil.copy(tiny_llama / "config.json", d / "config.json")
    marker = tmp_path / "unpickled"
    (d / name).write_bytes(evil_torch_zip(marker))
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
        UniversalSLIProcessor(d, progress=False)
    assert not marker.exists() and unpickle_spy == []


# ---------------------------------------------------------------------- activation directories
@pytest.fixture
def finished(tmp_path: Path, deep_llama: Path, deep_inputs: Inputs) -> Path:
    """An activation directory of a complete run of the deep checkpoint."""
    act = tmp_path / "acts"
    stream(deep_llama, act, *deep_inputs)
    return act


def _plant_file(act: Path, name: str, marker: Path) -> None:
    (act / name).write_bytes(evil_pickle(marker))


def _plant_dir(act: Path, name: str, marker: Path) -> None:
    (act / name).mkdir()
    (act / name / "data.pkl").write_bytes(evil_pickle(marker))


def _plant_symlink(act: Path, name: str, marker: Path) -> None:
    target = act.parent / "elsewhere.pt"
    target.write_bytes(evil_pickle(marker))
    (act / name).symlink_to(target)


@pytest.mark.parametrize(
    ("name", "plant"),
    [
        ("evil.pt", _plant_file),
        ("evil.pkl", _plant_file),
        ("pytorch_model.bin", _plant_file),
        ("layer_00003.pt", _plant_file),
        ("layer_3.safetensors", _plant_file),
        ("Layer_00003.safetensors", _plant_file),
        ("layer_00003.safetensors.bak", _plant_file),
        ("layer_00003.safetensors.tmp-x", _plant_file),
        ("nested", _plant_dir),
        ("link.pt", _plant_symlink),
    ],
    ids=lambda x: x if isinstance(x, str) else x.__name__.strip("_"),
)
@pytest.mark.parametrize("resume", [False, True], ids=["fresh", "resume"])
def test_activation_dir_with_planted_file_refused_untouched(
    name: str,
    plant: Any,
    resume: bool,
    finished: Path,
    deep_llama: Path,
    deep_inputs: Inputs,
    unpickle_spy: list[str],
) -> None:
    marker = finished.parent / "unpickled"
    plant(finished, name, marker)
    before = dir_state(finished)
    with pytest.raises(ActivationStoreError) as info:
        stream(deep_llama, finished, *deep_inputs, resume=resume)
    assert repr(name) in str(info.value)
    assert without_lock(dir_state(finished)) == without_lock(before)  # nothing touched
    assert not marker.exists() and unpickle_spy == []


@pytest.mark.parametrize(
    "name",
    ["layer_00003.safetensors", "layer_00004.safetensors.tmp-12345", "embeddings.safetensors"],
)
def test_pickle_under_an_activation_name_is_never_trusted(
    name: str,
    finished: Path,
    deep_llama: Path,
    deep_inputs: Inputs,
    deep_reference: dict[str, torch.Tensor],
    unpickle_spy: list[str],
) -> None:
    """A pickle with a name nexus_sli writes: recomputed (or its temp file dropped), unread."""
    marker = finished.parent / "unpickled"
    _plant_file(finished, name, marker)
    result = stream(deep_llama, finished, *deep_inputs, resume=True)
    assert_identical(result_tensors(result), deep_reference)
    layer = 3 if name.startswith("layer_00003") else (-1 if name.startswith("emb") else DEEP_LAYERS)
    assert result.stats.layers_resumed == max(layer, 0)
    assert not marker.exists() and unpickle_spy == []
    assert not (finished / "layer_00004.safetensors.tmp-12345").exists()


def test_planted_symlink_under_an_activation_name_is_not_written_through(
    finished: Path, deep_llama: Path, deep_inputs: Inputs, deep_reference: dict[str, torch.Tensor]
) -> None:
    victim = finished.parent / "victim.txt"
    victim.write_text("precious")
    (finished / "layer_00002.safetensors").unlink()
    (finished / "layer_00002.safetensors").symlink_to(victim)
    result = stream(deep_llama, finished, *deep_inputs, resume=True)
    assert_identical(result_tensors(result), deep_reference)
    assert result.stats.layers_resumed == 2
    assert victim.read_text() == "precious"


def test_activation_file_of_other_inputs_is_recomputed(
    finished: Path, deep_llama: Path, deep_inputs: Inputs, deep_reference: dict[str, torch.Tensor]
) -> None:
    """A well-formed layer file written for other inputs is never taken as this run's."""
    ids, mask = deep_inputs
    other = finished.parent / "other"
    stream(deep_llama, other, ids.flip(0), mask.flip(0))
    shutil.copy(other / "layer_00004.safetensors", finished / "layer_00004.safetensors")
    result = stream(deep_llama, finished, *deep_inputs, resume=True)
    assert_identical(result_tensors(result), deep_reference)
    assert result.stats.layers_resumed == 4


def _other_checkpoint(root: Path) -> Path:
    return save_llama(root / "other_ckpt", layers=DEEP_LAYERS, hidden=64, vocab=128, seed=7)


@pytest.mark.parametrize("what", ["checkpoint", "inputs", "dtype"])
def test_manifest_for_other_work_refused_on_resume(
    what: str, finished: Path, deep_llama: Path, deep_inputs: Inputs
) -> None:
    before = dir_state(finished)
    ids, mask = deep_inputs
    expected = {
        "checkpoint": "another checkpoint",
        "inputs": "other inputs",
        "dtype": "run settings",
    }
    if what == "checkpoint":
        proc = UniversalSLIProcessor(
            _other_checkpoint(finished.parent), activation_dir=finished, progress=False
        )
    else:
        dtype = torch.float64 if what == "dtype" else None
        proc = UniversalSLIProcessor(
            deep_llama, activation_dir=finished, dtype=dtype, progress=False
        )
    if what == "inputs":
        ids, mask = ids[:, :-1], mask[:, :-1]
    with pytest.raises(ResumeMismatchError, match=expected[what]):
        proc.run(ids, mask, resume=True)
    assert without_lock(dir_state(finished)) == without_lock(before)


# Regression tests (bug found by this suite, the last four cases): ActivationStore._open assumed
# manifest.json holds an object: a list, string or number escaped as AttributeError, and 'null'
# was taken for no manifest, so resume=True deleted the stored activations and started over.


@pytest.mark.parametrize(
    "manifest",
    [
        pytest.param(b"{not json", id="not-json"),
        pytest.param(b"\xff\xfe", id="not-utf8"),
        pytest.param(b"", id="empty"),
        pytest.param(
            b"[]",
            id="a-list",
        ),
        pytest.param(
            b'"a string"',
            id="a-string",
        ),
        pytest.param(
            b"null",
            id="null",
        ),
        pytest.param(
            b"42",
            id="a-number",
        ),
    ],
)
def test_damaged_manifest_refused_on_resume(
    manifest: bytes, finished: Path, deep_llama: Path, deep_inputs: Inputs
) -> None:
    (finished / "manifest.json").write_bytes(manifest)
    before = dir_state(finished)
    with pytest.raises((ActivationStoreError, ResumeMismatchError)) as info:
        stream(deep_llama, finished, *deep_inputs, resume=True)
    assert "manifest" in str(info.value)
    assert without_lock(dir_state(finished)) == without_lock(before)


@pytest.mark.parametrize("content", ["", "garbage", "-5", "99999999"])
def test_unreadable_or_dead_lock_is_taken_over(
    content: str,
    finished: Path,
    deep_llama: Path,
    deep_inputs: Inputs,
    deep_reference: dict[str, torch.Tensor],
) -> None:
    (finished / ".lock").write_text(content)
    result = stream(deep_llama, finished, *deep_inputs, resume=True)
    assert_identical(result_tensors(result), deep_reference)
    assert result.stats.layers_run == 0
    assert lock_is_free(finished)


def test_activation_dir_that_is_a_file_refused(
    tmp_path: Path, deep_llama: Path, deep_inputs: Inputs
) -> None:
    path = tmp_path / "acts"
    path.write_bytes(b"not a directory")
    with pytest.raises(ActivationStoreError):
        stream(deep_llama, path, *deep_inputs)
    assert path.read_bytes() == b"not a directory"


def test_resume_false_over_other_work_starts_over(
    finished: Path, deep_llama: Path, deep_inputs: Inputs, deep_reference: dict[str, torch.Tensor]
) -> None:
    """Documented: resume=False reuses a nexus_sli directory from scratch; nothing is mixed."""
    model = _other_checkpoint(finished.parent)
    UniversalSLIProcessor(model, activation_dir=finished, progress=False).run(*deep_inputs)
    with pytest.raises(ResumeMismatchError, match="another checkpoint"):
        stream(deep_llama, finished, *deep_inputs, resume=True)
    result = stream(deep_llama, finished, *deep_inputs, resume=False)
    assert_identical(result_tensors(result), deep_reference)
    assert result.stats.layers_resumed == 0
