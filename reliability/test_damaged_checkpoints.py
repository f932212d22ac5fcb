"""Damaged checkpoints: each damage gives a specific nexus_sli error naming the file (and the
tensor), raised before any activation is written wherever that can be known up front.

Every case copies a good checkpoint (one file, or five shards with an index), damages it, and
streams it into an activation directory.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from nexus_sli import (
    CheckpointError,
    NexusSLIError,
    TensorMismatchError,
    UniversalSLIProcessor,
)

from ._helpers import FIGURES, Zygote, child_spec, weight_map

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
LAYER1_SHARD = "model-00003-of-00005.safetensors"  # holds model.layers.1.mlp.* (save_pretrained)
ATTN1_SHARD = "model-00002-of-00005.safetensors"  # holds model.layers.1.self_attn.*
UP1 = "model.layers.1.mlp.up_proj.weight"
Q1 = "model.layers.1.self_attn.q_proj.weight"


# ---------------------------------------------------------------------- raw safetensors edits
def read_raw(path: Path) -> tuple[dict[str, Any], bytes]:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def write_raw(path: Path, header: dict[str, Any], body: bytes) -> None:
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + body)


def edit_header(path: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    header, body = read_raw(path)
    edit(header)
    write_raw(path, header, body)


def rewrite_tensor(path: Path, name: str, value: torch.Tensor | None) -> None:
    tensors = load_file(str(path))
    if value is None:
        del tensors[name]
    else:
        tensors[name] = value
    save_file(tensors, str(path), metadata={"format": "pt"})


def truncate(path: Path, keep: int) -> None:
    path.write_bytes(path.read_bytes()[:keep])


def edit_json(path: Path, edit: Callable[[dict[str, Any]], object]) -> None:
    data = json.loads(path.read_text())
    result = edit(data)
    path.write_text(json.dumps(data if result is None else result))


def edit_weight_map(d: Path, edit: Callable[[dict[str, str]], object]) -> None:
    def apply(index: dict[str, Any]) -> None:
        wm = index["weight_map"]
        assert isinstance(wm, dict)
        edit(wm)

    edit_json(d / INDEX, apply)


# ---------------------------------------------------------------------- damages
def _flip_header_byte(d: Path) -> None:
    data = bytearray((d / SINGLE).read_bytes())
    data[8] = ord("[")  # the header's opening brace: no longer a JSON object
    (d / SINGLE).write_bytes(bytes(data))


def _header_len(value: int) -> Callable[[Path], None]:
    def apply(d: Path) -> None:
        data = (d / SINGLE).read_bytes()
        (d / SINGLE).write_bytes(struct.pack("<Q", value) + data[8:])

    return apply


def _offsets_past_end(d: Path) -> None:
    def edit(header: dict[str, Any]) -> None:
        tensors = [k for k in header if k != "__metadata__"]
        last = max(tensors, key=lambda k: int(header[k]["data_offsets"][1]))
        begin, end = (int(x) for x in header[last]["data_offsets"])
        header[last]["data_offsets"] = [begin + 4096, end + 4096]

    edit_header(d / SINGLE, edit)


def _dtype_code(code: str) -> Callable[[Path], None]:
    def apply(d: Path) -> None:
        def edit(header: dict[str, Any]) -> None:
            header["model.norm.weight"]["dtype"] = code

        edit_header(d / SINGLE, edit)

    return apply


def _duplicate_across_shards(d: Path) -> None:
    extra = load_file(str(d / ATTN1_SHARD))[Q1]
    tensors = load_file(str(d / LAYER1_SHARD))
    tensors[Q1] = extra
    save_file(tensors, str(d / LAYER1_SHARD), metadata={"format": "pt"})


def _remove_tensor(d: Path, name: str) -> None:
    rewrite_tensor(d / LAYER1_SHARD, name, None)
    edit_weight_map(d, lambda wm: wm.pop(name))


def _config(edit: Callable[[dict[str, Any]], None]) -> Callable[[Path], None]:
    return lambda d: edit_json(d / "config.json", edit)


def _drop(key: str) -> Callable[[dict[str, Any]], None]:
    def apply(config: dict[str, Any]) -> None:
        del config[key]

    return apply


def _set(key: str, value: object) -> Callable[[dict[str, Any]], None]:
    def apply(config: dict[str, Any]) -> None:
        config[key] = value

    return apply


def _write(name: str, data: bytes) -> Callable[[Path], None]:
    def apply(d: Path) -> None:
        (d / name).write_bytes(data)

    return apply


def _deep_config(d: Path) -> None:
    (d / "config.json").write_text(
        '{"model_type": "llama", "x": ' + "[" * 100_000 + "]" * 100_000 + "}"
    )


def _config_dir(d: Path) -> None:
    (d / "config.json").unlink()
    (d / "config.json").mkdir()


def _only_config(d: Path) -> None:
    (d / SINGLE).unlink()


def _no_tensors(d: Path) -> None:
    save_file({}, str(d / SINGLE), metadata={"format": "pt"})


@dataclass(frozen=True)
class Damage:
    label: str
    base: str  # "single" or "sharded"
    apply: Callable[[Path], None]
    error: type[NexusSLIError]
    fragments: tuple[str, ...]  # each must appear in the message


DAMAGES = [
    # safetensors files
    Damage("truncated-file", "single", lambda d: truncate(d / SINGLE, (d / SINGLE).stat().st_size - 64),
           CheckpointError, (SINGLE, "truncated")),
    Damage("truncated-shard", "sharded", lambda d: truncate(d / LAYER1_SHARD, (d / LAYER1_SHARD).stat().st_size // 2),
           CheckpointError, (LAYER1_SHARD,)),
    Damage("truncated-to-4-bytes", "single", lambda d: truncate(d / SINGLE, 4), CheckpointError, (SINGLE,)),
    Damage("empty-file", "single", lambda d: truncate(d / SINGLE, 0), CheckpointError, (SINGLE,)),
    Damage("header-not-an-object", "single", _flip_header_byte, CheckpointError, (SINGLE,)),
    Damage("header-length-past-end", "single", lambda d: _header_len((d / SINGLE).stat().st_size)(d),
           CheckpointError, (SINGLE,)),
    Damage("header-length-2**63", "single", _header_len(2**63), CheckpointError, (SINGLE,)),
    Damage("header-length-zero", "single", _header_len(0), CheckpointError, (SINGLE,)),
    Damage("offsets-past-end", "single", _offsets_past_end, CheckpointError, (SINGLE,)),
    Damage("unknown-dtype-code", "single", _dtype_code("Q7"), CheckpointError, (SINGLE,)),
    Damage("dtype-code-size-mismatch", "single", _dtype_code("F64"), CheckpointError, (SINGLE,)),
    Damage("no-tensors", "single", _no_tensors, CheckpointError, ("model.layers.0.",)),
    Damage("only-config", "single", _only_config, CheckpointError, ("no *.safetensors",)),
    # the index
    Damage("index-names-missing-shard", "sharded", lambda d: (d / LAYER1_SHARD).unlink(),
           CheckpointError, (INDEX, LAYER1_SHARD, "missing")),
    Damage("index-names-absent-tensor", "sharded",
           lambda d: edit_weight_map(d, lambda wm: wm.__setitem__("model.layers.0.extra.weight", LAYER1_SHARD)),
           CheckpointError, ("model.layers.0.extra.weight", LAYER1_SHARD)),
    Damage("index-puts-tensor-in-wrong-shard", "sharded",
           lambda d: edit_weight_map(d, lambda wm: wm.__setitem__(UP1, ATTN1_SHARD)),
           CheckpointError, (UP1, ATTN1_SHARD, LAYER1_SHARD)),
    Damage("index-not-json", "sharded", _write(INDEX, b"{weight_map: "), CheckpointError, (INDEX,)),
    Damage("index-weight-map-a-list", "sharded",
           lambda d: edit_json(d / INDEX, lambda i: {"weight_map": [1, 2]}), CheckpointError, (INDEX,)),
    Damage("index-without-weight-map", "sharded",
           lambda d: edit_json(d / INDEX, lambda i: {"metadata": {}}), CheckpointError, (INDEX,)),
    Damage("index-path-traversal", "sharded",
           lambda d: edit_weight_map(d, lambda wm: wm.__setitem__(UP1, "../" + LAYER1_SHARD)),
           CheckpointError, (INDEX, "../" + LAYER1_SHARD)),
    Damage("index-absolute-path", "sharded",
           lambda d: edit_weight_map(d, lambda wm: wm.__setitem__(UP1, str(d / LAYER1_SHARD))),
           CheckpointError, (INDEX,)),
    Damage("index-names-pickle", "sharded",
           lambda d: edit_weight_map(d, lambda wm: wm.__setitem__(UP1, "pytorch_model.bin")),
           CheckpointError, (INDEX, "pytorch_model.bin")),
    # tensors
    Damage("duplicate-tensor-across-shards", "sharded", _duplicate_across_shards,
           CheckpointError, (Q1, ATTN1_SHARD, LAYER1_SHARD)),
    Damage("wrong-shape", "sharded", lambda d: rewrite_tensor(d / LAYER1_SHARD, UP1, torch.zeros(3, 3)),
           TensorMismatchError, (UP1, LAYER1_SHARD, "[3, 3]")),
    Damage("wrong-rank", "sharded", lambda d: rewrite_tensor(d / LAYER1_SHARD, UP1, torch.zeros(64 * 32)),
           TensorMismatchError, (UP1, LAYER1_SHARD)),
    Damage("missing-tensor", "sharded", lambda d: _remove_tensor(d, UP1), TensorMismatchError,
           (UP1, "missing")),
    Damage("unexpected-tensor", "single",
           lambda d: rewrite_tensor(d / SINGLE, "model.layers.1.extra.weight", torch.zeros(2)),
           TensorMismatchError, ("model.layers.1.extra.weight", SINGLE)),
    # config.json
    Damage("config-not-json", "single", _write("config.json", b"{not json"), CheckpointError, ("config.json", "JSON")),
    Damage("config-empty", "single", _write("config.json", b""), CheckpointError, ("config.json",)),
    Damage("config-not-utf8", "single", _write("config.json", b'{"model_type": "\xff\xfe"}'),
           CheckpointError, ("config.json",)),
    Damage("config-a-list", "single", _write("config.json", b"[1, 2]"), CheckpointError, ("config.json",)),
    Damage("config-a-directory", "single", _config_dir, CheckpointError, ("config.json",)),
    Damage("config-no-model-type", "single", _config(_drop("model_type")), CheckpointError,
           ("config.json", "model_type")),
    Damage("config-model-type-not-str", "single", _config(_set("model_type", 7)), CheckpointError,
           ("config.json", "model_type")),
    Damage("config-hidden-size-a-string", "single", _config(_set("hidden_size", "wide")),
           CheckpointError, ("config.json", "hidden_size")),
    Damage("config-heads-zero", "single", _config(_set("num_attention_heads", 0)), CheckpointError,
           ("config.json",)),
    Damage("config-without-hidden-size", "single", _config(_drop("hidden_size")), TensorMismatchError,
           ("model.embed_tokens.weight", SINGLE)),
    Damage("config-without-num-layers", "single", _config(_drop("num_hidden_layers")),
           TensorMismatchError, ("model.layers.2.", "missing")),
    Damage("config-without-vocab-size", "single", _config(_drop("vocab_size")), TensorMismatchError,
           ("model.embed_tokens.weight", SINGLE)),
    Damage("config-wrong-architecture", "single", _config(_set("model_type", "gpt2")),
           CheckpointError, ("gpt",)),
]  # fmt: skip

# Config values transformers accepts but nexus_sli's layer builders crashed on (found by the
# config fuzz test): they escaped as KeyError / AssertionError / TypeError / RecursionError.
LEAKS = [
    Damage("config-hidden-act-unknown", "single", _config(_set("hidden_act", "swishy")),
           CheckpointError, ("config.json",)),
    Damage("config-rope-scaling-unknown", "single", _config(_set("rope_scaling", {"type": "bogus"})),
           CheckpointError, ("config.json",)),
    Damage("config-pad-token-past-vocab", "single", _config(_set("pad_token_id", 1000)),
           CheckpointError, ("config.json",)),
    Damage("config-hidden-size-10**30", "single", _config(_set("hidden_size", 10**30)),
           CheckpointError, ("config.json",)),
    Damage("config-nested-100000-deep", "single", _deep_config, CheckpointError, ("config.json",)),
]  # fmt: skip


def _attempt(model_dir: Path, act: Path) -> None:
    proc = UniversalSLIProcessor(model_dir, activation_dir=act, progress=False)
    proc.run(torch.ones(2, 3, dtype=torch.long))


def _check(damage: Damage, source: Path, tmp_path: Path) -> None:
    FIGURES["damaged checkpoints tried"] += 1
    d = tmp_path / "ckpt"
    shutil.copytree(source, d)
    damage.apply(d)
    act = tmp_path / "acts"
    with pytest.raises(NexusSLIError) as info:
        _attempt(d, act)
    exc = info.value
    assert isinstance(exc, damage.error), f"{type(exc).__name__}: {exc}"
    message = str(exc)
    for fragment in damage.fragments:
        assert fragment in message, f"{fragment!r} not in: {message}"
    # Known up front: no activation was written.
    stored = sorted(p.name for p in act.glob("*.safetensors")) if act.exists() else []
    assert stored == [], stored


@pytest.fixture
def bases(tiny_llama: Path, tiny_sharded: Path) -> dict[str, Path]:
    return {"single": tiny_llama, "sharded": tiny_sharded}


def test_shard_names_are_as_assumed(tiny_sharded: Path) -> None:
    wm = weight_map(tiny_sharded)
    assert wm[UP1] == LAYER1_SHARD and wm[Q1] == ATTN1_SHARD


@pytest.mark.parametrize("damage", DAMAGES, ids=[d.label for d in DAMAGES])
def test_damaged_checkpoint_is_refused_up_front(
    damage: Damage, bases: dict[str, Path], tmp_path: Path
) -> None:
    _check(damage, bases[damage.base], tmp_path)


# Regression test (bugs found by this suite): plan_run built modules from the config without
# wrapping the family's errors, so they escaped as KeyError / AssertionError / TypeError; and
# read_config_dict did not catch the RecursionError of a deeply nested config.json.
@pytest.mark.parametrize("damage", LEAKS, ids=[d.label for d in LEAKS])
def test_config_that_breaks_layer_building_is_refused(
    damage: Damage, bases: dict[str, Path], tmp_path: Path
) -> None:
    _check(damage, bases[damage.base], tmp_path)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int8, torch.bool], ids=str)
def test_wrong_dtype_is_named(dtype: torch.dtype, tiny_sharded: Path, tmp_path: Path) -> None:
    FIGURES["damaged checkpoints tried"] += 1
    d = tmp_path / "ckpt"
    shutil.copytree(tiny_sharded, d)
    rewrite_tensor(d / LAYER1_SHARD, UP1, torch.zeros(64, 32, dtype=dtype))
    with pytest.raises(TensorMismatchError) as info:
        _attempt(d, tmp_path / "acts")
    message = str(info.value)
    assert UP1 in message and LAYER1_SHARD in message and str(dtype) in message


# Regression test (bug found by this suite): a tensor of the wrong dtype (integer or bool where a
# float is expected) was only found by fill_module when its layer was loaded, after the
# embeddings and earlier layers were written: plan_run checked shapes, not dtypes.
def test_wrong_dtype_found_before_any_activation(tiny_sharded: Path, tmp_path: Path) -> None:
    damage = Damage(
        "wrong-dtype",
        "sharded",
        lambda d: rewrite_tensor(d / LAYER1_SHARD, UP1, torch.zeros(64, 32, dtype=torch.int32)),
        TensorMismatchError,
        (UP1, LAYER1_SHARD),
    )
    _check(damage, tiny_sharded, tmp_path)


def test_half_precision_tensor_in_float_checkpoint_is_accepted(
    tiny_llama: Path, tmp_path: Path
) -> None:
    """A float16 tensor among float32 ones is cast, as transformers' from_pretrained does."""
    d = tmp_path / "ckpt"
    shutil.copytree(tiny_llama, d)
    rewrite_tensor(d / SINGLE, UP1, load_file(str(d / SINGLE))[UP1].half())
    _attempt(d, tmp_path / "acts")


# Regression test (bug found by this suite): SafetensorsCheckpoint._files globbed *.safetensors
# without checking for regular files: a FIFO named model.safetensors made safe_open block
# forever, holding the GIL.
def test_fifo_instead_of_weights_does_not_hang(
    tiny_llama: Path, tmp_path: Path, zygote: Zygote, deep_inputs_file: Path
) -> None:
    """Run in a forked child: a hang inside safe_open holds the GIL, so no thread can time it out."""
    FIGURES["damaged checkpoints tried"] += 1
    d = tmp_path / "ckpt"
    d.mkdir()
    shutil.copy(tiny_llama / "config.json", d / "config.json")
    os.mkfifo(d / SINGLE)
    run = zygote.spawn(child_spec(d, tmp_path / "acts", deep_inputs_file), tmp_path)
    try:
        line = run.wait_for("ERROR ", timeout=20)
    finally:
        run.kill()
        run.finish()
    assert line.startswith("ERROR CheckpointError ") and SINGLE in line, line
