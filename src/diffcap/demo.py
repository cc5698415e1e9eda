"""`diffcap demo`: the whole pipeline in a few minutes on a fresh machine, with nothing to download.

1. Draw a small synthetic captioning dataset with PIL: coloured circles, squares and triangles on plain
   backgrounds, each image with 2-3 template captions that describe it truthfully
   (``out/data/images/*.png`` + ``out/data/captions.jsonl``; train and dev images are disjoint).
2. Train the "tiny" preset on it for a fixed wall-clock budget (``out/run``).
3. Caption the held-out dev images with the trained checkpoint, score them, and write ``out/index.html``:
   a self-contained page (images inlined as base64 PNG) with the metrics, every dev image with its generated
   and reference captions, and the denoising trajectory of the first images.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

log = logging.getLogger("diffcap")

IMAGE_SIZE = 224
SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 230), "yellow": (245, 210, 30)}
BACKGROUNDS = {"white": (255, 255, 255), "black": (0, 0, 0), "gray": (128, 128, 128)}
SIZES = {"small": (38, 52), "large": (80, 100)}  # side / diameter range in pixels, per size word


@dataclass(frozen=True)
class Shape:
    kind: str
    colour: str
    size: str


@dataclass(frozen=True)
class Scene:
    """What one image shows: one or two shapes (left to right) on a background."""

    shapes: tuple[Shape, ...]
    background: str

    def captions(self) -> list[str]:
        bg = self.background
        if len(self.shapes) == 1:
            s = self.shapes[0]
            return [
                f"a {s.size} {s.colour} {s.kind} on a {bg} background",
                f"a {s.colour} {s.kind} on a {bg} background",
                f"a {s.size} {s.colour} {s.kind}",
            ]
        a, b = self.shapes
        return [
            f"a {a.colour} {a.kind} and a {b.colour} {b.kind}",
            f"a {a.colour} {a.kind} and a {b.colour} {b.kind} on a {bg} background",
        ]


def random_scene(rng: random.Random) -> Scene:
    count = 1 if rng.random() < 0.5 else 2
    shapes = tuple(Shape(rng.choice(SHAPES), rng.choice(list(COLOURS)), rng.choice(list(SIZES))) for _ in range(count))
    return Scene(shapes, rng.choice(list(BACKGROUNDS)))


def draw_scene(scene: Scene, rng: random.Random, size: int = IMAGE_SIZE) -> Image.Image:
    """Render a scene; two shapes go into the left and right halves, in caption order."""
    image = Image.new("RGB", (size, size), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(image)
    slots = [(0, size)] if len(scene.shapes) == 1 else [(0, size // 2), (size // 2, size)]
    for shape, (x0, x1) in zip(scene.shapes, slots):
        lo, hi = SIZES[shape.size]
        extent = rng.randint(lo, min(hi, x1 - x0 - 8))
        cx = rng.randint(x0 + extent // 2 + 4, x1 - extent // 2 - 4)
        cy = rng.randint(extent // 2 + 4, size - extent // 2 - 4)
        box = (cx - extent // 2, cy - extent // 2, cx + extent // 2, cy + extent // 2)
        fill = COLOURS[shape.colour]
        if shape.kind == "circle":
            draw.ellipse(box, fill=fill)
        elif shape.kind == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon([(cx, box[1]), (box[2], box[3]), (box[0], box[3])], fill=fill)
    return image


def make_shapes_dataset(out: Path, *, train: int = 400, dev: int = 40, seed: int = 0) -> Path:
    """Write ``out/images/{split}_NNNN.png`` and ``out/captions.jsonl`` (image, caption, split); return the jsonl.

    Deterministic given ``seed``. Every image is in exactly one split; each has 2-3 captions.
    """
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    rows = []
    for split, count in (("train", train), ("dev", dev)):
        for index in range(count):
            scene = random_scene(rng)
            name = f"images/{split}_{index:04d}.png"
            draw_scene(scene, rng).save(out / name)
            rows += [{"image": name, "caption": caption, "split": split} for caption in scene.captions()]
    path = out / "captions.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def _png_base64(path: Path, size: int = 112) -> str:
    image = Image.open(path).convert("RGB")
    image.thumbnail((size, size))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 980px; margin: 2em auto; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; }
td, th { border: 1px solid #ccc; padding: 4px 8px; vertical-align: middle; text-align: left; }
th { background: #f3f3f3; }
td.gen { font-weight: 600; }
td.ok { background: #e8f7e8; }
ul.refs { margin: 0; padding-left: 1.2em; color: #555; }
code, .traj { font-family: ui-monospace, monospace; font-size: 0.9em; }
.traj div { white-space: pre; }
"""


