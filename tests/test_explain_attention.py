"""vitcli.explain.attention: capture under unfused attention, rollout (Abnar & Zuidema), mean attention distance."""

from __future__ import annotations

import pytest
import timm
import torch

from vitcli.errors import AttentionUnavailableError
from vitcli.explain.attention import (
    AttentionCapture,
    attention_modules,
    attention_rollout,
    discard_lowest,
    fuse_heads,
    mean_attention_distance,
    patch_distances,
    patch_share,
    rollout_step,
    unfused_attention,
)


def tiny_vit(name: str = "vit_tiny_patch16_224", **kwargs):
    torch.manual_seed(0)
    with unfused_attention():
        return timm.create_model(name, pretrained=False, img_size=64, depth=3, **kwargs).eval()


def random_attention(b: int, h: int, t: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, h, t, t, generator=g).softmax(dim=-1)


# ------------------------------------------------------------------------------------- capture


def test_captured_maps_exist_rows_sum_to_one_and_logits_equal_the_fused_model():
    torch.manual_seed(0)
    fused = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, depth=3).eval()
    assert all(b.attn.fused_attn for b in fused.blocks)  # the default this must work around
    unfused = tiny_vit()
    unfused.load_state_dict(fused.state_dict())
    x = torch.randn(2, 3, 64, 64)

    capture = AttentionCapture(unfused, prefix=1, query_tokens=(0,), keep_maps=True)
    with torch.inference_mode(), capture:
        logits = unfused(x)
    with torch.inference_mode():
        expected = fused(x)

    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    r = capture.result
    assert len(r.maps) == 3 and r.maps[0].shape == (2, 3, 17, 17)  # 4x4 patches + CLS, 3 heads
    for a in r.maps:
        torch.testing.assert_close(a.sum(dim=-1), torch.ones(2, 3, 17))
    assert len(r.query_attention) == 3 and r.query_attention[0].shape == (2, 3, 16)
    torch.testing.assert_close(r.query_attention[0].sum(-1), torch.ones(2, 3))
    torch.testing.assert_close(r.query_attention[1], patch_share(r.maps[1], 1, (0,)))


def test_unfused_attention_restores_timm_flag():
    from timm.layers import set_fused_attn, use_fused_attn

    assert use_fused_attn()  # timm's default where torch has scaled_dot_product_attention
    with unfused_attention():
        assert not use_fused_attn()
    assert use_fused_attn() and not use_fused_attn(experimental=True)

    set_fused_attn(True, experimental=True)
    try:
        with unfused_attention():
            assert not use_fused_attn(experimental=True)
        assert use_fused_attn(experimental=True)  # the experimental level comes back too
    finally:
        set_fused_attn(True)


def test_a_fused_model_is_refused_with_the_fix():
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, depth=1)

    with pytest.raises(AttentionUnavailableError, match="unfused_attention"):
        attention_modules(model)


def test_rollout_in_the_hook_equals_rollout_of_the_kept_maps():
    model = tiny_vit()
    x = torch.randn(1, 3, 64, 64)
    for fusion, discard in (("mean", 0.0), ("max", 0.5), ("min", 0.0)):
        capture = AttentionCapture(model, 1, (0,), keep_maps=True, head_fusion=fusion, discard_ratio=discard)
        with torch.inference_mode(), capture:
            model(x)
        torch.testing.assert_close(capture.result.rollout, attention_rollout(capture.result.maps, fusion, discard))


@pytest.mark.parametrize(("name", "reason"), [
    ("swin_tiny_patch4_window7_224", "windows"),
    ("xcit_nano_12_p16_224", "cross-covariance"),
    ("beit_base_patch16_224", "relative position bias"),
    ("vit_base_patch16_siglip_224", "attention-pool"),
])
def test_families_without_one_token_map_are_refused_with_the_reason(name, reason):
    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False)

    with pytest.raises(AttentionUnavailableError, match=reason):
        attention_modules(model)


# -------------------------------------------------------------------------------------- rollout


def test_rollout_is_abnar_and_zuidema_formula():
    a1, a2 = random_attention(1, 4, 5, seed=1), random_attention(1, 4, 5, seed=2)
    eye = torch.eye(5)

    def step(a):
        m = a.mean(dim=1) + eye
        return m / m.sum(dim=-1, keepdim=True)

    torch.testing.assert_close(attention_rollout([a1, a2]), step(a2) @ step(a1))


