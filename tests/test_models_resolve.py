"""vitcli.models.resolve: the one resolver for --model / --weights, labels, store, hub-offline behaviour."""

from __future__ import annotations

import os
import pickle
import time
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import timm
import torch

from conftest import TINY_LABELS
from vitcli.errors import (
    HubUnreachableError,
    ModelLoadError,
    UnknownModelError,
    UnsafeCheckpointError,
    UsageError,
    WeightsMismatchError,
)
from vitcli.models.folders import save_model_folder
from vitcli.models.hub import hub_reachable
from vitcli.models.names import check_arch
from vitcli.models.resolve import load_model
from vitcli.models.store import list_store, store_dir
from vitcli.models.weightfiles import load_weights, read_state_dict


@pytest.fixture(scope="module")
def source_vit() -> torch.nn.Module:
    """test_vit with its default 1000-class head and seeded random weights."""
    torch.manual_seed(1)
    return timm.create_model("test_vit", pretrained=False).eval()


@pytest.fixture(scope="module")
def batch() -> torch.Tensor:
    return torch.randn(2, 3, 160, 160, generator=torch.Generator().manual_seed(0))


def logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model.eval()(x)


# ------------------------------------------------------------------------------- model folders


def test_local_model_folder_loads_with_labels_and_data_config(tiny_model_dir, batch):
    loaded = load_model(str(tiny_model_dir))

    assert loaded.source == "local-dir"
    assert loaded.arch == "test_vit"
    assert loaded.labels == TINY_LABELS and loaded.num_classes == 3
    assert loaded.data_config["input_size"] == (3, 160, 160)
    assert not loaded.model.training
    stored = safetensors.torch.load_file(tiny_model_dir / "model.safetensors")
    state = loaded.model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in stored.items())
    # plain timm loads the same folder to the same model
    plain = timm.create_model(f"local-dir:{tiny_model_dir}", pretrained=True)
    torch.testing.assert_close(logits(loaded.model, batch), logits(plain, batch), rtol=0, atol=0)


def test_local_dir_prefix_is_accepted(tiny_model_dir):
    loaded = load_model(f"local-dir:{tiny_model_dir}")

    assert loaded.source == "local-dir" and loaded.labels == TINY_LABELS


