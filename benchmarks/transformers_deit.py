"""vitcli's DeiT-Tiny as a native transformers model, built offline, and a transformers "CLI" for timing.

    python benchmarks/transformers_deit.py MODEL_DIR FOLDER [--batch-size N]

As a module (``benchmarks/vs_transformers.py`` imports it): ``write_hub_folder`` lays the timm
``deit_tiny_patch16_224`` that vitcli ships out as the Hub's facebook/deit-tiny-patch16-224 is laid out: a
``ViTForImageClassification`` checkpoint (the key mapping of transformers' own conversion scripts,
models/vit/convert_vit_timm_to_pytorch.py and models/deit/convert_deit_timm_to_pytorch.py), its config
with the same 1000 ImageNet label names, and the Hub's preprocessor_config.json (DeiTImageProcessor:
squash to 256x256 bicubic, centre crop 224, ImageNet mean/std). ``load_hub_folder`` loads it as
``pipeline(model=...)`` would, and ``check_logits`` fails loudly unless the loaded model's logits equal
timm's on a real photo (max |diff| < 1e-3, as those scripts assert).

As a script: what a transformers user runs to classify a folder, from a model saved with
``save_pretrained``: import transformers, build the image-classification pipeline on the CPU, classify
every image file under FOLDER, print one JSON line per image. It imports nothing from vitcli, so its
start-up is transformers' own.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

# the Hub's facebook/deit-tiny-patch16-224/preprocessor_config.json: squash to 256x256 (bicubic), centre crop 224
HUB_PREPROCESSOR_CONFIG = {
    "crop_size": 224, "do_center_crop": True, "do_normalize": True, "do_resize": True,
    "feature_extractor_type": "DeiTFeatureExtractor", "image_mean": [0.485, 0.456, 0.406],
    "image_std": [0.229, 0.224, 0.225], "resample": 3, "size": 256,
}
# the suffixes `vitcli predict FOLDER` picks up (vitcli.io.inputs.IMAGE_EXTENSIONS), so both sides read the same files
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
LOGITS_TOLERANCE = 1e-3  # what transformers' conversion scripts assert


def image_files(folder: Path) -> list[str]:
    return [str(p) for p in sorted(folder.rglob("*")) if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]


def vit_config(timm_model: Any, labels: list[str]):
    """A ViTConfig with timm's DeiT-Tiny sizes, read from the model rather than assumed."""
    from transformers import ViTConfig

    block = timm_model.blocks[0]
    patch = timm_model.patch_embed
    return ViTConfig(
        hidden_size=timm_model.embed_dim, num_hidden_layers=len(timm_model.blocks),
        num_attention_heads=block.attn.num_heads, intermediate_size=block.mlp.fc1.out_features,
        image_size=patch.img_size[0], patch_size=patch.patch_size[0], layer_norm_eps=timm_model.norm.eps,
        hidden_act="gelu", qkv_bias=True, num_labels=len(labels),
        id2label=dict(enumerate(labels)), label2id={name: i for i, name in enumerate(labels)},
        architectures=["ViTForImageClassification"],
    )


