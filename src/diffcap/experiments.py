"""Ablations: run a grid of config variants with one budget (`diffcap sweep`) and compare runs (`diffcap compare`).

A sweep is a list of ordinary `diffcap train` and `diffcap evaluate` commands, one pair per variant, run one
after another here (each in its own process, so memory is returned between runs); `--dry-run` prints them
instead, to launch one per GPU or node elsewhere. Run directories are named from the variant's differences
to the base config (`rounding_weight=0.5,target=x_prev`), never by hand; a sweep run again skips the
variants that already finished and resumes an interrupted one.

`compare` reads only what runs leave on disk (config.json, checkpoint/meta.json, evals.jsonl, dev.json, tb/),
so it works on runs from anywhere, and writes a Markdown table plus PNG plots.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from diffcap.config import Config, ConfigError, all_keys, load_config, parse_literal

log = logging.getLogger("diffcap")

METRICS = ("BLEU-4", "METEOR", "CIDEr")


# -- sweep ---------------------------------------------------------------------------------------------------


def parse_grid(items: list[str]) -> list[tuple[str, list[Any]]]:
    """["model.layers=2,4", "loss.distance=l1,mse"] -> [(key, [values])], keys checked against the config."""
    grid = []
    keys = set(all_keys())
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not raw.strip():
            raise ConfigError(f"--grid {item!r} must look like section.field=v1,v2 (e.g. loss.rounding_weight=0.05,0.3)")
        if key not in keys:
            load_config("default", [f"{key}=0"])  # raises the usual "unknown key, did you mean" error
        grid.append((key, [parse_literal(v.strip()) for v in raw.split(",")]))
    return grid


def short_name(differences: dict[str, Any]) -> str:
    """A run name from config differences: the field names (full dotted keys where a field name is ambiguous)."""
    fields = [k.rsplit(".", 1)[-1] for k in differences]
    parts = []
    for key, value in sorted(differences.items()):
        name = key.rsplit(".", 1)[-1]
        parts.append(f"{key if fields.count(name) > 1 else name}={value}")
    return ",".join(parts) or "base"


@dataclass
class Variant:
    name: str
    overrides: list[str]  # key=value, as given to `diffcap train`


def expand(base: str, grid: list[tuple[str, list[Any]]], fixed: list[str]) -> list[Variant]:
    """Every combination of the grid's values, each validated and named by its differences to the base."""
    reference = load_config(base, fixed)
    variants = []
    for combo in itertools.product(*[values for _, values in grid]):
        overrides = [f"{key}={_format(value)}" for (key, _), value in zip(grid, combo)]
        config = load_config(base, fixed + overrides)  # invalid combinations fail here, before any training
        variants.append(Variant(short_name(config.differences(reference)), overrides))
    names = [v.name for v in variants]
    if len(set(names)) != len(names):
        raise ConfigError(f"the grid gives duplicate variants: {names}")
    return variants


def _format(value: Any) -> str:
    return json.dumps(value) if isinstance(value, bool) else str(value)


def commands(base: str, variant: Variant, fixed: list[str], out: Path, *, evaluate: bool, eval_limit: int | None,
             resume: bool = False) -> list[list[str]]:
    """The `diffcap train` (and `diffcap evaluate`) command lines of one variant."""
    run_dir = out / variant.name
    train = ["diffcap", "train", base, *fixed, *variant.overrides, "--run-dir", str(run_dir)]
    if resume:
        train.append("--resume")
    cmds = [train]
    if evaluate:
        config = load_config(base, fixed + variant.overrides)
        d = config.data
        ev = ["diffcap", "evaluate", str(run_dir / "checkpoint"), "--dataset", d.dataset, "--root", d.root,
              "--split", d.eval_split or "dev", "--output", str(run_dir / "dev.json")]
        for flag, value in (("--annotations", d.annotations), ("--image-root", d.image_root)):
            if value:
                ev += [flag, value]
        if d.cache_dir:
            ev += ["--cache-dir", d.cache_dir]
        if eval_limit:
            ev += ["--limit", str(eval_limit)]
        cmds.append(ev)
    return cmds


def _finished(run_dir: Path) -> bool:
    meta = run_dir / "checkpoint" / "meta.json"
    try:
        return bool(json.loads(meta.read_text()).get("finished"))
    except (OSError, ValueError):
        return False


