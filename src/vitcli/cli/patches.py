"""`vitcli patches`: how a ViT cuts an image into tokens, what it attends to, and the paper's Fig. 7."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from vitcli.cli.errors import fail, handled_errors
from vitcli.cli.options import DEFAULT_MODEL, JsonOpt, ModelOpt, WeightsOpt


class HeadFusion(str, Enum):
    mean = "mean"
    max = "max"
    min = "min"


def patches(
    image: Annotated[str, typer.Argument(
        help="An image file, or a folder: its first image is shown and --figure7 averages over up to "
             "--max-images of them.", show_default=False)],
    model: ModelOpt = DEFAULT_MODEL,
    weights: WeightsOpt = None,
    no_pretrained: Annotated[bool, typer.Option(
        "--no-pretrained", help="Random weights: explore an architecture without downloading anything.")] = False,
    img_size: Annotated[str | None, typer.Option(
        "--img-size", help="Input size the model is built for: 384, or HxW for non-square (e.g. 224x320); "
                           "position embeddings are resampled, the patch size is kept.")] = None,
    out: Annotated[Path | None, typer.Option(
        "--out", "-o", help="Folder for the PNGs (default: patches/IMAGE_STEM/).")] = None,
    attention: Annotated[bool, typer.Option(
        "--attention", help="CLS-to-patch attention per layer and head, attention rollout, and top-k predictions.")
    ] = False,
    layer: Annotated[list[int] | None, typer.Option(
        "--layer", help="Layer(s) to draw, 1..depth (repeatable; implies --attention; default: all).")] = None,
    head: Annotated[list[int] | None, typer.Option(
        "--head", help="Head(s) to draw, 1..heads (repeatable; implies --attention; default: all).")] = None,
    head_fusion: Annotated[HeadFusion, typer.Option(
        "--head-fusion", help="How rollout fuses the heads of a layer (mean is Abnar & Zuidema's).")
    ] = HeadFusion.mean,
    discard_ratio: Annotated[float, typer.Option(
        "--discard-ratio", min=0.0, max=0.99, help="Rollout: zero this share of the lowest attention weights "
                                                   "of each layer before adding the identity (0: none).")] = 0.0,
    top_k: Annotated[int, typer.Option("--top-k", "-k", min=1, help="Predictions to print with --attention.")] = 5,
    figure7: Annotated[bool, typer.Option(
        "--figure7", help="The ViT paper's Fig. 7: embedding-filter principal components, position-embedding "
                          "similarity, mean attention distance per head and depth.")] = False,
    components: Annotated[int, typer.Option(
        "--components", min=1, help="Principal components of the patch filters to show with --figure7.")] = 28,
    max_images: Annotated[int, typer.Option(
        "--max-images", min=1, help="Images of a folder averaged for the mean attention distance.")] = 128,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Images per forward pass.")] = 16,
    explain: Annotated[bool, typer.Option(
        "--explain", help="Why this class: gradient-weighted attention rollout (Chefer et al. 2021) beside plain "
                          "rollout, scored by token deletion and insertion against a random order.")] = False,
    class_: Annotated[str | None, typer.Option(
        "--class", help="Class to explain, by label or index (implies --explain; default: the top-1).",
        show_default=False)] = None,
    steps: Annotated[int, typer.Option(
        "--steps", min=1, help="Points on the deletion and insertion curves after the first (--explain).")] = 15,
    json_out: JsonOpt = False,
) -> None:
    """Show how a ViT cuts an image into patch tokens: the grid, the token sequence and the arithmetic.

    Example: vitcli patches cat.jpg --model deit_tiny_patch16_224 --attention --layer 12 --head 3

    Example: vitcli patches corgi.jpg --explain --class "Pembroke"

    Writes patches.png and tokens.png (with --attention also attention.png and rollout.png, with
    --explain explain.png and faithfulness.png, with --figure7 figure7.png) into --out. --json
    prints one JSON document with model, input_size, patch_size, grid, num_patches, prefix_tokens,
    sequence_length, embed_dim, depth, num_heads, files; --attention adds predictions and rollout,
    --explain predictions and explain (class, relevance, rollout, faithfulness with each curve's
    auc), --figure7 mean_attention_distance (pixels). Layers and heads are numbered from 1. CNNs
    have no tokens, and models without one token-to-token attention map cannot be explained: exit 2.
    """
    with handled_errors():
        from vitcli.explain.patches import PatchesOptions, explain_image

        options = PatchesOptions(
            model=model, weights=weights, pretrained=not no_pretrained, img_size=_parse_size(img_size), out_dir=out,
            attention=attention, layers=layer or None, heads=head or None, head_fusion=head_fusion.value,
            discard_ratio=discard_ratio, top_k=top_k, figure7=figure7, components=components,
            max_images=max_images, batch_size=batch_size, explain=explain or class_ is not None,
            explain_class=class_, steps=steps)
        report = explain_image(image, options)
        _render(report, json_out)


def _parse_size(text: str | None) -> int | tuple[int, int] | None:
    if text is None:
        return None
    parts = text.lower().replace("×", "x").split("x")
    if not all(p.strip().isdigit() and int(p) > 0 for p in parts) or len(parts) > 2:
        raise fail(f"--img-size '{text}' is not a size; give one number (384) or HEIGHTxWIDTH (224x320)", 2)
    sizes = [int(p) for p in parts]
    return sizes[0] if len(sizes) == 1 else (sizes[0], sizes[1])


def _render(report, json_out: bool) -> None:
    import json

    from rich.table import Table

    from vitcli.cli.render import escape
    from vitcli.console import err, out

    if json_out:
        out.out(json.dumps(report.to_json()), highlight=False)
        return
    t = report.layout
    table = Table(title=f"{escape(t.model)}: {escape(report.source)}", header_style="bold", title_justify="left")
    table.add_column("stage")
    table.add_column("tokens x values", justify="right")
    table.add_column("what happens", overflow="fold")
    table.add_column("params", justify="right")
    for stage in t.stages:
        table.add_row(stage.name, stage.shape, escape(stage.detail), f"{stage.params:,}" if stage.params else "",
                      end_section=stage.name in ("head", "input"))
    out.print(table)
    if report.predictions:
        preds = Table(title="predictions", header_style="bold", title_justify="left")
        for name, justify in (("#", "right"), ("label", "left"), ("prob", "right")):
            preds.add_column(name, justify=justify)
        for p in report.predictions:
            preds.add_row(str(p.rank), escape(p.label), f"{p.prob:.4f}")
        out.print(preds)
    if report.explained is not None:
        _render_explained(report, out)
    if report.mean_attention_distance:
        rows = report.mean_attention_distance
        means = ", ".join(f"{sum(r) / len(r):.0f}" for r in rows)
        out.print(f"mean attention distance by layer (px, mean of heads, {report.images_averaged} images): {means}")
    for note in report.notes:
        err.print(f"note: {escape(note)}", highlight=False)
    out.print("wrote " + ", ".join(escape(str(f)) for f in report.files), highlight=False)


def _render_explained(report, out) -> None:
    from rich.table import Table

    from vitcli.cli.render import escape

    e = report.explained
    label = escape(report.explained_label)
    out.print(f"explained class: {label} (index {e.target}, p = {e.probability:.4f})", highlight=False)
    if e.curves is None:
        return
    names = {"gradient_rollout": "gradient rollout", "rollout": "rollout", "random": f"random ({e.curves.seeds} seeds)"}
    table = Table(title=f"faithfulness: probability of {label} as patch tokens are deleted or inserted "
                        f"({len(e.curves.fractions) - 1} steps)", header_style="bold", title_justify="left",
                  caption="faithful maps: low deletion AUC, high insertion AUC", caption_justify="left")
    table.add_column("map")
    table.add_column("deletion AUC", justify="right")
    table.add_column("insertion AUC", justify="right")
    deletion, insertion = e.curves.auc("deletion"), e.curves.auc("insertion")
    for method, area in deletion.items():
        table.add_row(names.get(method, method), f"{area:.3f}", f"{insertion[method]:.3f}")
    out.print(table)