def test_folder_without_config_is_a_usage_error(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")

    with pytest.raises(UsageError, match="has no config.json"):
        load_model(str(tmp_path))


def test_missing_folder_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        load_model(str(tmp_path / "runs" / "nope"))


def test_save_model_folder_replaces_an_existing_folder(tmp_path):
    torch.manual_seed(0)
    first = timm.create_model("test_vit", pretrained=False, num_classes=2)
    second = timm.create_model("test_vit", pretrained=False, num_classes=4)
    folder = tmp_path / "m"

    save_model_folder(first, folder, ["a", "b"])
    save_model_folder(second, folder, ["w", "x", "y", "z"])

    assert load_model(str(folder)).labels == ["w", "x", "y", "z"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temporary folders left behind


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


# ------------------------------------------------------------------------------- names and tags


def test_unknown_model_suggests_close_names():
    with pytest.raises(UnknownModelError, match="did you mean vit_base_patch16_224") as info:
        load_model("vit_bse_patch16_224")
    assert "unknown model 'vit_bse_patch16_224'" in str(info.value)


def test_unknown_model_with_no_close_match_points_to_list_models():
    with pytest.raises(UnknownModelError, match="list_models"):
        check_arch("zzzzqqqq")


def test_unknown_pretrained_tag_suggests_valid_tags():
    with pytest.raises(UnknownModelError, match="unknown pretrained tag 'augreg_in21k_ft_in1' ") as info:
        check_arch("vit_base_patch16_224.augreg_in21k_ft_in1")
    assert "vit_base_patch16_224.augreg_in21k_ft_in1k" in str(info.value)
    assert check_arch("vit_base_patch16_224.augreg2_in21k_ft_in1k") == "vit_base_patch16_224"


# ---------------------------------------------------------------------------------- weights store


def test_store_folder_loads_offline_by_name(tiny_model_dir):
    import shutil

    shutil.copytree(tiny_model_dir, store_dir() / "my_tiny")

    loaded = load_model("my_tiny")

    assert loaded.source == "store" and loaded.arch == "test_vit"
    assert loaded.labels == TINY_LABELS
    assert [e["name"] for e in list_store()] == ["my_tiny"]
    assert list_store()[0]["architecture"] == "test_vit" and list_store()[0]["num_classes"] == 3


def test_store_weights_file_loads_offline_by_name(source_vit, batch):
    store_dir().mkdir(parents=True)
    safetensors.torch.save_file(source_vit.state_dict(), store_dir() / "test_vit.safetensors")

    loaded = load_model("test_vit")

    assert loaded.source == "store"
    torch.testing.assert_close(logits(loaded.model, batch), logits(source_vit, batch), rtol=0, atol=0)
    assert list_store() == [{"name": "test_vit", "path": str(store_dir() / "test_vit.safetensors"),
                             "architecture": "test_vit", "num_classes": "?",
                             "bytes": (store_dir() / "test_vit.safetensors").stat().st_size}]


def test_store_dir_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("VITCLI_WEIGHTS", str(tmp_path / "elsewhere"))
    assert store_dir() == tmp_path / "elsewhere"
    monkeypatch.delenv("VITCLI_WEIGHTS")
    assert store_dir() == Path("weights")


# ------------------------------------------------------------------------------------ hub offline


@pytest.fixture
def unreachable_hub(tmp_path, monkeypatch):
    """A hub endpoint that refuses connections and an empty Hugging Face cache, online or not."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # discard port: nothing listens
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))


def test_hub_reachable_is_false_offline(unreachable_hub, monkeypatch):
    from huggingface_hub import constants

    assert hub_reachable(timeout=1.0) is False
    monkeypatch.setattr(constants, "ENDPOINT", "https://huggingface.co")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert hub_reachable(timeout=1.0) is False  # HF_HUB_OFFLINE=1 never probes


@pytest.mark.parametrize("offline_env", [False, True], ids=["unreachable", "HF_HUB_OFFLINE"])
def test_uncached_pretrained_model_fails_fast_when_the_hub_is_unreachable(unreachable_hub, monkeypatch,
                                                                            offline_env):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline_env)
    start = time.monotonic()
    with pytest.raises(HubUnreachableError) as info:
        load_model("vit_tiny_patch16_224")
    elapsed = time.monotonic() - start

    assert elapsed < 15
    message = str(info.value)
    assert "\n" not in message
    assert "'vit_tiny_patch16_224'" in message and "--weights" in message
    assert constants.HF_HUB_OFFLINE is offline_env  # the temporary offline switch is restored


def test_pretrained_false_needs_no_hub(unreachable_hub):
    loaded = load_model("test_vit", pretrained=False)

    assert loaded.source == "random" and loaded.num_classes == 1000


# ------------------------------------------------------------------------------------------ labels


def test_imagenet_sized_heads_get_imagenet_names():
    labels = load_model("test_vit", pretrained=False).labels

    assert len(labels) == 1000
    assert labels[0] == "tench" and labels[1] == "goldfish" and labels[985] == "daisy"


def test_other_head_sizes_without_stored_labels_get_class_n():
    assert load_model("test_vit", pretrained=False, num_classes=4).labels == [f"class_{i}" for i in range(4)]


def test_explicit_labels_win():
    assert load_model("test_vit", pretrained=False, num_classes=2, labels=["no", "yes"]).labels == ["no", "yes"]


# ------------------------------------------------------------------------------- any classifier


@pytest.mark.parametrize("name", ["test_resnet", "test_efficientnet", "test_convnext"])
def test_any_timm_classifier_loads_from_weights_files(tmp_path, name):
    torch.manual_seed(0)
    source = timm.create_model(name, pretrained=False, num_classes=3).eval()
    path = tmp_path / f"{name}.safetensors"
    safetensors.torch.save_file(source.state_dict(), path)

    loaded = load_model(name, weights=path, num_classes=3)

    x = torch.randn(1, *loaded.data_config["input_size"])
    torch.testing.assert_close(logits(loaded.model, x), logits(source, x), rtol=0, atol=0)
    assert loaded.labels == ["class_0", "class_1", "class_2"]


@pytest.mark.parametrize(("name", "kwargs", "patch"), [
    ("test_vit", {"patch_size": 32}, 32),
    ("test_vit", {"patch_size": 8, "img_size": 96, "dynamic_img_size": False}, 8),  # a new resolution
    ("vit_tiny_r_s16_p8_224", {}, 8),  # hybrid: ResNet stem, then 8x8 patches of its features
])
def test_vit_patch_sizes_and_hybrids(name, kwargs, patch):
    loaded = load_model(name, pretrained=False, num_classes=3, **kwargs)

    size = loaded.data_config["input_size"]
    assert loaded.model.patch_embed.patch_size == (patch, patch)
    side = kwargs.get("img_size", 160)  # test_vit is built for 160x160, the hybrid for 224x224
    assert size == (3, side, side) if name == "test_vit" else size == (3, 224, 224)
    out = logits(loaded.model, torch.randn(2, *size))
    assert tuple(out.shape) == (2, 3)


# ---------------------------------------------------------------------- hub ids and run folders


@pytest.mark.parametrize("name", ["hf-hub:timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k",
                                  "timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k"])
def test_hub_ids_reach_the_hub_not_the_folder_check(unreachable_hub, name):
    with pytest.raises(HubUnreachableError) as info:
        load_model(name)

    message = str(info.value)
    assert "'hf-hub:timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k'" in message
    assert "does not exist" not in message and "\n" not in message
    if not name.startswith("hf-hub:"):  # a plain org/name might have been meant as a folder: say it is not one
        assert "no local folder 'timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k'" in message


def test_an_org_slash_name_that_exists_locally_is_a_folder(tiny_model_dir, tmp_path, monkeypatch):
    import shutil

    shutil.copytree(tiny_model_dir, tmp_path / "org" / "tiny")
    monkeypatch.chdir(tmp_path)

    loaded = load_model("org/tiny")

    assert loaded.source == "local-dir" and loaded.labels == TINY_LABELS


@pytest.mark.parametrize("present", [("best", "last"), ("last",)])
def test_a_finetune_run_folder_stands_for_its_best_then_last_model(tiny_model_dir, tmp_path, present):
    import shutil

    run = tmp_path / "runs" / "finetune" / "exp"
    for sub in present:
        shutil.copytree(tiny_model_dir, run / sub)

    loaded = load_model(str(run))

    assert loaded.folder == run / present[0] and loaded.labels == TINY_LABELS


# ----------------------------------------------------------------------------------- hub probe


@pytest.fixture
def proxy_env(monkeypatch):
    """No proxy variables from the machine running the tests."""
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY", "http_proxy", "https_proxy",
                "all_proxy", "no_proxy"):
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


@pytest.fixture
def local_proxy():
    """An HTTP proxy on 127.0.0.1 that answers every request itself and records what it was asked."""
    import http.server
    import threading

    seen: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self):  # noqa: N802 (http.server's naming)
            seen.append(self.path)
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", seen
    server.shutdown()
    server.server_close()


def test_hub_probe_goes_through_the_users_proxy_and_honours_no_proxy(proxy_env, local_proxy):
    from huggingface_hub import constants

    proxy, seen = local_proxy
    proxy_env.setattr(constants, "HF_HUB_OFFLINE", False)
    proxy_env.setattr(constants, "ENDPOINT", "http://hub.invalid")  # .invalid never resolves (RFC 2606)
    assert hub_reachable(timeout=2.0) is False  # no proxy: the name does not resolve

    proxy_env.setenv("HTTP_PROXY", proxy)
    assert hub_reachable(timeout=2.0) is True
    assert seen == ["http://hub.invalid"]  # the proxy was asked for the hub, by absolute URL

    proxy_env.setenv("NO_PROXY", "hub.invalid")
    assert hub_reachable(timeout=2.0) is False
    assert len(seen) == 1


def test_hub_probe_keeps_its_deadline_when_the_dns_lookup_hangs(proxy_env):
    import socket

    from huggingface_hub import constants

    proxy_env.setattr(constants, "HF_HUB_OFFLINE", False)
    proxy_env.setattr(constants, "ENDPOINT", "https://hub.example")
    proxy_env.setattr(socket, "getaddrinfo", lambda *a, **k: time.sleep(5) or [])

    start = time.monotonic()
    assert hub_reachable(timeout=0.5) is False
    assert time.monotonic() - start < 1.5


def test_model_folders_are_readable_by_the_team_and_survive_an_interrupted_swap(tmp_path, monkeypatch):
    """save_model_folder: the umask's permissions (not mkdtemp's 0700), and an old folder is never lost."""
    import os
    import stat

    import timm

    from vitcli.models.folders import save_model_folder

    model = timm.create_model("test_vit", num_classes=2)
    old_mask = os.umask(0o022)
    try:
        folder = save_model_folder(model, tmp_path / "best", ["a", "b"])
    finally:
        os.umask(old_mask)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o755
    assert {stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir()} == {0o644}

    before = (folder / "model.safetensors").read_bytes()
    real, calls = Path.rename, []

    def rename(self, target):  # a second Ctrl-C between "best -> .best.old" and ".best.tmp -> best"
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, target)

    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(KeyboardInterrupt):
        save_model_folder(timm.create_model("test_vit", num_classes=2), folder, ["a", "b"])
    assert (folder / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]