def write_page(path: Path, *, metrics: dict[str, float], unavailable: dict[str, str], rows: list[dict],
               trajectories: list[dict], info: dict) -> Path:
    """The self-contained HTML report (no external requests)."""
    esc = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8"><title>diffcap demo</title>',
        f"<style>{_STYLE}</style></head><body>",
        "<h1>diffcap demo: diffusion captioning of synthetic shapes</h1>",
        "<p>A small continuous-diffusion language model (the <code>tiny</code> preset: a "
        f"{info['layers']}-layer transformer denoiser over MiniLM word embeddings, conditioned on frozen "
        f"{esc(info['encoder'])} image features) was trained for {info['minutes']:.1f} minutes "
        f"({info['steps']} steps) on {info['train_images']} generated images of coloured shapes, "
        f"each with 2&ndash;3 template captions. Below it captions {info['dev_images']} held-out images it never "
        f"saw, starting every caption from Gaussian noise and denoising it in {info['sample_steps']} steps.</p>",
        "<h2>Metrics on the held-out images</h2>",
        "<table><tr><th>metric</th><th>value</th></tr>",
    ]
    parts += [f"<tr><td>{esc(k)}</td><td>{v:.1f}</td></tr>" for k, v in metrics.items()]
    parts += [f"<tr><td>{esc(k)}</td><td>&ndash; ({esc(v)})</td></tr>" for k, v in unavailable.items() if k not in metrics]
    parts.append("</table>")
    exact = sum(r["caption"] in r["references"] for r in rows)
    parts.append(f"<p>{exact} of {len(rows)} generated captions are word for word one of the image's references "
                 "(highlighted green). Scores are on a 0&ndash;100 scale (pycocoevalcap; CIDEr is CIDEr-D).</p>")
    if trajectories:
        parts.append("<h2>Denoising trajectories</h2><p>The caption rounded from the model's estimate of the clean "
                     "text at each sampling step, from pure noise (large t) to the final caption (t=0).</p><table>")
        for item in trajectories:
            lines = "".join(f"<div>t={step['t']:4d}: {esc(step['caption'])}</div>" for step in item["steps"])
            parts.append(f'<tr><td><img src="data:image/png;base64,{item["png"]}" alt="{esc(item["image"])}"></td>'
                         f'<td class="traj">{lines}</td></tr>')
        parts.append("</table>")
    parts.append("<h2>Held-out images</h2><table><tr><th>image</th><th>generated caption</th>"
                 "<th>reference captions</th></tr>")
    for r in rows:
        refs = "".join(f"<li>{esc(c)}</li>" for c in r["references"])
        ok = " ok" if r["caption"] in r["references"] else ""
        parts.append(f'<tr><td><img src="data:image/png;base64,{r["png"]}" alt="{esc(r["image"])}"></td>'
                     f'<td class="gen{ok}">{esc(r["caption"]) or "<i>(empty)</i>"}</td><td><ul class="refs">{refs}</ul></td></tr>')
    parts.append("</table>")
    parts.append(f"<p>Run directory: <code>{esc(str(info['run_dir']))}</code>. Caption more images with "
                 f"<code>diffcap caption {esc(str(info['checkpoint']))} IMAGE.png</code>.</p></body></html>")
    path.write_text("\n".join(parts), encoding="utf-8")
    return path


def run_demo(out: Path, minutes: float = 4.0, seed: int = 0, *, train_images: int = 400, dev_images: int = 40) -> Path:
    """Generate data, train the tiny preset for `minutes`, caption the dev images; return out/index.html."""
    from diffcap.captioner import Captioner
    from diffcap.config import PRESETS
    from diffcap.data.datasets import load_split
    from diffcap.metrics import score_captions
    from diffcap.train import train

    out = Path(out)
    run_dir = out / "run"
    if minutes <= 0:
        raise ValueError(f"minutes must be > 0, got {minutes}")
    reuse = (run_dir / "checkpoint" / "meta.json").exists()

    data_dir = out / "data"
    print(f"[1/3] drawing a synthetic shapes dataset into {data_dir} ...", flush=True)
    annotations = make_shapes_dataset(data_dir, train=train_images, dev=dev_images, seed=seed)

    config = PRESETS["tiny"]()
    config.data.dataset = "jsonl"
    config.data.root = str(annotations)
    config.data.train_split = "train"
    config.data.eval_split = "dev"
    config.data.cache_dir = str(out / "features")
    config.train.max_minutes = float(minutes)
    config.train.max_steps = 100_000
    config.train.seed = seed
    config.sample.seed = seed
    if reuse:
        checkpoint = run_dir / "checkpoint"
        print(f"[2/3] reusing the model trained earlier in {run_dir} (delete {out} to train again)", flush=True)
    else:
        print(f"[2/3] training the tiny preset for {minutes:g} minutes (features are computed first) ...", flush=True)
        checkpoint = train(config, run_dir)

    print("[3/3] captioning the held-out dev images ...", flush=True)
    captioner = Captioner.from_pretrained(checkpoint)
    dev = load_split("jsonl", annotations, "dev")
    # The k-th image's noise depends on k alone, so the trajectories below end in the captions of the table.
    captions = captioner.caption([r.path for r in dev], batch_size=1)
    report = score_captions({r.key: c for r, c in zip(dev, captions)}, {r.key: list(r.captions) for r in dev},
                            meteor=False)
    rows = [{"image": r.key, "caption": c, "references": list(r.captions), "png": _png_base64(r.path)}
            for r, c in zip(dev, captions)]
    trajectories = []
    for index, r in enumerate(dev[:3]):
        steps = captioner.trajectory(r.path, index=index)
        trajectories.append({"image": r.key, "png": _png_base64(r.path),
                             "steps": [{"t": s.t, "caption": s.caption} for s in steps]})
    meta = json.loads((checkpoint / "meta.json").read_text())
    info = {"layers": config.model.layers, "encoder": config.encoder.name, "minutes": minutes,
            "steps": meta.get("step", "?"), "train_images": train_images, "dev_images": len(dev),
            "sample_steps": config.sample.steps, "run_dir": run_dir, "checkpoint": checkpoint}
    page = write_page(out / "index.html", metrics=report.metrics, unavailable=report.unavailable, rows=rows,
                      trajectories=trajectories, info=info)
    (out / "results.json").write_text(json.dumps(
        {"metrics": report.metrics, "step": info["steps"],
         "captions": [{"image": r["image"], "caption": r["caption"], "references": r["references"]} for r in rows]},
        indent=2))
    shown = ", ".join(f"{k} {v:.1f}" for k, v in report.metrics.items() if k in ("BLEU-4", "ROUGE-L", "CIDEr"))
    print(f"dev ({len(dev)} images): {shown}")
    for row in rows[:3]:
        print(f"  {row['image']}: {row['caption']!r}  (reference: {row['references'][0]!r})")
    return page
