"""`diffcap report RUN_DIR`: figures (PNG) and one self-contained HTML page about a training run.

What a run directory holds (train.py): `tb/` TensorBoard events (every loss term, `train/lr`,
`train/captions_per_second`, and `dev/*` scores), `evals.jsonl` (periodic dev scores on the first
`train.eval_limit` dev images) and `checkpoint/`. From these the report draws

- `losses.png`: every `train/*` scalar over the steps (raw and smoothed);
- `dev_metrics.png`: BLEU, ROUGE-L, METEOR and CIDEr over training (evals.jsonl, else the `dev/*` events);
- `steps_sweep.png`: dev scores against the number of sampling steps, measured now on the first `limit` dev
  images (the expensive part: `--steps` and `--limit` size it, `--no-sweep` skips it);
- `trajectories.png`: the rounded caption at every denoising step for a few dev images, shaded by confidence;
- a gallery of dev images with their generated and reference captions (HTML only),

and writes them with `report.json` (the numbers) and `index.html` (the figures inlined: one file to share) into
RUN_DIR/report. Dev images come from the feature cache, so scores and trajectories need only the cached
features; the pictures in the gallery need the image files (a missing file is shown as missing).
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("diffcap")

DEFAULT_STEPS = (1, 5, 10, 20)
DEFAULT_LIMIT = 50
METRICS_SHOWN = ("BLEU-1", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr")


# -- reading a run ---------------------------------------------------------------------------------------------


def read_scalars(tb_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in the TensorBoard event files under `tb_dir`: tag -> [(step, value)] sorted by step.

    A resumed run appends new event files; a step logged twice keeps its latest value.
    """
    tb_dir = Path(tb_dir)
    if not tb_dir.is_dir():
        return {}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logging.getLogger("tensorboard").setLevel(logging.WARNING)  # its directory watcher logs at INFO

    folders = sorted({p.parent for p in tb_dir.rglob("events.out.tfevents.*")})
    merged: dict[str, dict[int, float]] = {}
    for folder in folders:
        accumulator = EventAccumulator(str(folder), size_guidance={"scalars": 0})  # 0: keep every point
        accumulator.Reload()
        for tag in accumulator.Tags().get("scalars", []):
            for event in accumulator.Scalars(tag):
                merged.setdefault(tag, {})[int(event.step)] = float(event.value)
    return {tag: sorted(points.items()) for tag, points in sorted(merged.items())}


def read_evals(path: Path) -> list[dict[str, Any]]:
    """The rows of evals.jsonl (a torn last line, from a killed run, is skipped)."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except ValueError:
                log.warning("skipping an unreadable line of %s", path)
    return sorted(rows, key=lambda r: r.get("step", 0))


# -- figures -------------------------------------------------------------------------------------------------


def _figure(width: float, height: float):  # noqa: ANN202 - a matplotlib Figure on the Agg canvas
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _smooth(values: Sequence[float], weight: float) -> list[float]:
    """TensorBoard's exponential moving average, debiased."""
    out, last, norm = [], 0.0, 0.0
    for v in values:
        last, norm = weight * last + (1 - weight) * v, weight * norm + (1 - weight)
        out.append(last / norm)
    return out


def plot_losses(scalars: dict[str, list[tuple[int, float]]], path: Path) -> Path | None:
    """One panel per `train/*` scalar: raw (thin) and smoothed."""
    tags = [t for t in scalars if t.startswith("train/")]
    if not tags:
        return None
    cols = min(3, len(tags))
    rows = math.ceil(len(tags) / cols)
    fig = _figure(4.2 * cols, 2.8 * rows)
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax, tag in zip(axes.flat, tags):
        steps, values = zip(*scalars[tag])
        ax.plot(steps, values, color="#9bb7e0", linewidth=0.8)
        if len(values) > 5:
            ax.plot(steps, _smooth(values, 0.9), color="#1f4fa0", linewidth=1.6)
        ax.set_title(tag.removeprefix("train/"))
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if tag in ("train/loss", "train/x0_mse", "train/x_t", "train/x_1", "train/rounding") and min(values) > 0:
            ax.set_yscale("log")
    for ax in list(axes.flat)[len(tags):]:
        ax.set_visible(False)
    fig.savefig(path)
    return path