def hub_state_dict(state: dict[str, Any], layers: int, hidden: int) -> dict[str, Any]:
    """timm ViT keys -> the keys of the Hub's ViT checkpoints (transformers' conversion scripts write these;
    transformers 5 renames them on load, as for any Hub model); qkv split into query, key, value."""
    state = dict(state)
    out: dict[str, Any] = {}
    for i in range(layers):
        src, dst = f"blocks.{i}.", f"vit.encoder.layer.{i}."
        for old, new in (("norm1", "layernorm_before"), ("norm2", "layernorm_after"),
                         ("attn.proj", "attention.output.dense"), ("mlp.fc1", "intermediate.dense"),
                         ("mlp.fc2", "output.dense")):
            for kind in ("weight", "bias"):
                out[f"{dst}{new}.{kind}"] = state.pop(f"{src}{old}.{kind}")
        for kind in ("weight", "bias"):
            qkv = state.pop(f"{src}attn.qkv.{kind}")  # (3 * hidden, ...) in the order q, k, v
            for j, name in enumerate(("query", "key", "value")):
                out[f"{dst}attention.attention.{name}.{kind}"] = qkv[j * hidden:(j + 1) * hidden]
    for old, new in (("cls_token", "vit.embeddings.cls_token"), ("pos_embed", "vit.embeddings.position_embeddings"),
                     ("patch_embed.proj.weight", "vit.embeddings.patch_embeddings.projection.weight"),
                     ("patch_embed.proj.bias", "vit.embeddings.patch_embeddings.projection.bias"),
                     ("norm.weight", "vit.layernorm.weight"), ("norm.bias", "vit.layernorm.bias"),
                     ("head.weight", "classifier.weight"), ("head.bias", "classifier.bias")):
        out[new] = state.pop(old)
    if state:
        raise SystemExit(f"the conversion left timm keys unmapped: {sorted(state)[:5]}")
    return {key: value.detach().clone().contiguous() for key, value in out.items()}


def write_hub_folder(timm_model: Any, labels: list[str], folder: Path) -> Path:
    """``folder`` laid out as the Hub's facebook/deit-tiny-patch16-224: config.json, model.safetensors
    (ViTForImageClassification), preprocessor_config.json; the weights are timm's."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    config = vit_config(timm_model, labels)
    config.save_pretrained(folder)
    state = hub_state_dict(timm_model.state_dict(), config.num_hidden_layers, config.hidden_size)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "preprocessor_config.json").write_text(json.dumps(HUB_PREPROCESSOR_CONFIG, indent=2))
    return folder


def load_hub_folder(folder: Path) -> tuple[Any, Any]:
    """(model, image processor) from ``folder`` as ``pipeline(model=...)`` loads them: fp32, eval, CPU.
    Exits if any weight is missing or left over (the conversion would be wrong)."""
    from transformers import AutoImageProcessor, ViTForImageClassification

    model, info = ViTForImageClassification.from_pretrained(folder, output_loading_info=True)
    bad = {kind: sorted(map(str, keys))[:5] for kind, keys in info.items()
           if kind in ("missing_keys", "unexpected_keys", "mismatched_keys") and keys}
    if bad:
        raise SystemExit(f"the converted checkpoint does not load cleanly: {bad}")
    return model.eval(), AutoImageProcessor.from_pretrained(folder)


def check_logits(timm_model: Any, hf_model: Any, processor: Any, photo: Path) -> float:
    """Max |logit difference| between timm and the converted model on ``photo``; exits unless < 1e-3."""
    import torch
    from PIL import Image

    with Image.open(photo) as im:
        pixels = processor(images=im.convert("RGB"), return_tensors="pt")["pixel_values"]
    with torch.inference_mode():
        theirs = hf_model(pixel_values=pixels).logits
        ours = timm_model.eval()(pixels)
    diff = float((theirs - ours).abs().max())
    if theirs.shape != ours.shape or not diff < LOGITS_TOLERANCE:
        raise SystemExit(f"the converted model disagrees with timm on {photo}: max |logit diff| {diff:.3g} "
                         f"(must be < {LOGITS_TOLERANCE}); the conversion is wrong")
    return diff


def classify_folder() -> None:
    parser = argparse.ArgumentParser(description="Classify a folder with a transformers pipeline (CPU).")
    parser.add_argument("model_dir", type=Path, help="a folder written by save_pretrained (model + processor)")
    parser.add_argument("folder", type=Path)
    parser.add_argument("--batch-size", type=int, default=None, help="the pipeline's batch_size (default: unset)")
    args = parser.parse_args()

    from transformers import pipeline

    classify = pipeline("image-classification", model=str(args.model_dir), device="cpu")
    files = image_files(args.folder)
    kwargs = {} if args.batch_size is None else {"batch_size": args.batch_size}
    for source, top in zip(files, classify(files, **kwargs), strict=True):
        sys.stdout.write(json.dumps({"source": source, "predictions": top}) + "\n")


if __name__ == "__main__":
    classify_folder()