def sweep(base: str, grid_items: list[str], *, budget_minutes: float, out: Path, fixed: list[str] | None = None,
          evaluate: bool = True, eval_limit: int | None = None, dry_run: bool = False) -> tuple[list[Path], list[str]]:
    """Train (and evaluate) every variant of the grid with the same budget and seed.

    Returns (run directories, names of the variants that failed). A failing variant (a crash, a diverged
    run) is logged and the sweep goes on with the next one.
    """
    if budget_minutes <= 0:
        raise ConfigError("--budget-minutes must be > 0")
    fixed = list(fixed or []) + [f"train.max_minutes={budget_minutes}"]
    variants = expand(base, parse_grid(grid_items), fixed)
    out = Path(out)
    runs: list[Path] = []
    failed: list[str] = []
    for i, variant in enumerate(variants, 1):
        run_dir = out / variant.name
        runs.append(run_dir)
        resume = (run_dir / "checkpoint").exists() and not _finished(run_dir)
        cmds = commands(base, variant, fixed, out, evaluate=evaluate, eval_limit=eval_limit, resume=resume)
        if dry_run:
            for cmd in cmds:
                print(shlex.join(cmd))
            continue
        if _finished(run_dir) and (not evaluate or (run_dir / "dev.json").exists()):
            log.info("[%d/%d] %s: already done, skipped", i, len(variants), variant.name)
            continue
        log.info("[%d/%d] %s (%s)", i, len(variants), variant.name, "resuming" if resume else f"{budget_minutes:g} min")
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "commands.sh", "a") as f:
            for cmd in cmds:
                f.write(shlex.join(cmd) + "\n")
        for cmd in cmds:
            if cmd[1] == "train" and _finished(run_dir):
                continue
            if subprocess.run([sys.executable, "-m", "diffcap.cli", *cmd[1:]]).returncode != 0:
                log.error("[%d/%d] %s failed: %s", i, len(variants), variant.name, shlex.join(cmd))
                failed.append(variant.name)
                break
    return runs, failed


# -- compare -------------------------------------------------------------------------------------------------


@dataclass
class RunSummary:
    name: str
    config: dict[str, Any]  # flattened
    metrics: dict[str, float]
    metrics_source: str  # "dev.json (N images)" or "training's final eval (N images)"
    step: int | None
    minutes: float | None