def test_rollout_of_identity_attention_is_the_identity():
    eye = torch.eye(10).expand(1, 3, 10, 10)

    torch.testing.assert_close(attention_rollout([eye] * 4), torch.eye(10)[None])


def test_rollout_of_uniform_attention_gives_a_uniform_patch_row():
    t, prefix = 10, 2
    uniform = torch.full((1, 3, t, t), 1.0 / t)

    rollout = attention_rollout([uniform] * 6)
    torch.testing.assert_close(rollout.sum(-1), torch.ones(1, t))
    share = patch_share(rollout, prefix, (0, 1))
    torch.testing.assert_close(share, torch.full((1, t - prefix), 1.0 / (t - prefix)))


def test_head_fusion_and_discard_ratio():
    a = random_attention(1, 3, 4)
    torch.testing.assert_close(fuse_heads(a, "max"), a.max(dim=1).values)
    torch.testing.assert_close(fuse_heads(a, "min"), a.min(dim=1).values)
    with pytest.raises(ValueError, match="mean, max, min"):
        fuse_heads(a, "median")

    fused = fuse_heads(a)
    kept = discard_lowest(fused, 0.5)
    assert int((kept == 0).sum()) == 8  # half of the 16 weights
    assert kept.max() == fused.max()
    assert torch.equal(discard_lowest(fused, 0.0), fused)


def test_rollout_step_rows_sum_to_one():
    running = rollout_step(None, fuse_heads(random_attention(2, 2, 6)))
    running = rollout_step(running, discard_lowest(fuse_heads(random_attention(2, 2, 6, seed=3)), 0.9))

    torch.testing.assert_close(running.sum(-1), torch.ones(2, 6))


def test_patch_share_reads_cls_cls_and_dist_or_the_patch_rows():
    a = random_attention(1, 1, 6)[:, 0]  # (1, T, T), T = 2 prefix + 4 patches

    cls = patch_share(a, 2, (0,))
    both = patch_share(a, 2, (0, 1))
    pooled = patch_share(a, 2, ())

    torch.testing.assert_close(cls, a[:, 0, 2:] / a[:, 0, 2:].sum())
    mean_rows = (a[:, 0] + a[:, 1]) / 2
    torch.testing.assert_close(both, mean_rows[:, 2:] / mean_rows[:, 2:].sum())
    patch_rows = a[:, 2:].mean(dim=1)
    torch.testing.assert_close(pooled, patch_rows[:, 2:] / patch_rows[:, 2:].sum())
    for share in (cls, both, pooled):
        assert share.shape == (1, 4)  # prefix (CLS, DIST or registers) columns are not in the map


# ------------------------------------------------------------------------------ attention distance


def test_patch_distances_in_pixels():
    d = patch_distances((2, 3), (16, 10))  # patches 16 px tall, 10 px wide

    assert d.shape == (6, 6)
    assert d[0, 1] == 10 and d[0, 3] == 16
    assert d[0, 5] == pytest.approx((16**2 + 20**2) ** 0.5)
    assert torch.all(d.diagonal() == 0)


def test_mean_distance_of_identity_attention_is_zero():
    distances = patch_distances((3, 3), (16, 16))
    eye = torch.eye(10).expand(2, 4, 10, 10)  # 1 prefix + 9 patches

    torch.testing.assert_close(mean_attention_distance(eye, distances, prefix=1), torch.zeros(2, 4))


def test_mean_distance_of_uniform_attention_is_the_mean_pairwise_distance():
    distances = patch_distances((3, 4), (16, 16))
    uniform = torch.full((1, 2, 13, 13), 1.0 / 13)  # some mass goes to the CLS column: renormalised away

    result = mean_attention_distance(uniform, distances, prefix=1)

    torch.testing.assert_close(result, torch.full((1, 2), float(distances.mean())))


def test_capture_computes_mean_distance_per_head():
    model = tiny_vit()
    distances = patch_distances((4, 4), (16, 16))
    capture = AttentionCapture(model, 1, (0,), distances=distances, rollout=False, keep_maps=True)
    with torch.inference_mode(), capture:
        model(torch.randn(2, 3, 64, 64))

    r = capture.result
    assert r.rollout is None and len(r.mean_distance) == 3 and r.mean_distance[0].shape == (2, 3)
    torch.testing.assert_close(r.mean_distance[2], mean_attention_distance(r.maps[2], distances, 1))