def dev_history(evals: list[dict[str, Any]], scalars: dict[str, list[tuple[int, float]]]) -> list[dict[str, Any]]:
    """Dev scores over training: evals.jsonl, else the `dev/*` TensorBoard scalars."""
    if evals:
        return evals
    by_step: dict[int, dict[str, Any]] = {}
    for tag, points in scalars.items():
        if tag.startswith("dev/"):
            for step, value in points:
                by_step.setdefault(step, {"step": step})[tag.removeprefix("dev/")] = value
    return [by_step[s] for s in sorted(by_step)]


def plot_dev_metrics(history: list[dict[str, Any]], path: Path) -> Path | None:
    if not history:
        return None
    fig = _figure(10, 3.4)
    left, right = fig.subplots(1, 2)
    steps = [r["step"] for r in history]
    for name in ("BLEU-1", "BLEU-4", "METEOR", "ROUGE-L"):
        if any(name in r for r in history):
            left.plot(steps, [r.get(name, float("nan")) for r in history], marker="o", label=name)
    right.plot(steps, [r.get("CIDEr", float("nan")) for r in history], marker="o", color="#c2410c", label="CIDEr")
    for ax, title in ((left, "BLEU, METEOR, ROUGE-L"), (right, "CIDEr")):
        ax.set_title(f"dev {title} over training")
        ax.set_xlabel("step")
        ax.set_ylabel("score (0-100)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.savefig(path)
    return path


def plot_steps_sweep(sweep: list[dict[str, Any]], path: Path) -> Path | None:
    if not sweep:
        return None
    fig = _figure(12, 3.4)
    scores, cider, speed = fig.subplots(1, 3)
    steps = [r["steps"] for r in sweep]
    for name in ("BLEU-1", "BLEU-4", "METEOR", "ROUGE-L"):
        if all(name in r["metrics"] for r in sweep):
            scores.plot(steps, [r["metrics"][name] for r in sweep], marker="o", label=name)
    cider.plot(steps, [r["metrics"].get("CIDEr", float("nan")) for r in sweep], marker="o", color="#c2410c",
               label="CIDEr")
    speed.plot(steps, [r["captions_per_second"] for r in sweep], marker="o", color="#555", label="captions/s")
    for ax, title, unit in ((scores, "BLEU, METEOR, ROUGE-L", "score (0-100)"), (cider, "CIDEr", "score (0-100)"),
                            (speed, "sampling speed", "captions per second (batch 64)")):
        ax.set_title(f"{title} vs sampling steps")
        ax.set_xlabel("sampling steps")
        ax.set_xscale("log")
        ax.set_xticks(steps, [str(s) for s in steps])
        ax.minorticks_off()
        ax.set_ylabel(unit)
        ax.grid(alpha=0.3)
        if ax is scores:
            ax.legend(fontsize=8)
    fig.savefig(path)
    return path


def plot_trajectories(items: list[dict[str, Any]], path: Path, max_tokens: int = 20) -> Path | None:
    """Per image: its picture (when the file exists) and a grid of steps x word pieces shaded by confidence."""
    if not items:
        return None
    import numpy as np
    from PIL import Image

    width = max(min(max_tokens, max((len(s.tokens) for it in items for s in it["steps"]), default=1)), 1)
    heights = [max(len(it["steps"]), 2) * 0.32 + 0.8 for it in items]
    fig = _figure(2.6 + 0.85 * width, sum(heights))
    grid = fig.add_gridspec(len(items), 2, width_ratios=[2.2, 0.85 * width], height_ratios=heights)
    image_map = None
    for row, item in enumerate(items):
        pic, ax = fig.add_subplot(grid[row, 0]), fig.add_subplot(grid[row, 1])
        pic.axis("off")
        if item.get("path") and Path(item["path"]).is_file():
            with Image.open(item["path"]) as im:
                pic.imshow(im.convert("RGB"))
        else:
            pic.text(0.5, 0.5, "(image file\nnot found)", ha="center", va="center", color="#777")
        pic.set_title(item["image"], fontsize=8)
        steps = item["steps"]
        conf = np.full((len(steps), width), np.nan)
        for i, step in enumerate(steps):
            for j, (_, c) in enumerate(step.tokens[:width]):
                conf[i, j] = c
        image_map = ax.imshow(np.ma.masked_invalid(conf), cmap="Blues", vmin=0, vmax=1, aspect="auto")
        for i, step in enumerate(steps):
            for j, (piece, c) in enumerate(step.tokens[:width]):
                ax.text(j, i, piece, ha="center", va="center", fontsize=7, color="white" if c > 0.6 else "black")
        ax.set_yticks(range(len(steps)), [f"t={s.t}" for s in steps], fontsize=7)
        ax.set_xticks([])
        ax.set_title(f"generated: {steps[-1].caption!r}" if steps else "", fontsize=8, loc="left")
    if image_map is not None:
        fig.colorbar(image_map, ax=fig.axes, shrink=0.6, label="confidence", pad=0.01)
    fig.savefig(path)
    return path


# -- measuring -----------------------------------------------------------------------------------------------


@dataclass
class Measured:
    """What the report computes with the checkpoint (empty when there is none or it was skipped)."""

    split: str = ""
    images: list[Any] = field(default_factory=list)  # ImageRecord of the images used
    sweep: list[dict[str, Any]] = field(default_factory=list)  # {"steps", "metrics", "captions_per_second"}
    gallery: list[dict[str, Any]] = field(default_factory=list)  # {"image", "path", "caption", "references"}
    trajectories: list[dict[str, Any]] = field(default_factory=list)  # {"image", "path", "steps"}
    notes: list[str] = field(default_factory=list)


def measure(checkpoint: Path, *, root: str | None = None, split: str | None = None, cache_dir: Path | None = None,
            limit: int = DEFAULT_LIMIT, steps: Sequence[int] = DEFAULT_STEPS, gallery: int = 12,
            trajectories: int = 3, meteor: bool = False, progress: bool = True) -> Measured:
    """Scores at each sampling step count, a gallery and trajectories on the first `limit` dev images."""
    from tqdm.auto import tqdm

    from diffcap.captioner import trajectory_steps
    from diffcap.data.prepare import FeatureTable, default_cache_dir, ensure_features, load_encoder, split_records
    from diffcap.evaluate import caption_table, evaluate_records
    from diffcap.pipeline import generate, load_model

    model, _ = load_model(checkpoint)
    config = model.config
    split = split or config.data.eval_split or "dev"
    out = Measured(split=split)
    root = root or config.data.root
    records = split_records(config.data, split, root)[: max(limit, 0)]
    leaked = set(model.trained_on([r.key for r in records]))
    if leaked:
        out.notes.append(f"{len(leaked)} {split} images were training images of this checkpoint and are left out")
        records = [r for r in records if r.key not in leaked]
    if not records:
        out.notes.append(f"no {split} images to caption")
        return out
    if cache_dir is None:
        cache_dir = Path(config.data.cache_dir) if config.data.cache_dir and root == config.data.root else \
            default_cache_dir(config.data.dataset, Path(root), config.encoder.name)
    cache = ensure_features(load_encoder(config.encoder.name), records, Path(cache_dir) / split)
    records = [r for r in records if r.key in cache]
    if not records:
        out.notes.append(f"no {split} image has features (unreadable files?)")
        return out
    out.images = records
    table = FeatureTable.from_cache(cache, [r.key for r in records])
    default_steps = config.sample.steps

    captions: list[str] | None = None
    for count in tqdm(sorted(set(steps)), desc="steps sweep", unit="setting", disable=not progress):
        result = evaluate_records(model, records, table, meteor=meteor, progress=progress, steps=count)
        out.sweep.append({"steps": count, "metrics": result["metrics"],
                          "captions_per_second": result["captions_per_second"]})
        if count == default_steps:
            captions = [c["caption"] for c in result["captions"]]
    shown = records[: max(gallery, 0)]
    if captions is None and shown:
        sub = FeatureTable(table.keys[: len(shown)], table.pooled[: len(shown)], table.grid[: len(shown)])
        captions = caption_table(model, sub, progress=False)
    out.gallery = [{"image": r.key, "path": str(r.path), "caption": c, "references": list(r.captions)}
                   for r, c in zip(shown, captions or [])]

    n = min(max(trajectories, 0), len(records))
    if n and not getattr(model, "autoregressive", False):
        import torch

        # one sample per image, from the noise its gallery caption starts from (first_index 0, as captioned)
        gen = generate(model, table.batch(torch.arange(n)), keep_trajectory=True, candidates=1)
        out.trajectories = [{"image": r.key, "path": str(r.path), "steps": trajectory_steps(model, gen, row)}
                            for row, r in enumerate(records[:n])]
    return out


# -- the page ------------------------------------------------------------------------------------------------

_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: .6em 0 1.2em; }
td, th { border: 1px solid #ccc; padding: 3px 8px; text-align: left; vertical-align: middle; }
th { background: #f3f3f3; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
img.fig { max-width: 100%; border: 1px solid #eee; }
td.gen { font-weight: 600; } ul.refs { margin: 0; padding-left: 1.2em; color: #555; }
.note { color: #666; } code { font-size: .9em; }
"""


def _img_tag(path: Path | None, alt: str, missing: str = "nothing to plot") -> str:
    if path is None or not Path(path).is_file():
        return f'<p class="note">({html.escape(missing)})</p>'
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f'<img class="fig" src="data:image/png;base64,{data}" alt="{html.escape(alt)}">'


def _thumbnail(path: str, size: int = 128) -> str:
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            im.thumbnail((size, size))
            buffer = io.BytesIO()
            im.save(buffer, format="JPEG", quality=85)
    except (OSError, ValueError):
        return '<span class="note">(image file not found)</span>'
    return f'<img src="data:image/jpeg;base64,{base64.b64encode(buffer.getvalue()).decode("ascii")}" alt="">'


def _metrics_table(rows: list[dict[str, Any]], key: str, names: Sequence[str], extra: Sequence[str] = ()) -> str:
    present = [n for n in names if any(n in r.get("metrics", r) for r in rows)]
    head = "".join(f"<th>{html.escape(n)}</th>" for n in (key, *present, *extra))
    body = []
    for r in rows:
        values = r.get("metrics", r)
        cells = [f"<td class='num'>{r[key]}{' (final)' if r.get('final') else ''}</td>"]
        cells += [f"<td class='num'>{values[n]:.1f}</td>" if n in values else "<td></td>" for n in present]
        cells += [f"<td class='num'>{r.get(e, '')}</td>" for e in extra]
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def write_page(path: Path, run_dir: Path, figures: dict[str, Path | None], history: list[dict[str, Any]],
               measured: Measured, info: dict[str, Any]) -> Path:
    esc = html.escape
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             f"<title>diffcap report: {esc(run_dir.name)}</title><style>{_STYLE}</style></head><body>",
             f"<h1>diffcap report: <code>{esc(str(run_dir))}</code></h1>"]
    facts = [f"{esc(k)}: <b>{esc(str(v))}</b>" for k, v in info.items() if v not in (None, "")]
    parts.append("<p>" + " &middot; ".join(facts) + "</p>")
    parts += [f'<p class="note">{esc(n)}</p>' for n in measured.notes]

    parts.append("<h2>Training losses</h2>")
    parts.append(_img_tag(figures.get("losses"), "training losses", "no TensorBoard events under tb/"))
    parts.append("<h2>Dev scores over training</h2>")
    parts.append('<p class="note">From <code>evals.jsonl</code>: the first <code>train.eval_limit</code> dev images, '
                 "no METEOR; CIDEr on a subset is not comparable with full-split CIDEr.</p>")
    parts.append(_img_tag(figures.get("dev_metrics"), "dev scores over training", "no dev evaluations logged"))
    if history:
        parts.append(_metrics_table(history, "step", METRICS_SHOWN, ("elapsed",)))

    parts.append("<h2>Scores vs sampling steps</h2>")
    if measured.sweep:
        parts.append(f'<p class="note">Measured for this report on the first {len(measured.images)} '
                     f"{esc(measured.split)} images (CIDEr's document frequencies come from these images only).</p>")
        parts.append(_img_tag(figures.get("steps_sweep"), "scores and speed vs sampling steps"))
        parts.append(_metrics_table(measured.sweep, "steps", METRICS_SHOWN, ("captions_per_second",)))
    else:
        parts.append('<p class="note">Not measured (<code>--no-sweep</code>, or no checkpoint or images).</p>')

    if measured.trajectories:
        parts.append("<h2>Denoising trajectories</h2><p class='note'>The caption rounded from the model's estimate "
                     "of the clean text at every sampling step, from noise (top) to the result (t=0); shading: "
                     "the model's confidence in each word piece.</p>")
        parts.append(_img_tag(figures.get("trajectories"), "denoising trajectories"))

    if measured.gallery:
        parts.append(f"<h2>Gallery: {esc(measured.split)} images</h2>")
        parts.append("<table><tr><th>image</th><th>generated</th><th>references</th></tr>")
        for g in measured.gallery:
            refs = "".join(f"<li>{esc(c)}</li>" for c in g["references"])
            parts.append(f"<tr><td>{_thumbnail(g['path'])}<br><small>{esc(g['image'])}</small></td>"
                         f"<td class='gen'>{esc(g['caption']) or '<i>(empty)</i>'}</td>"
                         f"<td><ul class='refs'>{refs}</ul></td></tr>")
        parts.append("</table>")
    parts.append("</body></html>")
    path.write_text("\n".join(parts), encoding="utf-8")
    return path


def build_report(run_dir: Path, out: Path | None = None, *, sweep: bool = True, progress: bool = True,
                 **options: Any) -> Path:
    """Write RUN_DIR/report (or `out`): PNGs, report.json and index.html; return index.html.

    `options` go to `measure` (root, split, cache_dir, limit, steps, gallery, trajectories, meteor).
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory {run_dir} does not exist")
    out = Path(out) if out else run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    scalars = read_scalars(run_dir / "tb")
    history = dev_history(read_evals(run_dir / "evals.jsonl"), scalars)
    checkpoint = run_dir / "checkpoint"
    measured = Measured()
    if not scalars:
        measured.notes.append(f"no TensorBoard events in {run_dir / 'tb'}: no loss curves")
    meta: dict[str, Any] = {}
    if (checkpoint / "meta.json").is_file():
        meta = json.loads((checkpoint / "meta.json").read_text())
        if not sweep:
            options["steps"] = ()
        notes = measured.notes
        measured = measure(checkpoint, progress=progress, **options)
        measured.notes[:0] = notes
    else:
        measured.notes.append(f"no checkpoint in {checkpoint}: nothing captioned")
    figures = {
        "losses": plot_losses(scalars, out / "losses.png"),
        "dev_metrics": plot_dev_metrics(history, out / "dev_metrics.png"),
        "steps_sweep": plot_steps_sweep(measured.sweep, out / "steps_sweep.png"),
        "trajectories": plot_trajectories(measured.trajectories, out / "trajectories.png"),
    }
    config = json.loads((run_dir / "config.json").read_text()) if (run_dir / "config.json").is_file() else {}
    info = {"step": meta.get("step"), "finished": meta.get("finished"),
            "minutes": round(history[-1]["elapsed"] / 60, 1) if history and "elapsed" in history[-1] else None,
            "dataset": config.get("data", {}).get("dataset"), "encoder": config.get("encoder", {}).get("name"),
            "denoiser layers": config.get("model", {}).get("layers"),
            "default sampling steps": config.get("sample", {}).get("steps")}
    (out / "report.json").write_text(json.dumps({
        "run_dir": str(run_dir), **{k: v for k, v in info.items()},
        "losses": {tag: points[-1][1] for tag, points in scalars.items() if tag.startswith("train/")},
        "dev_history": history, "split": measured.split, "images": len(measured.images), "sweep": measured.sweep,
        "gallery": measured.gallery,
        "trajectories": [{"image": t["image"], "steps": [s.to_dict() for s in t["steps"]]} for t in measured.trajectories],
        "figures": {k: v.name for k, v in figures.items() if v is not None}, "notes": measured.notes,
    }, indent=1))
    return write_page(out / "index.html", run_dir, figures, history, measured, info)