def _flat(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in config.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def summarize(run_dir: Path) -> RunSummary:
    from diffcap.report import read_evals

    run_dir = Path(run_dir)
    config_path = run_dir / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a training run (no config.json)")
    raw = json.loads(config_path.read_text())
    try:  # fields added since the run was made read as their defaults, as they do when its checkpoint is loaded
        raw = json.loads(Config.from_dict(raw).to_json())
    except ConfigError:
        pass  # compare what is there
    config = _flat(raw)
    metrics: dict[str, float] = {}
    source = "none"
    dev = run_dir / "dev.json"
    if dev.is_file():
        data = json.loads(dev.read_text())
        metrics, source = data["metrics"], f"dev.json ({data.get('num_images', '?')} images)"
    else:
        evals = read_evals(run_dir / "evals.jsonl")
        if evals:
            metrics = {k: v for k, v in evals[-1].items() if isinstance(v, float) and k not in ("elapsed",)}
            source = f"training's last eval ({config.get('train.eval_limit', '?')} images)"
    step = minutes = None
    meta = run_dir / "checkpoint" / "meta.json"
    if meta.is_file():
        step = json.loads(meta.read_text()).get("step")
    state = run_dir / "checkpoint" / "train_state.json"  # the training wall time lives with the resumable state
    if state.is_file():
        elapsed = json.loads(state.read_text()).get("elapsed")
        minutes = None if elapsed is None else elapsed / 60
    return RunSummary(run_dir.name, config, metrics, source, step, minutes)


def varying_keys(runs: list[RunSummary]) -> list[str]:
    """Config keys whose value differs between the runs (what the comparison is about)."""
    keys = sorted(set().union(*(r.config for r in runs)))
    skip = ("data.cache_dir",)
    return [k for k in keys if k not in skip and len({json.dumps(r.config.get(k)) for r in runs}) > 1]


def reference_run(runs: list[RunSummary]) -> RunSummary:
    """What each run is described against: the run named "base" (as `sweep` names it), else the first."""
    return next((r for r in runs if r.name == "base"), runs[0])


def markdown_table(runs: list[RunSummary]) -> str:
    keys = varying_keys(runs)
    ref = reference_run(runs)
    header = ["run", f"differences to {ref.name}", *METRICS, "steps", "minutes", "scored on"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in runs:
        changed = [k for k in keys if r.config.get(k) != ref.config.get(k)]
        diffs = ", ".join(f"{k}={r.config.get(k)}" for k in changed) or ("(the reference)" if r is ref else "(same config)")
        cells = [r.name, diffs, *(f"{r.metrics[m]:.1f}" if m in r.metrics else "–" for m in METRICS),
                 str(r.step) if r.step is not None else "–", f"{r.minutes:.1f}" if r.minutes is not None else "–",
                 r.metrics_source]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def line_style(index: int) -> dict[str, Any]:
    """Run `index`'s colour and dash: 10 colours, then the same colours dashed, dotted, dash-dotted, so up to 40
    runs stay distinguishable in one panel."""
    return {"color": f"C{index % 10}", "linestyle": ("-", "--", ":", "-.")[(index // 10) % 4]}


def legend_beside(fig: Any, names: list[str]) -> None:
    """One legend for the whole figure, right of the panels (a legend inside a panel hides the curves)."""
    handles: dict[str, Any] = {}
    for ax in fig.axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    ordered = [n for n in names if n in handles]
    fig.legend([handles[n] for n in ordered], ordered, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7,
               ncol=1 + len(ordered) // 30, frameon=False)


def run_labels(run_dirs: list[Path]) -> list[str]:
    """Each run's folder name, or where two share one (runs/a/base, runs/b/base), its path below their common
    parent."""
    names = [Path(d).resolve().name for d in run_dirs]
    if len(set(names)) == len(names):
        return names
    parent = Path(os.path.commonpath([Path(d).resolve() for d in run_dirs]))
    return [str(Path(d).resolve().relative_to(parent)) for d in run_dirs]


def plot_runs(run_dirs: list[Path], names: list[str], out: Path) -> list[Path]:
    """losses.png (every logged loss term, one panel each, one line per run) and dev_cider.png."""
    from diffcap.report import _figure, _smooth, read_evals, read_scalars

    written = []
    scalars = [read_scalars(Path(d) / "tb") for d in run_dirs]
    tags = sorted({t for s in scalars for t in s if t.startswith("train/") and t not in
                   ("train/lr", "train/captions_per_second")})
    if tags:
        cols = min(3, len(tags))
        rows = (len(tags) + cols - 1) // cols
        fig = _figure(4.2 * cols, 3.0 * rows)
        for i, tag in enumerate(tags):
            ax = fig.add_subplot(rows, cols, i + 1)
            for j, (name, s) in enumerate(zip(names, scalars)):
                if tag in s:
                    steps, values = zip(*s[tag])
                    ax.plot(steps, _smooth(values, 0.8), label=name, linewidth=1.2, **line_style(j))
            ax.set_title(tag.removeprefix("train/"))
            ax.set_xlabel("step")
            if tag != "train/token_accuracy" and all(v > 0 for s in scalars for _, v in s.get(tag, [])):
                ax.set_yscale("log")
        legend_beside(fig, names)
        fig.savefig(out / "losses.png", bbox_inches="tight")
        written.append(out / "losses.png")
    fig = _figure(6.5, 4.0)
    ax = fig.add_subplot(1, 1, 1)
    plotted = False
    for j, (name, d) in enumerate(zip(names, run_dirs)):
        rows_ = [r for r in read_evals(Path(d) / "evals.jsonl") if "CIDEr" in r]
        if rows_:
            ax.plot([r["step"] for r in rows_], [r["CIDEr"] for r in rows_], marker="o", label=name, **line_style(j))
            plotted = True
    if plotted:
        ax.set_xlabel("step")
        ax.set_ylabel("dev CIDEr (training's periodic evaluation)")
        legend_beside(fig, names)
        fig.savefig(out / "dev_cider.png", bbox_inches="tight")
        written.append(out / "dev_cider.png")
    return written


def compare(run_dirs: list[Path], out: Path) -> Path:
    """Write OUT/compare.md (table + figure links) and the PNGs; return the Markdown path."""
    if not run_dirs:
        raise ValueError("compare needs at least one run directory")
    runs = [replace(summarize(d), name=label) for d, label in zip(run_dirs, run_labels(run_dirs))]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    figures = plot_runs(run_dirs, [r.name for r in runs], out)
    text = "# Run comparison\n\n" + markdown_table(runs)
    text += "\nMetrics on the 0–100 scale (pycocoevalcap, PTB tokenisation); minutes = training wall time.\n"
    for fig in figures:
        text += f"\n![{fig.stem}]({fig.name})\n"
    (out / "compare.md").write_text(text)
    return out / "compare.md"
