"""Faithfulness of `vitcli patches --explain`: mean deletion and insertion AUCs over labelled photos.

For each photo: the shipped DeiT-Tiny (or --model) explains its predicted class by gradient-weighted
attention rollout (Chefer et al. 2021) and by plain rollout (Abnar & Zuidema 2020); token deletion
and insertion (15 steps, position embeddings kept, prefix tokens always kept) score both maps and a
random order (mean of 3 seeds). Prints one row per photo, the means, and whether the ordering holds:
deletion gradient < rollout < random, insertion gradient > rollout > random.

    python benchmarks/faithfulness.py                       # the 19 labelled photos of ../shared/data/images
                                                            # ($VITCLI_SHARED_DATA/images if set)
    python benchmarks/faithfulness.py examples/*.jpg        # any photos
    python benchmarks/faithfulness.py --json                # one JSON document on stdout
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
LABELLED = Path(os.environ.get("VITCLI_SHARED_DATA", REPO.parent / "shared" / "data")) / "images"
METHODS = ("gradient_rollout", "rollout", "random")


def labelled_photos(folder: Path) -> list[Path]:
    """The photos of LABELS.tsv and LABELS_AMBIGUOUS.tsv (16 + 3 in shared/data/images)."""
    photos = []
    for name in ("LABELS.tsv", "LABELS_AMBIGUOUS.tsv"):
        if (folder / name).is_file():
            with open(folder / name, newline="", encoding="utf-8") as f:
                photos += [folder / row["filename"] for row in csv.DictReader(f, delimiter="\t")]
    return photos


def cpu_flags() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    flags = sorted(set(re.findall(r"\b(avx512[a-z_0-9]*|avx2|amx[a-z_0-9]*)\b", text)))
    model = re.search(r"model name\s*:\s*(.*)", text)
    return f"{model.group(1) if model else '?'}; {' '.join(flags) or 'no AVX2/AVX-512/AMX'}"


def measure(photos: list[Path], model_name: str, steps: int) -> list[dict]:
    from vitcli.explain.attention import unfused_attention
    from vitcli.explain.faithfulness import explain_class
    from vitcli.explain.tokens import describe_tokens
    from vitcli.io.images import load_image
    from vitcli.io.transforms import eval_transform
    from vitcli.models.resolve import load_model

    with unfused_attention():
        loaded = load_model(model_name, None, pretrained=True)
    model = loaded.model.eval()
    transform = eval_transform(loaded.data_config)
    rows = []
    for photo in photos:
        start = time.perf_counter()
        x = transform(load_image(str(photo))).unsqueeze(0)
        layout = describe_tokens(model, tuple(x.shape[1:]), loaded.name)
        explained = explain_class(model, x, layout.prefix_tokens, layout.query_tokens, steps=steps)
        curves = explained.curves
        row = {"photo": photo.name, "class": loaded.labels[explained.target], "prob": explained.probability,
               "deletion": curves.auc("deletion"), "insertion": curves.auc("insertion"),
               "seconds": time.perf_counter() - start}
        rows.append(row)
        print(f"{photo.name:32s} {row['class'][:22]:22s} p={row['prob']:.3f}  deletion "
              + " ".join(f"{row['deletion'][m]:.3f}" for m in METHODS) + "  insertion "
              + " ".join(f"{row['insertion'][m]:.3f}" for m in METHODS) + f"  {row['seconds']:.1f}s",
              file=sys.stderr, flush=True)
    return rows


def summary(rows: list[dict]) -> dict:
    means = {curve: {m: statistics.fmean(r[curve][m] for r in rows) for m in METHODS}
             for curve in ("deletion", "insertion")}
    d, i = means["deletion"], means["insertion"]
    return {"photos": len(rows), "mean_auc": means,
            "deletion_order_holds": d["gradient_rollout"] < d["rollout"] < d["random"],
            "insertion_order_holds": i["gradient_rollout"] > i["rollout"] > i["random"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("photos", nargs="*", type=Path, help="photos (default: the labelled ones of shared/data)")
    parser.add_argument("--model", default="deit_tiny_patch16_224", help="model (default: the shipped DeiT-Tiny)")
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    photos = args.photos or labelled_photos(LABELLED)
    start = time.perf_counter()
    rows = measure(photos, args.model, args.steps)
    result = {"model": args.model, "steps": args.steps, "cpu": cpu_flags(), "threads": torch.get_num_threads(),
              "load_average": os.getloadavg(), "seconds": time.perf_counter() - start, **summary(rows),
              "per_photo": rows}
    if args.json:
        print(json.dumps(result, indent=1))
        return
    print(f"{args.model}, {len(rows)} photos, predicted class, {args.steps} steps; CPU: {result['cpu']}; "
          f"load average {result['load_average'][0]:.1f}; {result['seconds']:.0f} s")
    print(f"{'mean AUC':12s} " + " ".join(f"{m:>16s}" for m in METHODS))
    for curve in ("deletion", "insertion"):
        print(f"{curve:12s} " + " ".join(f"{result['mean_auc'][curve][m]:16.3f}" for m in METHODS))
    print(f"deletion gradient < rollout < random: {result['deletion_order_holds']}; "
          f"insertion gradient > rollout > random: {result['insertion_order_holds']}")


if __name__ == "__main__":
    main()
