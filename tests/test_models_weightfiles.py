"""vitcli.models.weightfiles, through the resolver: .safetensors, .pth/.pt/.bin (never unpickled), JAX .npz, and
reports of what does not fit."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import timm
import torch

from vitcli.errors import (
    ModelLoadError,
    UnsafeCheckpointError,
    UsageError,
    WeightsMismatchError,
)
from vitcli.models.resolve import load_model
from vitcli.models.weightfiles import load_weights, read_state_dict


def logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model.eval()(x)


# -------------------------------------------------------------------------------- weight files


@pytest.mark.parametrize("wrap", ["plain", "model", "state_dict", "ddp"])
def test_pth_state_dict_loads_through_the_resolver(tmp_path, source_vit, batch, wrap):
    state = source_vit.state_dict()
    checkpoint = {
        "plain": state,
        "model": {"model": state, "epoch": 3, "optimizer": {}},
        "state_dict": {"state_dict": state, "args": {"lr": 0.1}},
        "ddp": {f"module.{k}": v for k, v in state.items()},
    }[wrap]
    path = tmp_path / "weights.pth"
    torch.save(checkpoint, path)

    loaded = load_model("test_vit", weights=path)

    assert loaded.source == "weights" and loaded.arch == "test_vit"
    torch.testing.assert_close(logits(loaded.model, batch), logits(source_vit, batch), rtol=0, atol=0)


def test_timm_training_checkpoint_with_argparse_namespace_loads(tmp_path, source_vit, batch):
    import argparse

    path = tmp_path / "last.pth"
    torch.save({"state_dict": source_vit.state_dict(), "args": argparse.Namespace(lr=0.1)}, path)

    loaded = load_model("test_vit", weights=path)

    torch.testing.assert_close(logits(loaded.model, batch), logits(source_vit, batch), rtol=0, atol=0)


def test_safetensors_loads_through_the_resolver(tmp_path, source_vit, batch):
    path = tmp_path / "weights.safetensors"
    safetensors.torch.save_file(source_vit.state_dict(), path)

    loaded = load_model("test_vit", weights=str(path))

    torch.testing.assert_close(logits(loaded.model, batch), logits(source_vit, batch), rtol=0, atol=0)
    assert loaded.labels[1] == "goldfish"


def jax_vit_npz(model: torch.nn.Module, path: Path) -> Path:
    """Write a timm ViT in the original JAX/Flax .npz layout (the inverse of timm's ``_load_weights``)."""
    w: dict[str, np.ndarray] = {}

    def put(key: str, t: torch.Tensor) -> None:
        w[key] = t.detach().cpu().numpy().copy()

    dim = model.embed_dim
    put("embedding/kernel", model.patch_embed.proj.weight.permute(2, 3, 1, 0))  # OIHW -> HWIO
    put("embedding/bias", model.patch_embed.proj.bias)
    put("cls", model.cls_token)  # (1, 1, D)
    put("Transformer/posembed_input/pos_embedding", model.pos_embed)  # (1, N+1, D)
    put("Transformer/encoder_norm/scale", model.norm.weight)
    put("Transformer/encoder_norm/bias", model.norm.bias)
    put("head/kernel", model.head.weight.T)
    put("head/bias", model.head.bias)
    for i, block in enumerate(model.blocks):
        p = f"Transformer/encoderblock_{i}/"
        mha = f"{p}MultiHeadDotProductAttention_1/"
        heads = block.attn.num_heads
        put(f"{p}LayerNorm_0/scale", block.norm1.weight)
        put(f"{p}LayerNorm_0/bias", block.norm1.bias)
        for name, weight, bias in zip(("query", "key", "value"), block.attn.qkv.weight.chunk(3),
                                      block.attn.qkv.bias.chunk(3), strict=True):
            put(f"{mha}{name}/kernel", weight.T.reshape(dim, heads, dim // heads))  # (D, heads, head_dim)
            put(f"{mha}{name}/bias", bias.reshape(heads, dim // heads))
        put(f"{mha}out/kernel", block.attn.proj.weight.reshape(dim, heads, dim // heads).permute(1, 2, 0))
        put(f"{mha}out/bias", block.attn.proj.bias)
        put(f"{p}LayerNorm_2/scale", block.norm2.weight)
        put(f"{p}LayerNorm_2/bias", block.norm2.bias)
        for r, fc in enumerate((block.mlp.fc1, block.mlp.fc2)):
            put(f"{p}MlpBlock_3/Dense_{r}/kernel", fc.weight.T)
            put(f"{p}MlpBlock_3/Dense_{r}/bias", fc.bias)
    np.savez(path, **w)
    return path


def test_jax_npz_loads_through_the_resolver(tmp_path, source_vit, batch):
    path = jax_vit_npz(source_vit, tmp_path / "ViT-test.npz")

    loaded = load_model("test_vit", weights=path)

    assert loaded.source == "weights"
    torch.testing.assert_close(logits(loaded.model, batch), logits(source_vit, batch), rtol=0, atol=1e-6)
    for key, value in source_vit.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], value), key


def test_npz_that_does_not_fit_is_a_weights_mismatch(tmp_path, source_vit):
    path = jax_vit_npz(source_vit, tmp_path / "ViT-test.npz")

    with pytest.raises(WeightsMismatchError, match="does not fit deit_tiny_patch16_224"):
        load_model("deit_tiny_patch16_224", weights=path)


def test_npz_for_a_non_vit_is_a_usage_error(tmp_path, source_vit):
    path = jax_vit_npz(source_vit, tmp_path / "ViT-test.npz")

    with pytest.raises(UsageError, match="ViT models only"):
        load_model("test_resnet", weights=path)


def test_weights_that_do_not_fit_name_the_first_mismatched_key(tmp_path, source_vit):
    path = tmp_path / "test_vit.safetensors"
    safetensors.torch.save_file(source_vit.state_dict(), path)

    with pytest.raises(WeightsMismatchError) as info:
        load_model("deit_tiny_patch16_224", weights=path)

    message = str(info.value)
    assert "does not fit deit_tiny_patch16_224" in message
    # cls_token is the model's first parameter; the message names it with both shapes
    assert message.index("cls_token has shape (1, 1, 64), model expects (1, 1, 192)") < message.index("pos_embed")
    assert "more)" in message and "\n" not in message


def test_weights_with_another_head_size_name_the_head(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "ten.safetensors"
    safetensors.torch.save_file(timm.create_model("test_vit", num_classes=10).state_dict(), path)

    with pytest.raises(WeightsMismatchError, match=r"head.weight has shape \(10, 64\), model expects \(1000, 64\)"):
        load_model("test_vit", weights=path)
    # a new head of another size is allowed when asked for
    assert load_model("test_vit", weights=path, num_classes=5).num_classes == 5


def test_headless_model_drops_the_head_of_the_weights_file(tmp_path, source_vit, batch):
    path = tmp_path / "with_head.safetensors"
    safetensors.torch.save_file(source_vit.state_dict(), path)  # has head.weight (1000, 64), head.bias

    loaded = load_model("test_vit", weights=path, num_classes=0)

    assert loaded.num_classes == 0 and loaded.model.num_classes == 0
    torch.testing.assert_close(logits(loaded.model, batch), source_vit.forward_head(
        source_vit.forward_features(batch), pre_logits=True).detach(), rtol=0, atol=0)
    # the direct call too: a headless model has nowhere to put a classifier
    headless = timm.create_model("test_vit", pretrained=False, num_classes=0)
    load_weights(headless, path)
    assert torch.equal(headless.state_dict()["cls_token"], source_vit.state_dict()["cls_token"])


def test_headless_model_still_names_mismatches_outside_the_head(tmp_path, source_vit):
    path = tmp_path / "test_vit.safetensors"
    state = source_vit.state_dict()
    safetensors.torch.save_file({k: v for k, v in state.items() if k != "norm.bias"}, path)

    with pytest.raises(WeightsMismatchError) as info:
        load_model("test_vit", weights=path, num_classes=0)
    assert "missing norm.bias (64,)" in str(info.value) and "unexpected head" not in str(info.value)
    with pytest.raises(WeightsMismatchError,
                       match=r"cls_token has shape \(1, 1, 64\), model expects \(1, 1, 192\)"):
        load_model("deit_tiny_patch16_224", weights=tmp_path / "test_vit.safetensors", num_classes=0)


def _write_malicious_pickles(tmp_path: Path, sentinel: Path) -> list[Path]:
    class Exploit:
        def __reduce__(self):
            return os.system, (f"touch {sentinel}",)

    zipped = tmp_path / "evil.pth"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "payload": Exploit()}, zipped)
    legacy = tmp_path / "evil_legacy.pt"
    with legacy.open("wb") as f:
        pickle.dump(Exploit(), f, protocol=2)
    return [zipped, legacy]


def test_malicious_pickle_is_refused_and_never_executed(tmp_path):
    sentinel = tmp_path / "SENTINEL"
    for path in _write_malicious_pickles(tmp_path, sentinel):
        with pytest.raises(UnsafeCheckpointError, match=r"refused to load .*\.system\)"):
            read_state_dict(path)
        with pytest.raises(UnsafeCheckpointError):
            load_model("test_vit", weights=path)
    assert not sentinel.exists()


def _truncated_and_corrupt_checkpoints(tmp_path: Path, model: torch.nn.Module) -> list[Path]:
    import io

    zipped, legacy = io.BytesIO(), io.BytesIO()
    torch.save(model.state_dict(), zipped)
    torch.save(model.state_dict(), legacy, _use_new_zipfile_serialization=False)
    files = {  # the first two raise pickle.UnpicklingError, as a refused global does
        "random.pth": np.random.default_rng(0).bytes(4096),
        "legacy_cut_in_a_global.pt": legacy.getvalue()[:200],  # cut inside "torch._utils\n_rebuild..."
        "half.pth": zipped.getvalue()[: len(zipped.getvalue()) // 2],  # a download cut short
        "legacy_half.pt": legacy.getvalue()[: len(legacy.getvalue()) // 2],
        "empty.pth": b"",
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    return [tmp_path / name for name in files]


def test_truncated_or_corrupt_checkpoints_are_not_called_unsafe(tmp_path, source_vit):
    for path in _truncated_and_corrupt_checkpoints(tmp_path, source_vit):
        with pytest.raises(ModelLoadError) as info:
            read_state_dict(path)

        assert not isinstance(info.value, UnsafeCheckpointError), path.name
        message = str(info.value)
        assert f"'{path}' is not a readable PyTorch checkpoint" in message and "\n" not in message
        assert "refused" not in message and "run code" not in message
        expected = "the file is empty (0 bytes)" if path.name == "empty.pth" else "the file is corrupt or truncated"
        assert expected in message, message


def test_unreadable_weight_files(tmp_path):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not safetensors at all")
    text = tmp_path / "notes.pth"
    text.write_text("hello")
    npy = tmp_path / "weights.h5"
    npy.write_bytes(b"\0")

    with pytest.raises(ModelLoadError, match="not a readable .safetensors file"):
        read_state_dict(garbage)
    with pytest.raises(ModelLoadError, match="not a readable PyTorch checkpoint"):
        read_state_dict(text)
    not_a_state_dict = tmp_path / "list.pt"
    torch.save([1, 2, 3], not_a_state_dict)
    with pytest.raises(ModelLoadError, match="holds no state dict of tensors"):
        read_state_dict(not_a_state_dict)
    with pytest.raises(UsageError, match="unsupported weights file"):
        read_state_dict(npy)
    with pytest.raises(UsageError, match="does not exist"):
        load_model("test_vit", weights=tmp_path / "missing.safetensors")


def test_a_weights_file_given_as_the_model_says_to_name_the_architecture(tmp_path, source_vit):
    path = tmp_path / "weights.safetensors"
    safetensors.torch.save_file(source_vit.state_dict(), path)

    with pytest.raises(UsageError, match="name its architecture too"):
        load_model(str(path))
