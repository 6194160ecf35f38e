"""vitcli.explain.tokens: token counts for many ViTs, the true patch boundaries, parameters, Fig. 7 embeddings."""

from __future__ import annotations

import pytest
import timm
import torch

from vitcli.errors import NotATransformerError
from vitcli.explain.tokens import describe_tokens, embedding_components, position_similarity, require_token_model
from vitcli.models.resolve import load_model

SMALL = {"depth": 1}


def layout_of(name: str, img_size=None, **kwargs):
    """Through the resolver, as `vitcli patches --no-pretrained [--img-size]` builds it."""
    loaded = load_model(name, pretrained=False, img_size=img_size, **{**SMALL, **kwargs})
    return loaded, describe_tokens(loaded.model, loaded.data_config["input_size"], name)


@pytest.mark.parametrize(("name", "img_size", "kwargs", "patch", "grid", "prefix"), [
    ("vit_small_patch8_224", 64, {}, (8, 8), (8, 8), ["CLS"]),
    ("vit_small_patch14_dinov2", 98, {}, (14, 14), (7, 7), ["CLS"]),
    ("vit_small_patch14_reg4_dinov2", 56, {}, (14, 14), (4, 4), ["CLS", "REG1", "REG2", "REG3", "REG4"]),
    ("vit_tiny_patch16_224", None, {}, (16, 16), (14, 14), ["CLS"]),
    ("vit_base_patch32_224", 96, {"embed_dim": 64, "num_heads": 2}, (32, 32), (3, 3), ["CLS"]),
    ("deit_tiny_distilled_patch16_224", 64, {}, (16, 16), (4, 4), ["CLS", "DIST"]),
    ("vit_base_patch16_reg4_gap_256", 64, {"embed_dim": 64, "num_heads": 2}, (16, 16), (4, 4),
     ["REG1", "REG2", "REG3", "REG4"]),
    ("vit_tiny_patch16_224", (96, 128), {}, (16, 16), (6, 8), ["CLS"]),  # non-square
])
def test_token_counts(name, img_size, kwargs, patch, grid, prefix):
    loaded, t = layout_of(name, img_size, **kwargs)

    assert t.patch_size == patch and t.grid == grid and t.prefix_names == prefix
    assert t.num_patches == grid[0] * grid[1]
    assert t.sequence_length == len(prefix) + grid[0] * grid[1]
    assert t.patch_values == patch[0] * patch[1] * 3
    with torch.inference_mode():  # T is what the model really runs on
        tokens = loaded.model.forward_features(torch.randn(1, *loaded.data_config["input_size"]))
    assert tokens.shape[1] == t.sequence_length


def test_img_size_384_keeps_the_patch_and_grows_the_grid():
    _, base = layout_of("vit_tiny_patch16_224")
    loaded, big = layout_of("vit_tiny_patch16_224", 384)

    assert (base.grid, base.sequence_length) == ((14, 14), 197)
    assert (big.grid, big.sequence_length, big.patch_size) == ((24, 24), 577, (16, 16))
    assert loaded.model.pos_embed.shape[1] == 577  # position embeddings resampled to the new grid


def test_query_tokens_cls_distilled_and_pooled():
    assert layout_of("vit_tiny_patch16_224", 64)[1].query_tokens == (0,)
    assert layout_of("deit_tiny_distilled_patch16_224", 64)[1].query_tokens == (0, 1)
    _, gap = layout_of("vit_base_patch16_reg4_gap_256", 64, embed_dim=64, num_heads=2)
    assert gap.query_tokens == () and gap.registers == 4


def test_hybrid_cells_have_the_effective_stride():
    loaded, t = layout_of("vit_base_r50_s16_224", 64, embed_dim=64, num_heads=2)

    assert t.hybrid and t.patch_size == (16, 16) and t.grid == (4, 4) and t.sequence_length == 17
    assert "overlapping receptive fields" in t.stages[1].detail
    with pytest.raises(NotATransformerError, match="hybrid"):
        embedding_components(loaded.model)


