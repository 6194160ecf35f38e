"""vitcli.explain.relevance: gradient-weighted rollout (Chefer et al. 2021) and --class resolution."""

from __future__ import annotations

import pytest
import torch

from vitcli.errors import AttentionUnavailableError, UsageError
from vitcli.explain.attention import unfused_attention
from vitcli.explain.relevance import class_index, gradient_rollout, relevance_step


def decisive_model(hot: int, grid: int = 4, patch: int = 8, dim: int = 8) -> torch.nn.Module:
    """A 2-block ViT whose class 0 logit reads one feature that only patch ``hot`` carries.

    Patch embeddings are zero, so the image does not matter; the position embedding of patch ``hot``
    alone has feature 0. Queries and keys are zero (every attention row is uniform, so plain rollout
    is flat), values and projections are the identity, MLPs add nothing, and the head reads feature 0:
    +5 for class 0, -5 for class 1. Without that patch the model says class 1.
    """
    from timm.models.vision_transformer import VisionTransformer

    with unfused_attention():
        model = VisionTransformer(img_size=grid * patch, patch_size=patch, embed_dim=dim, depth=2, num_heads=2,
                                  num_classes=2, mlp_ratio=1.0).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        for norm in [model.norm, *(b.norm1 for b in model.blocks), *(b.norm2 for b in model.blocks)]:
            norm.weight.fill_(1.0)
        model.cls_token[0, 0, 1] = 1.0
        model.pos_embed[0, 1 + hot, 0] = 10.0
        for block in model.blocks:
            block.attn.qkv.weight[2 * dim:] = torch.eye(dim)  # v = x
            block.attn.proj.weight.copy_(torch.eye(dim))
        model.head.weight[0, 0], model.head.weight[1, 0] = 5.0, -5.0
    return model


@pytest.mark.parametrize("hot", [0, 9, 15])
def test_the_gradient_map_ranks_the_one_decisive_patch_first_where_plain_rollout_is_flat(hot):
    model = decisive_model(hot)
    x = torch.randn(1, 3, 32, 32)

    r = gradient_rollout(model, x)
    gradient_map, rollout_map = r.patch_maps(1, (0,))

    assert int(r.target[0]) == 0 and r.logits[0].softmax(-1)[0] > 0.99
    assert int(gradient_map[0].argmax()) == hot
    others = torch.cat([gradient_map[0, :hot], gradient_map[0, hot + 1:]])
    assert gradient_map[0, hot] > 5 * others.max()
    assert torch.allclose(rollout_map[0], torch.full((16,), 1 / 16))  # class-blind: all patches alike
    assert gradient_map.sum().item() == pytest.approx(1.0, abs=1e-5)


def test_the_rule_is_identity_plus_relu_grad_times_attention_averaged_over_heads():
    attn = torch.tensor([[[[0.5, 0.5], [0.2, 0.8]], [[1.0, 0.0], [0.4, 0.6]]]])  # (1, h=2, 2, 2)
    grad = torch.tensor([[[[2.0, -1.0], [1.0, 1.0]], [[0.5, 3.0], [-2.0, 1.0]]]])
    cam = torch.tensor([[[(1.0 + 0.5) / 2, (0.0 + 0.0) / 2], [(0.2 + 0.0) / 2, (0.8 + 0.6) / 2]]])
    eye = torch.eye(2)[None]

    first = relevance_step(eye, attn, grad)
    second = relevance_step(first, attn, grad)

    assert torch.allclose(first, eye + cam)
    assert torch.allclose(second, first + cam @ first)


def test_the_map_depends_on_the_class_and_plain_rollout_does_not():
    import timm

    torch.manual_seed(0)
    with unfused_attention():
        model = timm.create_model("test_vit", pretrained=False, num_classes=3).eval()
    x = torch.randn(1, 3, 160, 160)

    maps = [gradient_rollout(model, x, c).patch_maps(1, (0,)) for c in (0, 1)]

    assert not torch.allclose(maps[0][0], maps[1][0], atol=1e-4)
    assert torch.equal(maps[0][1], maps[1][1])
    assert all(p.grad is None for p in model.parameters())  # autograd.grad: no .grad left behind


def test_a_batch_gets_one_target_per_image_and_matches_single_images():
    import timm

    torch.manual_seed(1)
    with unfused_attention():
        model = timm.create_model("test_vit", pretrained=False, num_classes=3).eval()
    x = torch.randn(2, 3, 160, 160)

    both = gradient_rollout(model, x, [2, 0])
    one = gradient_rollout(model, x[1:], 0)

    assert both.target.tolist() == [2, 0]
    assert torch.allclose(both.relevance[1], one.relevance[0], atol=1e-5)


def test_a_fused_attention_model_is_refused_with_the_reason():
    import timm

    model = timm.create_model("test_vit", pretrained=False).eval()  # fused: no weights to take
    if not any(getattr(b.attn, "fused_attn", False) for b in model.blocks):
        pytest.skip("this torch has no fused attention")
    with pytest.raises(AttentionUnavailableError, match="fused attention"):
        gradient_rollout(model, torch.randn(1, 3, 160, 160))


def test_a_backbone_without_a_classifier_head_is_refused():
    import timm

    with unfused_attention():
        model = timm.create_model("test_vit", pretrained=False, num_classes=0).eval()
    with pytest.raises(AttentionUnavailableError, match="without a classifier head"):
        gradient_rollout(model, torch.randn(1, 3, 160, 160))


def test_register_tokens_are_prefix_tokens_left_out_of_the_map():
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    with unfused_attention():
        model = VisionTransformer(img_size=32, patch_size=8, embed_dim=16, depth=2, num_heads=2, num_classes=3,
                                  reg_tokens=4).eval()
    r = gradient_rollout(model, torch.randn(1, 3, 32, 32), 1)
    gradient_map, _ = r.patch_maps(5, (0,))
    assert r.relevance.shape == (1, 21, 21) and gradient_map.shape == (1, 16)
    assert torch.allclose(gradient_map[0], r.relevance[0, 0, 5:] / r.relevance[0, 0, 5:].sum())


LABELS = ["tench", "goldfish", "great white shark", "crane", "golden retriever", "Labrador retriever", "crane"]


@pytest.mark.parametrize(("wanted", "index"), [("goldfish", 1), ("Golden Retriever", 4), (" 5 ", 5), ("0", 0)])
def test_class_by_label_in_any_case_or_by_index(wanted, index):
    assert class_index(wanted, LABELS) == index


def test_an_unknown_label_lists_the_closest_labels_with_their_indices():
    with pytest.raises(UsageError, match=r"unknown --class 'retriver'.*closest: 'golden retriever' \(4\), "
                                         r"'Labrador retriever' \(5\)"):
        class_index("retriver", LABELS)
    with pytest.raises(UsageError, match=r"closest: 'golden retriever' \(4\), 'Labrador retriever' \(5\)"):
        class_index("retriever", LABELS)  # a part of a label finds the labels holding it


def test_a_label_held_twice_names_both_indices_and_an_index_out_of_range_names_the_range():
    with pytest.raises(UsageError, match=r"'crane' names 2 classes \(3, 6\); give the index"):
        class_index("crane", LABELS)
    with pytest.raises(UsageError, match=r"--class 7 is out of range: the model has classes 0..6"):
        class_index("7", LABELS)
