"""UniversalSLIProcessor end to end: equal to transformers, resumable, strict, bounded memory."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from _checkpoints import padded_batch, save_llama
from safetensors.torch import load_file, save_file
from torch import nn

from nexus_sli import (
    ActivationStoreError,
    CheckpointError,
    InputError,
    ResumeMismatchError,
    TensorMismatchError,
    UniversalSLIProcessor,
    UnknownLayerError,
    UnsupportedArchitectureError,
    get_registry,
)


def assert_close_masked(actual: torch.Tensor, expected: torch.Tensor, mask: torch.Tensor) -> None:
    keep = mask.bool()
    torch.testing.assert_close(actual[keep], expected[keep], rtol=1e-4, atol=1e-4)


def oracle(path: Path, ids: torch.Tensor, mask: torch.Tensor) -> Any:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, output_hidden_states=True)


@pytest.fixture(scope="module")
def sharded_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_llama(tmp_path_factory.mktemp("llama_sharded"), shard="60KB")


@pytest.mark.parametrize("left", [False, True], ids=["right-pad", "left-pad"])
@pytest.mark.parametrize("shard", [None, "60KB"], ids=["single", "sharded"])
def test_llama_equals_transformers(tmp_path: Path, left: bool, shard: str | None) -> None:
    path = save_llama(tmp_path / "ckpt", shard=shard)
    if shard:
        assert (path / "model.safetensors.index.json").exists()
    ids, mask = padded_batch(128, left=left)
    expected = oracle(path, ids, mask)
    proc = UniversalSLIProcessor(path, progress=False)
    for batch_size in (1, 3, 8):
        result = proc.run(
            ids, mask, batch_size=batch_size, output_hidden_states=True, output_logits=True
        )
        assert result.hidden_states is not None and result.logits is not None
        assert len(result.hidden_states) == len(expected.hidden_states)
        for got, want in zip(result.hidden_states, expected.hidden_states, strict=True):
            assert_close_masked(got, want, mask)
        assert_close_masked(result.last_hidden_state, expected.hidden_states[-1], mask)
        assert_close_masked(result.logits, expected.logits, mask)


def test_base_model_checkpoint(tmp_path: Path) -> None:
    from transformers import AutoModel

    path = save_llama(tmp_path / "base", head=False)
    ids, mask = padded_batch(128, left=False)
    want = AutoModel.from_pretrained(path)(input_ids=ids, attention_mask=mask)
    got = UniversalSLIProcessor(path, progress=False).run(ids, mask)
    assert_close_masked(got.last_hidden_state, want.last_hidden_state.detach(), mask)
    with pytest.raises(InputError, match="LM head"):
        UniversalSLIProcessor(path, progress=False).run(ids, mask, output_logits=True)


class ScratchAttention(nn.Module):
    """Grouped-query attention with rotary embeddings, written from scratch (no transformers)."""

    def __init__(self, config: Any, layer_idx: int) -> None:
        super().__init__()
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = config.hidden_size // self.heads
        self.q_proj = nn.Linear(config.hidden_size, self.heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, self.kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, self.kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.heads * self.head_dim, config.hidden_size, bias=False)

    @staticmethod
    def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        assert attention_mask is not None and position_embeddings is not None
        b, t, _ = hidden_states.shape
        q = self.q_proj(hidden_states).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(hidden_states).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(hidden_states).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = (p.unsqueeze(1) for p in position_embeddings)
        q, k = self.rotate(q, cos, sin), self.rotate(k, cos, sin)
        k = k.repeat_interleave(self.heads // self.kv_heads, dim=1)
        v = v.repeat_interleave(self.heads // self.kv_heads, dim=1)
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim) + attention_mask
        out = torch.softmax(scores, dim=-1) @ v
        projected: torch.Tensor = self.o_proj(out.transpose(1, 2).reshape(b, t, -1))
        return projected


@pytest.mark.parametrize("left", [False, True], ids=["right-pad", "left-pad"])
def test_custom_attention_reproduces_llama(sharded_llama: Path, left: bool) -> None:
    registry = get_registry()
    registry.register_custom_layer("custom_attn", ScratchAttention)
    ids, mask = padded_batch(128, left=left)
    expected = oracle(sharded_llama, ids, mask)
    proc = UniversalSLIProcessor(
        model_name=str(sharded_llama),
        custom_layer_overrides={"attention": "custom_attn"},
        progress=False,
    )
    result = proc.run(ids, mask, batch_size=2, output_hidden_states=True)
    assert result.hidden_states is not None
    for got, want in zip(result.hidden_states, expected.hidden_states, strict=True):
        assert_close_masked(got, want, mask)


def test_seed_integration_example(sharded_llama: Path) -> None:
    registry = get_registry()
    registry.register_custom_layer("custom_attn", ScratchAttention)
    processor = UniversalSLIProcessor(
        model_name=str(sharded_llama), custom_layer_overrides={"attention": "custom_attn"}
    )
    assert processor.family.family_id == "llama"


def test_unknown_override_fails_before_work(sharded_llama: Path) -> None:
    with pytest.raises(UnknownLayerError, match="no custom layer registered as 'custom_atn'"):
        UniversalSLIProcessor(sharded_llama, custom_layer_overrides={"attention": "custom_atn"})
    with pytest.raises(InputError, match="unknown role 'attn'"):
        UniversalSLIProcessor(sharded_llama, custom_layer_overrides={"attn": "custom_attn"})


def test_resume_after_partial_run(sharded_llama: Path, tmp_path: Path) -> None:
    ids, mask = padded_batch(128, left=False)
    act = tmp_path / "acts"
    full = UniversalSLIProcessor(sharded_llama, activation_dir=act, progress=False).run(
        ids, mask, output_hidden_states=True
    )
    assert sorted(p.name for p in act.iterdir()) == [
        ".lock",
        "embeddings.safetensors",
        "layer_00000.safetensors",
        "layer_00001.safetensors",
        "layer_00002.safetensors",
        "manifest.json",
    ]
    (act / "layer_00002.safetensors").unlink()  # as if killed before the last layer finished
    (act / "layer_00002.safetensors.tmp-999").write_bytes(b"partial")
    again = UniversalSLIProcessor(sharded_llama, activation_dir=act, progress=False).run(
        ids, mask, output_hidden_states=True, resume=True
    )
    assert again.stats.layers_resumed == 2 and again.stats.layers_run == 1
    assert torch.equal(again.last_hidden_state, full.last_hidden_state)
    assert full.hidden_states is not None and again.hidden_states is not None
    for a, b in zip(full.hidden_states, again.hidden_states, strict=True):
        assert torch.equal(a, b)
    with pytest.raises(ResumeMismatchError, match="other inputs"):
        UniversalSLIProcessor(sharded_llama, activation_dir=act, progress=False).run(
            ids[:2], mask[:2], resume=True
        )


def test_resume_refuses_other_checkpoint(sharded_llama: Path, tmp_path: Path) -> None:
    ids, mask = padded_batch(128, left=False)
    act = tmp_path / "acts"
    UniversalSLIProcessor(sharded_llama, activation_dir=act, progress=False).run(ids, mask)
    other = save_llama(tmp_path / "other", seed=5)
    with pytest.raises(ResumeMismatchError, match="another checkpoint"):
        UniversalSLIProcessor(other, activation_dir=act, progress=False).run(ids, mask, resume=True)


def test_activation_dir_with_foreign_file_refused(sharded_llama: Path, tmp_path: Path) -> None:
    act = tmp_path / "acts"
    act.mkdir()
    (act / "evil.pt").write_bytes(b"not really a pickle")
    ids, mask = padded_batch(128, left=False)
    with pytest.raises(ActivationStoreError, match=r"'evil\.pt', which nexus_sli did not write"):
        UniversalSLIProcessor(sharded_llama, activation_dir=act, progress=False).run(ids, mask)


@pytest.mark.parametrize(
    ("ids", "mask", "match"),
    [
        (torch.zeros(4, dtype=torch.long), None, "2-D"),
        (torch.zeros(2, 3), None, "integers"),
        (torch.full((2, 3), 500), None, r"\[0, 128\)"),
        (torch.full((2, 3), -1), None, r"\[0, 128\)"),
        (torch.ones(2, 3, dtype=torch.long), torch.ones(2, 4, dtype=torch.long), "must match"),
        (torch.ones(2, 3, dtype=torch.long), torch.full((2, 3), 2), "only 0 and 1"),
        (torch.ones(2, 3, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long), "at least one"),
    ],
)
def test_bad_inputs(
    sharded_llama: Path, ids: torch.Tensor, mask: torch.Tensor | None, match: str
) -> None:
    with pytest.raises(InputError, match=match):
        UniversalSLIProcessor(sharded_llama, progress=False).run(ids, mask)


def test_missing_and_unexpected_and_misshaped_tensors(tmp_path: Path) -> None:
    path = save_llama(tmp_path / "ckpt")
    tensors = load_file(path / "model.safetensors")
    name = "model.layers.1.mlp.up_proj.weight"

    broken = dict(tensors)
    del broken[name]
    save_file(broken, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(TensorMismatchError, match=rf"'{name}' is missing"):
        UniversalSLIProcessor(path, progress=False).run(torch.ones(1, 3, dtype=torch.long))

    broken = dict(tensors)
    broken[name] = torch.zeros(3, 3)
    save_file(broken, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(TensorMismatchError, match=r"has shape \[3, 3\], expected \[128, 64\]"):
        UniversalSLIProcessor(path, progress=False).run(torch.ones(1, 3, dtype=torch.long))

    broken = dict(tensors)
    broken["model.layers.1.extra.weight"] = torch.zeros(2)
    save_file(broken, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(
        TensorMismatchError, match=r"unexpected tensors.*model\.layers\.1\.extra\.weight"
    ):
        UniversalSLIProcessor(path, progress=False).run(torch.ones(1, 3, dtype=torch.long))


def test_bad_directories(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        UniversalSLIProcessor(tmp_path / "nope")
    with pytest.raises(CheckpointError, match=r"no config\.json"):
        UniversalSLIProcessor(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        UniversalSLIProcessor(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "no_such_model"}))
    with pytest.raises(UnsupportedArchitectureError, match="no_such_model"):
        UniversalSLIProcessor(tmp_path)


def test_pickle_weights_never_loaded(tmp_path: Path) -> None:
    path = save_llama(tmp_path / "ckpt")
    (path / "model.safetensors").unlink()
    (path / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(CheckpointError, match=r"pickle weights.*never loads"):
        UniversalSLIProcessor(path)


def test_remote_code_refused(tmp_path: Path) -> None:
    path = save_llama(tmp_path / "ckpt")
    config = json.loads((path / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig"}
    (path / "config.json").write_text(json.dumps(config))
    marker = tmp_path / "imported"
    (path / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    with pytest.raises(ValueError, match=r"trust_remote_code=True"):
        UniversalSLIProcessor(path)
    assert not marker.exists()


@pytest.mark.slow
def test_peak_memory_about_two_layers(tmp_path: Path) -> None:
    """On a checkpoint 8 layers deep, the run's memory growth stays under ~3 layers' weights."""
    path = save_llama(
        tmp_path / "big",
        hidden_size=512,
        intermediate_size=2048,
        num_attention_heads=8,
        num_key_value_heads=8,
        num_hidden_layers=8,
        vocab_size=256,
        shard="20MB",
    )
    layer_bytes = (4 * 512 * 512 + 3 * 512 * 2048 + 2 * 512) * 4
    # VmHWM is this process's own high-water mark (ru_maxrss would include the forking parent);
    # writing 5 to clear_refs resets it to the current RSS just before the run.
    script = textwrap.dedent(
        f"""
        import torch
        from nexus_sli import UniversalSLIProcessor
        def status(key):
            with open("/proc/self/status") as fh:
                for line in fh:
                    if line.startswith(key):
                        return int(line.split()[1]) * 1024
        proc = UniversalSLIProcessor({str(path)!r}, progress=False)
        proc.run(torch.randint(3, 256, (1, 4)))  # warm up lazy imports and the allocator
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        before = status("VmRSS")
        proc.run(torch.randint(3, 256, (2, 16)))
        print(before, status("VmHWM"))
        """
    )
    out = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True)
    before, peak = (int(x) for x in out.stdout.split())
    growth = peak - before
    model_bytes = 8 * layer_bytes
    assert growth < 3 * layer_bytes, (growth / 2**20, layer_bytes / 2**20, model_bytes / 2**20)


def _save_word_level_tokenizer(path: Path, vocab_size: int, padding_side: str) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    vocab.update({f"w{i}": i for i in range(4, vocab_size)})
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        padding_side=padding_side,
    )
    tokenizer.save_pretrained(path)


@pytest.mark.parametrize("side", ["right", "left"])
def test_run_texts_pads_as_the_tokenizer_says(tmp_path: Path, side: str) -> None:
    path = save_llama(tmp_path / "ckpt")
    _save_word_level_tokenizer(path, 128, side)
    texts = ["w5 w6 w7 w8 w9", "w10 w11", "w12 w13 w14"]
    proc = UniversalSLIProcessor(path, progress=False)
    result = proc.run_texts(texts, batch_size=2, output_logits=True)
    mask = result.attention_mask
    assert mask.shape == (3, 5)
    if side == "left":
        assert mask[1].tolist() == [0, 0, 0, 1, 1]
    else:
        assert mask[1].tolist() == [1, 1, 0, 0, 0]
    from transformers import AutoTokenizer

    encoded = AutoTokenizer.from_pretrained(path)(texts, return_tensors="pt", padding=True)
    expected = oracle(path, encoded["input_ids"], encoded["attention_mask"])
    assert_close_masked(result.last_hidden_state, expected.hidden_states[-1], mask)
    assert result.logits is not None
    assert_close_masked(result.logits, expected.logits, mask)
    with pytest.raises(InputError, match="single string"):
        proc.run_texts("w5 w6")


def test_run_texts_without_tokenizer(tmp_path: Path) -> None:
    path = save_llama(tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match="no usable tokenizer"):
        UniversalSLIProcessor(path, progress=False).run_texts(["w5"])


def test_bfloat16_checkpoint_keeps_its_dtype(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    path = save_llama(tmp_path / "fp32")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    model.save_pretrained(tmp_path / "bf16")
    ids, mask = padded_batch(128, left=False)
    got = UniversalSLIProcessor(tmp_path / "bf16", progress=False).run(ids, mask)
    assert got.last_hidden_state.dtype == torch.bfloat16
    want = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16")
    with torch.no_grad():
        ref = want(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
    keep = mask.bool()
    torch.testing.assert_close(got.last_hidden_state[keep], ref[keep], rtol=2e-2, atol=2e-2)
