"""vitcli.explain.faithfulness: token deletion and insertion through timm's own ViT pieces."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from test_explain_relevance import decisive_model
from vitcli.errors import AttentionUnavailableError
from vitcli.explain.attention import unfused_attention
from vitcli.explain.faithfulness import (
    deletion_insertion,
    embed_tokens,
    explain_class,
    forward_tokens,
    rank_patches,
    trapezoid,
)

REPO = Path(__file__).resolve().parents[1]


def tiny_vit(seed: int = 0, **kwargs) -> torch.nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(seed)
    args = {"img_size": 32, "patch_size": 8, "embed_dim": 16, "depth": 2, "num_heads": 2, "num_classes": 4, **kwargs}
    with unfused_attention():
        return VisionTransformer(**args).eval()


def prefix_only_probs(model: torch.nn.Module, batch: int = 1) -> torch.Tensor:
    """A forward of the prefix tokens alone, built by hand from the parameters (not through _pos_embed)."""
    prefix = [t.expand(batch, -1, -1) for t in (model.cls_token, model.reg_token) if t is not None]
    tokens = torch.cat(prefix, dim=1)
    if not model.no_embed_class:
        tokens = tokens + model.pos_embed[:, :tokens.shape[1]]
    with torch.no_grad():
        return model.head(model.norm(model.blocks(tokens))[:, 0]).softmax(dim=-1)


@pytest.mark.parametrize("kwargs", [{}, {"reg_tokens": 2, "no_embed_class": True}, {"img_size": (24, 40)}])
def test_deleting_every_patch_gives_the_prefix_only_probability_and_all_of_them_the_full_forward(kwargs):
    model = tiny_vit(**kwargs)
    x = torch.randn(1, 3, *(model.patch_embed.img_size))
    n = model.patch_embed.num_patches
    order = torch.randperm(n)

    curves = deletion_insertion(model, x, 2, {"some map": order}, prefix=model.num_prefix_tokens, steps=5)

    with torch.no_grad():
        full = model(x).softmax(dim=-1)[0, 2].item()
    alone = prefix_only_probs(model)[0, 2].item()
    for method in ("some map", "random"):
        assert curves.deletion[method][0] == pytest.approx(full, abs=1e-5)
        assert curves.deletion[method][-1] == pytest.approx(alone, abs=1e-5)
        assert curves.insertion[method][0] == pytest.approx(alone, abs=1e-5)
        assert curves.insertion[method][-1] == pytest.approx(full, abs=1e-5)
    assert abs(full - alone) > 1e-3  # the check above can tell the two apart
    assert curves.fractions == pytest.approx([0, 0.2, 0.4, 0.6, 0.8, 1.0])


def test_tokens_dropped_keep_their_position_embeddings():
    model = tiny_vit()
    x = torch.randn(1, 3, 32, 32)
    tokens = embed_tokens(model, x)  # (1, 17, D)
    with torch.no_grad():
        patches = model.patch_embed(x) + model.pos_embed[:, 1:]
        by_hand = torch.cat([patches[:, [3]], patches[:, [12]]], dim=1)  # patches 3 and 12, with their positions
        cls = model.cls_token + model.pos_embed[:, :1]
        manual = model.head(model.norm(model.blocks(torch.cat([cls, by_hand], dim=1)))[:, 0])
        ours = forward_tokens(model, tokens[:, [0, 1 + 3, 1 + 12]])
    assert torch.allclose(ours, manual, atol=1e-5)


def test_a_pooled_model_keeps_at_least_one_patch():
    model = tiny_vit(class_token=False, global_pool="avg")
    x = torch.randn(1, 3, 32, 32)

    curves = deletion_insertion(model, x, 0, {"m": torch.arange(16)}, prefix=0, steps=4)

    with torch.no_grad():
        last = model.forward_head(model.norm(model.blocks(embed_tokens(model, x)[:, [15]]))).softmax(-1)[0, 0]
    assert all(torch.isfinite(torch.tensor(v)).all() for v in (*curves.deletion.values(), *curves.insertion.values()))
    assert curves.deletion["m"][-1] == pytest.approx(last.item(), abs=1e-5)  # the lowest-ranked patch is left


def test_the_decisive_patch_deleted_first_drops_the_class_at_once():
    model = decisive_model(hot=6)
    x = torch.randn(1, 3, 32, 32)

    e = explain_class(model, x, 1, (0,), steps=16)

    deletion, insertion = e.curves.deletion, e.curves.insertion
    assert deletion["gradient_rollout"][1] < 0.05 < 0.99 < deletion["gradient_rollout"][0]
    assert insertion["gradient_rollout"][1] > 0.99
    auc_del, auc_ins = e.curves.auc("deletion"), e.curves.auc("insertion")
    assert auc_del["gradient_rollout"] < auc_del["random"] and auc_del["gradient_rollout"] < auc_del["rollout"]
    assert auc_ins["gradient_rollout"] > auc_ins["random"] and auc_ins["gradient_rollout"] > auc_ins["rollout"]


def test_auc_is_the_trapezoid_area_and_random_is_the_mean_of_the_seeds():
    assert trapezoid([0, 0.5, 1], [1, 1, 0]) == pytest.approx(0.75)
    model = tiny_vit(seed=3)
    x = torch.randn(1, 3, 32, 32)
    order = rank_patches(torch.rand(16))
    seeds = [deletion_insertion(model, x, 1, {}, prefix=1, steps=4, seeds=(s,)) for s in (0, 1, 2)]
    mixed = deletion_insertion(model, x, 1, {"m": order}, prefix=1, steps=4, seeds=(0, 1, 2))
    mean = torch.tensor([s.deletion["random"] for s in seeds]).mean(dim=0)
    assert torch.allclose(torch.tensor(mixed.deletion["random"]), mean, atol=1e-6)
    assert mixed.seeds == 3 and set(mixed.to_json()["deletion"]) == {"m", "random"}


def test_an_order_that_is_not_a_ranking_is_refused():
    model = tiny_vit()
    with pytest.raises(ValueError, match="not a ranking of the 16 patch tokens"):
        deletion_insertion(model, torch.randn(1, 3, 32, 32), 0, {"bad": torch.zeros(16)}, prefix=1)


def test_a_model_without_timms_vit_pieces_is_refused():
    model = tiny_vit()
    model.forward_head = None
    with pytest.raises(AttentionUnavailableError, match="has no forward_head"):
        deletion_insertion(model, torch.randn(1, 3, 32, 32), 0, {}, prefix=1)


@pytest.mark.slow
def test_on_the_example_photos_gradient_rollout_beats_rollout_beats_random():
    """The issue's ordering with the shipped DeiT-Tiny, predicted class, 15 steps, mean over examples/*.jpg."""
    from vitcli.explain.tokens import describe_tokens
    from vitcli.io.images import load_image
    from vitcli.io.transforms import eval_transform
    from vitcli.models.resolve import load_model

    with unfused_attention():
        loaded = load_model("deit_tiny_patch16_224", None, pretrained=True)
    assert loaded.source == "embedded"
    transform = eval_transform(loaded.data_config)
    totals = {"deletion": torch.zeros(3), "insertion": torch.zeros(3)}
    photos = sorted((REPO / "examples").glob("*.jpg"))
    for photo in photos:
        x = transform(load_image(str(photo))).unsqueeze(0)
        layout = describe_tokens(loaded.model, tuple(x.shape[1:]), loaded.name)
        curves = explain_class(loaded.model, x, layout.prefix_tokens, layout.query_tokens, steps=15).curves
        for kind, total in totals.items():
            auc = curves.auc(kind)
            total += torch.tensor([auc["gradient_rollout"], auc["rollout"], auc["random"]]) / len(photos)
    d, i = totals["deletion"].tolist(), totals["insertion"].tolist()
    assert len(photos) == 4
    assert d[0] < d[1] < d[2], d
    assert i[0] > i[1] > i[2], i
