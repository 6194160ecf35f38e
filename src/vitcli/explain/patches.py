"""The `vitcli patches` job: load the model, preprocess as predict does, measure, draw. Never prints.

``explain_image(source, options)`` returns a ``PatchesReport`` with the token layout, the PNGs it
wrote and the numbers behind them (predictions, rollout, mean attention distance, and with
``explain`` the class map and its deletion/insertion scores).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vitcli.errors import ImageLoadError, NotATransformerError, UsageError
from vitcli.explain.attention import (
    HEAD_FUSIONS,
    AttentionCapture,
    attention_modules,
    patch_distances,
    patch_share,
    unfused_attention,
)
from vitcli.explain.faithfulness import DEFAULT_STEPS, require_token_pieces
from vitcli.explain.tokens import (
    TokenLayout,
    describe_tokens,
    embedding_components,
    position_similarity,
    require_token_model,
)
from vitcli.models.resolve import LoadedModel

DEFAULT_COMPONENTS = 28  # the paper shows the top 28 principal components
DEFAULT_MAX_IMAGES = 128  # the paper averages mean attention distance over 128 images


@dataclass
class PatchesOptions:
    """What ``vitcli patches`` was asked to do (layers and heads are 1-based, as in the paper's figures)."""

    model: str
    weights: Path | None = None
    pretrained: bool = True
    img_size: int | tuple[int, int] | None = None
    out_dir: Path | None = None
    attention: bool = False
    layers: list[int] | None = None
    heads: list[int] | None = None
    head_fusion: str = "mean"
    discard_ratio: float = 0.0
    top_k: int = 5
    figure7: bool = False
    components: int = DEFAULT_COMPONENTS
    max_images: int = DEFAULT_MAX_IMAGES
    batch_size: int = 16
    explain: bool = False
    explain_class: str | None = None  # a label or an index; None: the top-1
    steps: int = DEFAULT_STEPS


@dataclass
class PatchesReport:
    layout: TokenLayout
    source: str
    out_dir: Path
    files: list[Path] = field(default_factory=list)
    predictions: list[Any] | None = None  # vitcli.inference.predict.Label
    rollout: list[list[float]] | None = None  # (rows, cols), sums to 1
    mean_attention_distance: list[list[float]] | None = None  # L x h, input pixels
    images_averaged: int = 0
    notes: list[str] = field(default_factory=list)
    explained: Any = None  # vitcli.explain.faithfulness.ClassExplanation
    explained_label: str = ""

    def to_json(self) -> dict[str, Any]:
        t = self.layout
        doc: dict[str, Any] = {
            "model": t.model, "input_size": list(t.input_size), "patch_size": list(t.patch_size),
            "grid": list(t.grid), "num_patches": t.num_patches, "prefix_tokens": t.prefix_tokens,
            "prefix": t.prefix_names, "sequence_length": t.sequence_length, "embed_dim": t.embed_dim,
            "depth": t.depth, "num_heads": t.num_heads, "hybrid": t.hybrid,
            "params": {s.name: s.params for s in t.stages if s.params},
            "image": self.source, "files": [str(f) for f in self.files], "notes": self.notes,
        }
        if self.predictions is not None:
            doc["predictions"] = [vars(p) for p in self.predictions]
            doc["rollout"] = self.rollout
        if self.mean_attention_distance is not None:
            doc["mean_attention_distance"] = self.mean_attention_distance
            doc["images_averaged"] = self.images_averaged
        if self.explained is not None:
            e, grid = self.explained, self.layout.grid
            doc["explain"] = {
                "class": {"index": e.target, "label": self.explained_label, "prob": e.probability},
                "relevance": e.gradient_map.reshape(grid).tolist(), "rollout": e.rollout_map.reshape(grid).tolist(),
                "faithfulness": e.curves.to_json() if e.curves is not None else None}
        return doc


def default_out_dir(source: str) -> Path:
    """``patches/<image stem>/`` (``patches/<folder name>/`` for a folder)."""
    path = Path(source.rstrip("/"))
    return Path("patches") / (path.name if path.is_dir() else path.stem)


def image_sources(image: str, limit: int) -> list[str]:
    """The images an IMAGE argument names (a file, or the first ``limit`` of a folder), or ImageLoadError."""
    import itertools

    from vitcli.io.inputs import InputProblem, iter_inputs

    sources = []
    for item in itertools.islice(iter_inputs([image]), limit):  # a huge folder is walked only this far
        if isinstance(item, InputProblem):
            raise ImageLoadError(item.source, item.reason)
        sources.append(item)
    return sources


def explain_image(image: str, options: PatchesOptions) -> PatchesReport:
    """Run ``vitcli patches`` on IMAGE (a file, or a folder whose first image is shown)."""
    from vitcli.explain import figures
    from vitcli.io.images import load_image
    from vitcli.io.transforms import eval_transform

    _check_options(options)
    sources = image_sources(image, options.max_images if options.figure7 else 1)
    loaded = load_token_model(options)
    model = loaded.model
    x = eval_transform(loaded.data_config)(load_image(sources[0])).unsqueeze(0)  # (1, C, H, W)
    layout = describe_tokens(model, tuple(x.shape[1:]), loaded.name)
    layers, heads = _selection(options, layout)
    attention = options.attention or bool(options.layers or options.heads)  # --layer/--head ask for the maps
    if attention:
        attention_modules(model)  # a family without one token map is refused before anything is drawn
    target = _explain_target(model, loaded.labels, options) if options.explain else None
    pixels = figures.display_pixels(x[0], loaded.data_config)  # (H, W, 3) in [0, 1]
    report = PatchesReport(layout=layout, source=sources[0], out_dir=Path(options.out_dir or default_out_dir(image)))
    out = report.out_dir
    report.files += [figures.save_patch_grid(pixels, layout, out / "patches.png"),
                     figures.save_token_strip(pixels, layout, out / "tokens.png")]
    if layout.hybrid:
        report.notes.append(f"hybrid: each token is a cell of the ResNet feature map (stride {layout.patch_size[0]} "
                            "px); the cells' receptive fields overlap, so the grid shows strides, not disjoint inputs")
    if attention:
        _attention_views(model, loaded.labels, x, pixels, layout, layers, heads, options, report)
    if options.explain:
        _explain_view(model, loaded.labels, x, pixels, layout, target, options, report)
    if options.figure7:
        _figure7(model, loaded.data_config, sources, pixels, layout, options, report)
    return report


def load_token_model(options: PatchesOptions) -> LoadedModel:
    """``load_model`` with explicit attention weights; a CNN is refused before any weights are fetched."""
    import timm

    from vitcli.models.names import split_name
    from vitcli.models.resolve import load_model

    arch = split_name(options.model)[0]
    if timm.is_model(arch):
        try:
            with torch.device("meta"):  # the architecture alone: no memory, no download
                probe = timm.create_model(arch, pretrained=False)
        except Exception:  # an architecture that cannot be built on the meta device: the real build decides
            probe = None
        if probe is not None:
            require_token_model(probe, options.model)
    with unfused_attention():
        loaded = load_model(options.model, options.weights, pretrained=options.pretrained, img_size=options.img_size)
    require_token_model(loaded.model, options.model)
    grid = getattr(getattr(loaded.model, "patch_embed", None), "grid_size", None)
    if options.img_size is not None and grid is not None and min(grid) < 1:
        patch = getattr(loaded.model.patch_embed, "patch_size", "?")
        raise UsageError(f"--img-size {options.img_size} holds no patch of {options.model} (patches of {patch} "
                         "pixels); give a multiple of the patch size, e.g. 224")
    return loaded


def _check_options(options: PatchesOptions) -> None:
    if options.head_fusion not in HEAD_FUSIONS:
        raise UsageError(f"unknown --head-fusion '{options.head_fusion}'; use {', '.join(HEAD_FUSIONS)}")
    if options.steps < 1:
        raise UsageError(f"--steps {options.steps} is out of range; use 1 or more (e.g. {DEFAULT_STEPS})")
    if not 0.0 <= options.discard_ratio < 1.0:
        raise UsageError(f"--discard-ratio {options.discard_ratio} is out of range; use 0 <= ratio < 1 (e.g. 0.9)")


def _selection(options: PatchesOptions, layout: TokenLayout) -> tuple[list[int], list[int]]:
    """Validated 1-based layer and head numbers (all when none are given)."""
    def pick(values: list[int] | None, count: int, what: str) -> list[int]:
        if not values:
            return list(range(1, count + 1))
        bad = [v for v in values if not 1 <= v <= count]
        if bad:
            raise UsageError(f"--{what} {bad[0]} is out of range: {layout.model} has {what}s 1..{count}")
        return list(dict.fromkeys(values))

    return pick(options.layers, layout.depth, "layer"), pick(options.heads, layout.num_heads or 1, "head")


def _attention_views(model: torch.nn.Module, labels: list[str], x: torch.Tensor, pixels: Any,
                     layout: TokenLayout, layers: list[int], heads: list[int], options: PatchesOptions,
                     report: PatchesReport) -> None:
    from vitcli.explain import figures

    capture = AttentionCapture(model, layout.prefix_tokens, layout.query_tokens,
                               head_fusion=options.head_fusion, discard_ratio=options.discard_ratio)
    with torch.inference_mode(), capture:
        logits = model(x)  # (1, classes)
    r = capture.result
    query = torch.stack([q[0] for q in r.query_attention])  # (L, h, N)
    maps = query[[i - 1 for i in layers]][:, [h - 1 for h in heads]].reshape(len(layers), len(heads), *layout.grid)
    rollout = patch_share(r.rollout, layout.prefix_tokens, layout.query_tokens)[0].reshape(layout.grid)
    report.rollout = rollout.tolist()
    report.predictions = _top_predictions(logits, labels, options.top_k)
    source = _query_words(layout)
    report.notes.append(f"attention maps show {source}; prefix tokens ({', '.join(layout.prefix_names) or 'none'}) "
                        "are left out of the maps")
    report.files.append(figures.save_attention_grid(pixels, maps, layers, heads, layout, source,
                                                    report.out_dir / "attention.png"))
    top1 = report.predictions[0] if report.predictions else None
    report.files.append(figures.save_rollout(pixels, rollout, layout, options.head_fusion, options.discard_ratio,
                                             source, top1, report.out_dir / "rollout.png"))


def _explain_target(model: torch.nn.Module, labels: list[str], options: PatchesOptions) -> int | None:
    """Refuse what --explain cannot explain, and resolve --class, before anything is drawn."""
    from vitcli.explain.relevance import class_index, require_classifier

    attention_modules(model, "--explain")
    require_classifier(model)
    require_token_pieces(model)
    if options.explain_class is None:
        return None
    return class_index(options.explain_class, labels, int(getattr(model, "num_classes", 0) or len(labels)))


def _explain_view(model: torch.nn.Module, labels: list[str], x: torch.Tensor, pixels: Any, layout: TokenLayout,
                  target: int | None, options: PatchesOptions, report: PatchesReport) -> None:
    from vitcli.explain.class_figures import save_explain, save_faithfulness
    from vitcli.explain.faithfulness import explain_class

    e = explain_class(model, x, layout.prefix_tokens, layout.query_tokens, target, steps=options.steps,
                      head_fusion=options.head_fusion, discard_ratio=options.discard_ratio)
    name = labels[e.target] if e.target < len(labels) else f"class_{e.target}"
    report.explained, report.explained_label = e, name
    if report.predictions is None:
        report.predictions = _top_predictions(e.relevance.logits, labels, options.top_k)
    grid = layout.grid
    report.files.append(save_explain(pixels, e.rollout_map.reshape(grid), e.gradient_map.reshape(grid), layout,
                                     name, e.target, e.probability, options.head_fusion, _query_words(layout),
                                     report.out_dir / "explain.png"))
    if e.curves is not None:
        report.files.append(save_faithfulness(e.curves, layout, name, report.out_dir / "faithfulness.png"))


def _top_predictions(logits: torch.Tensor, labels: list[str], k: int) -> list[Any]:
    """The top-k (vitcli.inference.predict.Label) of the first image's logits; none without class logits."""
    from vitcli.inference.predict import Label

    if logits.dim() != 2 or logits.shape[1] == 0:
        return []
    probs = logits.float().softmax(dim=-1)[0]
    top = probs.topk(min(k, probs.numel()))
    return [Label(rank=i + 1, index=int(j), label=labels[int(j)] if int(j) < len(labels) else f"class_{int(j)}",
                  prob=float(p)) for i, (p, j) in enumerate(zip(top.values, top.indices, strict=True))]


def _query_words(layout: TokenLayout) -> str:
    if layout.query_tokens == (0, 1):
        return "the mean of the CLS and distillation rows"
    if layout.query_tokens:
        return "the CLS row"
    return "the mean of the patch rows (no CLS token)"


def _figure7(model: torch.nn.Module, data_config: dict[str, Any], sources: list[str], pixels: Any,
             layout: TokenLayout, options: PatchesOptions, report: PatchesReport) -> None:
    from vitcli.explain import figures

    try:
        components = embedding_components(model, options.components)
    except NotATransformerError as e:
        components, report.notes = str(e), report.notes + [f"Fig. 7 left: {e}"]
    try:
        similarity = position_similarity(model, layout.grid)
    except NotATransformerError as e:
        similarity, report.notes = str(e), report.notes + [f"Fig. 7 centre: {e}"]
    distance: Any
    try:
        attention_modules(model)
        distance, report.images_averaged = mean_distance_over(model, data_config, sources, layout,
                                                              options.batch_size, report.notes)
        report.mean_attention_distance = distance.tolist()
    except UsageError as e:  # AttentionUnavailableError: the two other panels still make sense
        distance, report.notes = str(e), report.notes + [f"Fig. 7 right: {e}"]
    report.files.append(figures.save_figure7(components, similarity, distance, layout, report.images_averaged,
                                             report.out_dir / "figure7.png"))


def mean_distance_over(model: torch.nn.Module, data_config: dict[str, Any], sources: list[str], layout: TokenLayout,
                       batch_size: int, notes: list[str] | None = None) -> tuple[torch.Tensor, int]:
    """Mean attention distance per layer and head averaged over images, in input pixels: ((L, h), images used).

    Images are preprocessed as predict does and run in batches; unreadable ones are skipped (and
    named in ``notes``).
    """
    from vitcli.io.images import load_image
    from vitcli.io.transforms import eval_transform

    transform = eval_transform(data_config)
    distances = patch_distances(layout.grid, layout.patch_size)
    capture = AttentionCapture(model, layout.prefix_tokens, layout.query_tokens, distances=distances, rollout=False)
    total, used, skipped = None, 0, []
    for start in range(0, len(sources), batch_size):
        batch = []
        for source in sources[start:start + batch_size]:
            try:
                batch.append(transform(load_image(source)))
            except ImageLoadError as e:
                skipped.append(e.source)
        if not batch:
            continue
        with torch.inference_mode(), capture:
            model(torch.stack(batch))
        per_layer = torch.stack(capture.result.mean_distance).sum(dim=1)  # (L, h) summed over the batch
        total = per_layer if total is None else total + per_layer
        used += len(batch)
    if total is None:
        raise ImageLoadError(sources[0] if sources else "IMAGE", "no readable image to average attention over")
    if skipped and notes is not None:
        notes.append(f"skipped {len(skipped)} unreadable image(s): {', '.join(skipped[:3])}")
    return total / used, used