def test_hybrid_stride_when_the_input_is_no_multiple_of_it():
    loaded, t = layout_of("vit_base_r50_s16_224", (72, 100), embed_dim=64, num_heads=2)

    assert t.patch_size == (16, 16) and t.grid == (5, 7)  # ResNet pads: ceil(72 / 16) x ceil(100 / 16)
    with torch.inference_mode():
        tokens = loaded.model.forward_features(torch.randn(1, 3, 72, 100))
    assert tokens.shape[1] == t.sequence_length == 36


@pytest.mark.parametrize(("name", "img_size"), [("vit_tiny_patch16_224", (48, 80)),
                                                ("vit_small_patch14_dinov2", 70)])
def test_patch_boxes_are_the_true_patch_boundaries(name, img_size):
    """Each token's embedding is the projection of exactly the pixels in its patch_box."""
    loaded, t = layout_of(name, img_size)
    embed = loaded.model.patch_embed
    x = torch.randn(1, *t.input_size)
    with torch.inference_mode():
        tokens = embed(x).reshape(1, -1, t.embed_dim)[0]  # (N, D), token order
        for index in (0, 1, t.grid[1], t.num_patches - 1, t.num_patches // 2):
            top, left, bottom, right = t.patch_box(index)
            assert (bottom - top, right - left) == t.patch_size
            pixels = x[0, :, top:bottom, left:right]
            expected = (embed.proj.weight * pixels).sum(dim=(1, 2, 3)) + embed.proj.bias
            torch.testing.assert_close(tokens[index], expected, rtol=1e-4, atol=1e-4)


def test_stage_parameters_add_up_to_the_model():
    loaded, t = layout_of("deit_tiny_distilled_patch16_224", 64)
    params = {s.name: s.params for s in t.stages}

    assert params["patch embedding"] == 16 * 16 * 3 * 192 + 192
    assert params["+ prefix tokens"] == 2 * 192 + 18 * 192  # cls, dist, pos_embed (2 + 16 rows)
    assert params["transformer"] == sum(p.numel() for p in loaded.model.blocks.parameters())
    assert sum(v for k, v in params.items() if k != "total") == params["total"]
    assert params["total"] == sum(p.numel() for p in loaded.model.parameters())


def test_cnns_are_refused():
    with torch.device("meta"):
        model = timm.create_model("resnet18", pretrained=False)

    with pytest.raises(NotATransformerError, match="convolutional network"):
        require_token_model(model, "resnet18")


def test_principal_components_are_orthonormal_and_ordered():
    loaded, _ = layout_of("vit_tiny_patch16_224", 64)
    components = embedding_components(loaded.model, 28)

    assert components.shape == (28, 3, 16, 16)
    flat = components.reshape(28, -1)
    torch.testing.assert_close(flat @ flat.T, torch.eye(28), atol=1e-4, rtol=0)
    weight = loaded.model.patch_embed.proj.weight.detach().reshape(192, -1)
    variance = ((weight - weight.mean(0)) @ flat.T).var(dim=0)
    assert torch.all(variance[:-1] >= variance[1:] - 1e-6)  # first component explains the most


@pytest.mark.parametrize(("name", "kwargs"), [("vit_tiny_patch16_224", {}),
                                              ("vit_base_patch16_reg4_gap_256", {"embed_dim": 64, "num_heads": 2})])
def test_position_similarity_self_is_one(name, kwargs):
    loaded, t = layout_of(name, 64, **kwargs)
    sim = position_similarity(loaded.model, t.grid)

    assert sim.shape == (4, 4, 4, 4)
    for i in range(4):
        for j in range(4):
            assert sim[i, j, i, j] == pytest.approx(1.0, abs=1e-5)
    assert sim.abs().max() <= 1.0 + 1e-5


def test_no_learned_position_embeddings_is_a_message():
    with torch.device("meta"):
        model = timm.create_model("vit_base_patch16_rope_reg1_gap_256", pretrained=False)

    with pytest.raises(NotATransformerError, match="no learned absolute position embeddings"):
        position_similarity(model, (16, 16))
