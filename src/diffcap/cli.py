"""`diffcap` command line: a thin layer over the package. Known errors print one clear line, not a traceback."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from diffcap.config import SampleConfig

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

log = logging.getLogger("diffcap")


def _known_errors() -> tuple[type[BaseException], ...]:
    from diffcap.checkpoint import CheckpointError
    from diffcap.config import ConfigError
    from diffcap.data.datasets import DatasetError
    from diffcap.data.features import FeatureCacheError
    from diffcap.data.images import ImageLoadError
    from diffcap.text.space import TextSpaceError
    from diffcap.train import TrainingDiverged

    return (CheckpointError, ConfigError, DatasetError, FeatureCacheError, ImageLoadError, TextSpaceError,
            TrainingDiverged, FileExistsError, FileNotFoundError, ValueError)


def _add_dataset_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default="flickr8k", choices=["flickr8k", "karpathy", "jsonl", "csv"])
    p.add_argument("--root", required=True, type=Path, help="dataset folder")
    p.add_argument("--image-root", type=Path, default=None, help="folder image paths are relative to (default: root)")
    p.add_argument("--annotations", type=Path, default=None, help="karpathy/jsonl/csv annotation file")


def cmd_features(args: argparse.Namespace) -> int:
    from diffcap.data.datasets import available_splits
    from diffcap.data.prepare import default_cache_dir, distributed_state, ensure_features, load_encoder, split_records
    from diffcap.config import DataConfig

    data = DataConfig(dataset=args.dataset, root=str(args.root), image_root=str(args.image_root or ""),
                      annotations=str(args.annotations or ""))
    cache_root = args.cache_dir or default_cache_dir(args.dataset, args.root, args.encoder)
    encoder = load_encoder(args.encoder)
    state = distributed_state()  # under `accelerate launch`: every process encodes a shard, one cache results
    splits = args.split or available_splits(args.dataset, args.root)
    for split in splits:
        records = split_records(data, split)
        cache = ensure_features(encoder, records, cache_root / split, on_error=args.on_error,
                                batch_size=args.batch_size, state=state)
        if state is not None and not state.is_main_process:
            continue
        print(f"{split}: {len(cache)} images cached in {cache_root / split}"
              + (f"; {len(cache.failed)} unreadable, skipped: {', '.join(list(cache.failed)[:5])}" if cache.failed else ""))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from diffcap.config import PRESETS, load_config
    from diffcap.train import train

    config = load_config(args.config, args.overrides)
    if args.run_dir is None:
        base = PRESETS[args.config]() if args.config in PRESETS else PRESETS["default"]()
        diffs = config.differences(base)
        suffix = ",".join(f"{k.split('.')[-1]}={v}" for k, v in sorted(diffs.items()) if not k.startswith("data."))
        args.run_dir = Path("runs") / (Path(args.config).stem + (f"-{suffix}" if suffix else ""))
    checkpoint = train(config, args.run_dir, resume=args.resume, stop_after_minutes=args.stop_after)
    if int(os.environ.get("RANK", "0")) == 0:  # under `accelerate launch`: once, not once per process
        print(f"checkpoint: {checkpoint}")
    return 0


def _checkpoint_and_images(paths: list[str], checkpoint: Path | None) -> tuple[Path, list[str]]:
    """`[CHECKPOINT] PATH...`: the first path names the model when it is a folder with a meta.json (a
    checkpoint), otherwise the checkpoint shipped with diffcap captions every path; `--checkpoint` names it
    explicitly (then every path is an image or a folder of images)."""
    from diffcap.app import resolve_checkpoint
    from diffcap.data.collection import IMAGE_SUFFIXES, find_images

    if checkpoint is not None:
        if not (checkpoint / "meta.json").is_file():
            raise FileNotFoundError(f"--checkpoint {checkpoint} is not a checkpoint (no meta.json)")
        return checkpoint, paths
    first = Path(paths[0])
    if first.is_dir() and (first / "meta.json").is_file():
        if find_images([first]).images:
            raise ValueError(f"{first} is both a checkpoint (it has meta.json) and a folder of images: use "
                             f"--checkpoint {first} to caption the other paths with it, or give the images' "
                             "paths instead of the folder")
        if len(paths) < 2:
            raise ValueError(f"no image to caption: give image paths or folders after the checkpoint {first}")
        return first, paths[1:]
    if not first.exists() and first.suffix.lower() not in IMAGE_SUFFIXES and len(paths) > 1:
        raise FileNotFoundError(f"checkpoint {first} does not exist")
    return resolve_checkpoint(None), paths


def _self_weight_used(args: argparse.Namespace, sample: SampleConfig) -> bool:
    """Whether the matcher's score (and so sample.self_weight) decides among the candidates of this command;
    a --self-weight given where it would not is refused, not ignored."""
    select = sample.select if args.select is None else args.select
    match_weight = sample.match_weight if args.match_weight is None else args.match_weight
    used = match_weight > 0 if args.rerank is not None else select == "match"
    if args.self_weight is not None and args.self_weight != 0 and not used:
        raise ValueError("--self-weight refines the image-text matcher's score, which this choice does not use: "
                         "give --select match, or --match-weight W > 0 with --rerank")
    return used


def cmd_caption(args: argparse.Namespace) -> int:
    import time

    from tqdm.auto import tqdm

    from diffcap.captioner import Captioner, CaptionResult, format_trajectory
    from diffcap.data.collection import display_path, find_images
    from diffcap.data.images import ImageLoadError, load_image
    from diffcap.outputs import CaptionFile, output_format

    if args.rerank is not None and args.candidates is not None and args.candidates < 2:
        raise ValueError("--rerank chooses among several samples: give --candidates N (N >= 2)")
    if args.resume and args.output is None:
        raise ValueError("--resume continues an --output file: give --output too")
    if args.output is not None:
        output_format(args.output)  # a bad extension is refused before the model loads
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    checkpoint, paths = _checkpoint_and_images(args.paths, args.checkpoint)
    found = find_images(paths, recursive=args.recursive)
    if not found.images and not found.failed:
        raise FileNotFoundError(f"no image found in {', '.join(map(display_path, paths))}"
                                + (f" ({found.skipped_summary()} skipped)" if found.skipped else ""))
    for path, reason in found.failed.items():  # unreadable while listing folders
        print(f"failed: {display_path(path)}: {reason}", file=sys.stderr)
    out = CaptionFile(args.output, resume=args.resume) if args.output is not None else None
    # each image keeps its index in the whole collection (its noise seed), resumed or not
    todo = [(k, path) for k, path in enumerate(found.images) if out is None or path not in out.done]
    captioner = Captioner.from_pretrained(checkpoint, rerank=args.rerank)
    if args.rerank is not None and args.candidates is None and captioner.model.config.sample.candidates < 2:
        raise ValueError("--rerank chooses among several samples and this checkpoint samples one: "
                         "give --candidates N (N >= 2)")
    _self_weight_used(args, captioner.model.config.sample)

    def results() -> Iterator[CaptionResult | tuple[CaptionResult, list[Any]]]:
        if not args.trajectory:
            yield from captioner.caption_stream((p for _, p in todo), indices=(k for k, _ in todo),
                                                steps=args.steps, guidance=args.guidance, seed=args.seed,
                                                candidates=args.candidates, select=args.select,
                                                match_weight=args.match_weight, self_weight=args.self_weight,
                                                batch_size=args.batch_size)
            return
        for index, path in todo:  # the candidates `caption_stream` draws for this image, and the one it keeps
            try:
                samples = captioner.samples(load_image(path), args.candidates, steps=args.steps,
                                            guidance=args.guidance, seed=args.seed, index=index, select=args.select,
                                            match_weight=args.match_weight, self_weight=args.self_weight)
            except ImageLoadError as exc:
                yield CaptionResult(path, None, exc.reason)
                continue
            chosen = next(sample for sample in samples if sample.chosen)
            candidates = [sample.caption for sample in samples] if len(samples) > 1 else []
            yield CaptionResult(path, chosen.caption, candidates=candidates), chosen.trajectory

    failed = dict(found.failed)
    printed: list[dict[str, Any]] = []
    captioned, start = 0, time.perf_counter()
    bar = tqdm(total=len(todo), unit="img", desc="captioning", disable=not sys.stderr.isatty(), leave=False)
    batch: list[dict[str, Any]] = []
    try:
        for item in results():
            result, trajectory = item if isinstance(item, tuple) else (item, None)
            bar.update(1)
            if not result.ok:
                failed[result.path] = result.error or "unknown error"
                bar.write(f"failed: {display_path(result.path)}: {result.error}", file=sys.stderr)
                continue
            captioned += 1
            record = result.to_dict()
            if trajectory is not None:
                record["trajectory"] = [step.to_dict() for step in trajectory]
            if out is not None:
                batch.append(record)
                if len(batch) >= args.batch_size or trajectory is not None:
                    out.add(batch)
                    batch = []
            elif args.json:
                printed.append(record)
            elif trajectory is not None:
                kept = f" (the kept one of {len(result.candidates)} samples)" if result.candidates else ""
                print(f"{display_path(result.path)}:{kept}")
                for line in format_trajectory(trajectory, confidence=args.confidence):
                    print(f"  {line}")
            else:
                caption = result.caption
                print(f"{display_path(result.path)}\t{caption}" if len(found.images) > 1 else caption, flush=True)
        if out is not None:
            out.add(batch)
            total = out.finish()
    except BaseException:
        if out is not None:  # interrupted: what was captioned stays in the .partial file
            out.close()
            print(f"{captioned} captions kept in {display_path(out.partial)}: run the same command with --resume "
                  "to continue", file=sys.stderr)
        raise
    finally:
        bar.close()
    seconds = time.perf_counter() - start
    if args.json and out is None:
        print(json.dumps(printed, indent=1))
    summary = f"captioned {captioned}, failed {len(failed)}"
    if out is not None and len(todo) < len(found.images):
        summary += f", already in {args.output} {len(found.images) - len(todo)}"
    if found.skipped:
        summary += f"; skipped {found.skipped_summary()}"
    if captioned:
        summary += f" ({captioned / max(seconds, 1e-9):.3g} images/s)"
    if out is not None:
        summary += f"; wrote {total} records to {args.output}"
    if len(found.images) > 1 or failed or out is not None or found.skipped:
        print(summary, file=sys.stderr)
    return 1 if failed else 0


def _listed(failures: dict[str, str], limit: int = 5) -> str:
    """'a.jpg (missing), b.jpg (truncated), ... and 3 more'"""
    shown = ", ".join(f"{key} ({reason})" for key, reason in list(failures.items())[:limit])
    return shown + (f", ... and {len(failures) - limit} more" if len(failures) > limit else "")


def _refuse_unreadable(failures: dict[str, str], total: int, split: str) -> None:
    if failures:
        raise ValueError(f"{len(failures)} of the {total} {split} images cannot be read: {_listed(failures)}; fix "
                         "them, or pass --on-error skip to score the others")


def cmd_evaluate(args: argparse.Namespace) -> int:
    from diffcap.config import DataConfig
    from diffcap.data.prepare import FeatureTable, default_cache_dir, ensure_features, split_records
    from diffcap.evaluate import evaluate_records
    from diffcap.metrics import format_table
    from diffcap.pipeline import load_model, load_reranker
    from diffcap.encoders.base import build_encoder

    from diffcap.app import resolve_checkpoint

    args.checkpoint = resolve_checkpoint(args.checkpoint)  # none given: the checkpoint shipped with diffcap
    model, meta = load_model(args.checkpoint)
    data = DataConfig(dataset=args.dataset, root=str(args.root), image_root=str(args.image_root or ""),
                      annotations=str(args.annotations or ""))
    records = split_records(data, args.split, keep_missing=True)  # a missing file is reported below, with its name
    if args.limit:
        records = records[: args.limit]
    leaked = model.trained_on([r.key for r in records])
    if leaked and not args.allow_training_images:
        raise ValueError(
            f"{len(leaked)} of the {len(records)} {args.split} images were training images of this checkpoint "
            f"(e.g. {', '.join(leaked[:3])}); their scores would be inflated. Evaluate on a held-out split, or "
            "pass --allow-training-images to measure fit on training data on purpose"
        )
    encoder = build_encoder(model.config.encoder.name)
    cache_root = args.cache_dir or default_cache_dir(args.dataset, args.root, model.config.encoder.name)
    if args.on_error == "fail":  # refuse before any work: every file exists and has an image header
        from diffcap.data.collection import unreadable

        _refuse_unreadable(unreadable({r.key: r.path for r in records}), len(records), args.split)
    cache = ensure_features(encoder, records, cache_root / args.split, on_error=args.on_error)
    skipped = {r.key: cache.failed.get(r.key, "no features") for r in records if r.key not in cache}
    if args.on_error == "fail":  # a file broken past its header, or one an earlier cache already knew
        _refuse_unreadable(skipped, len(records), args.split)
    elif skipped:
        print(f"warning: {len(skipped)} of the {len(records)} {args.split} images could not be read and are left out "
              f"of the scores: {_listed(skipped)}", file=sys.stderr)
    usable = [r for r in records if r.key in cache]
    table = FeatureTable.from_cache(cache, [r.key for r in usable])
    if args.shuffle_features:
        table = table.shuffled(seed=0)
    # the sampler settings used: each flag given, or the checkpoint's own default
    settings = {name: getattr(model.config.sample, name) if getattr(args, name) is None else getattr(args, name)
                for name in ("steps", "guidance", "clamp", "collapse_repeats", "end_penalty", "seed", "candidates",
                             "beam_size", "precision", "time_difference", "eta", "solver", "spacing", "length",
                             "select", "match_weight", "self_weight")}
    if not model.autoregressive and not _self_weight_used(args, model.config.sample):
        settings["self_weight"] = 0.0  # the choice does not use the matcher: recorded as unused
    reranker = None
    if args.rerank is not None:
        reranker = load_reranker(args.rerank, model, meta)
        if settings["candidates"] < 2:
            raise ValueError("--rerank chooses among several samples: give --candidates N (N >= 2)")
    result = evaluate_records(model, usable, table, reranker=reranker, **settings)
    settings["rerank"] = None if args.rerank is None else str(args.rerank)
    result = {
        "metrics": result["metrics"],
        "unavailable": result["unavailable"],
        "checkpoint": str(args.checkpoint),
        "dataset": args.dataset,
        "split": args.split,
        **settings,
        "shuffled_features": bool(args.shuffle_features),
        "num_images": result["num_images"],
        "training_images_evaluated": len(leaked),
        "skipped_images": sorted(skipped),
        "skipped_reasons": skipped,
        "captions_per_second": result["captions_per_second"],
        "captions": result["captions"],
    }
    from diffcap.metrics import MetricReport

    print(format_table(MetricReport(result["metrics"], result["unavailable"])))
    if args.output:
        from diffcap.checkpoint import write_text_atomic

        write_text_atomic(args.output, json.dumps(result, indent=2))
        print(f"wrote {args.output}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from diffcap.demo import run_demo

    page = run_demo(Path(args.out), minutes=args.minutes)
    print(f"demo page: {page}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from diffcap.app import DEFAULT_PORT, Limits, build_service, run_benchmark, serve

    limits = Limits(max_bytes=int(args.max_upload_mb * 1e6), max_pixels=args.max_pixels, max_steps=args.max_steps)
    if not args.benchmark:
        serve(args.checkpoint, host=args.host, port=DEFAULT_PORT if args.port is None else args.port,
              limits=limits, examples=args.examples)
        return 0
    service = build_service(args.checkpoint, limits=limits, examples=args.examples)
    params = {k: v for k, v in {"steps": args.steps, "samples": 1}.items() if v is not None}
    result = run_benchmark(service, requests=args.benchmark, concurrency=args.concurrency, host=args.host,
                           port=args.port or 0, params=params)
    print(f"{result['requests']} requests, {result['concurrency']} concurrent, over localhost HTTP: "
          f"p50 {result['p50']:.3f} s  p90 {result['p90']:.3f} s  p99 {result['p99']:.3f} s  "
          f"max {result['max']:.3f} s  ({result['requests_per_second']:.2f} requests/s, {result['errors']} errors)")
    return 0 if result["errors"] == 0 else 1


def cmd_report(args: argparse.Namespace) -> int:
    from diffcap.report import build_report

    steps = [int(s) for s in args.steps.split(",") if s.strip()] if args.steps else []
    page = build_report(args.run_dir, args.out, sweep=not args.no_sweep, root=args.root, split=args.split,
                        cache_dir=args.cache_dir, limit=args.limit, steps=steps, gallery=args.gallery,
                        trajectories=args.trajectories, meteor=args.meteor)
    print(f"report: {page}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from diffcap.pipeline import export_model

    out = export_model(args.checkpoint, args.out, half=not args.fp32, sample=args.sample)
    size = sum(f.stat().st_size for f in out.iterdir()) / 2**20
    print(f"exported {args.checkpoint} -> {out} ({size:.1f} MiB)" +
          (f" with sampling defaults {' '.join(args.sample)}" if args.sample else ""))
    return 0


def cmd_distill_data(args: argparse.Namespace) -> int:
    from diffcap.config import DataConfig
    from diffcap.data.distill import best_captions, image_root, read_teacher_captions, teacher_rows, write_jsonl
    from diffcap.data.prepare import split_records

    data = DataConfig(dataset=args.dataset, root=str(args.root), image_root=str(args.image_root or ""),
                      annotations=str(args.annotations or ""))
    train, evaluation = split_records(data, args.train_split), split_records(data, args.eval_split)
    sources = [read_teacher_captions(path) for path in args.teacher]
    teacher = sources[0]
    if len(sources) > 1:
        teacher, wins = best_captions(train, sources)
        print("the caption with the best CIDEr-D against each image's references came from: " +
              ", ".join(f"{path} ({n} images)" for path, n in zip(args.teacher, wins)))
    rows = teacher_rows(train, teacher, evaluation, train_split=args.train_split,
                        eval_split=args.eval_split, keep_references=args.keep_references)
    folder = image_root(train + evaluation).resolve()
    out = write_jsonl(rows, args.out)
    print(f"wrote {out}: {len(train)} training images with the teacher's captions, {len(evaluation)} "
          f"{args.eval_split} images with their references. Train on it with:\n"
          f"  data.dataset=jsonl data.root={out} data.image_root={folder}")
    return 0


def _training_features(args: argparse.Namespace, model: Any, what: str) -> tuple[list, Any]:
    """(records, FeatureTable) of `args.split`, refused unless every image was a training image of `model`."""
    from diffcap.config import DataConfig
    from diffcap.data.prepare import FeatureTable, default_cache_dir, ensure_features, load_encoder, split_records

    data = DataConfig(dataset=args.dataset, root=str(args.root), image_root=str(args.image_root or ""),
                      annotations=str(args.annotations or ""))
    records = split_records(data, args.split)
    seen = set(model.trained_on([r.key for r in records]))
    if model.train_image_hashes is not None and len(seen) < len(records):
        raise ValueError(f"{len(records) - len(seen)} of the {len(records)} {args.split} images were not training "
                         f"images of {args.checkpoint}: fit the {what} on the split the model was trained on, "
                         "never on the one it is scored on")
    cache_root = args.cache_dir or default_cache_dir(args.dataset, args.root, model.config.encoder.name)
    cache = ensure_features(load_encoder(model.config.encoder.name), records, cache_root / args.split)
    usable = [r for r in records if r.key in cache]
    return usable, FeatureTable.from_cache(cache, [r.key for r in usable])


def cmd_fit_length(args: argparse.Namespace) -> int:
    from diffcap.pipeline import add_length_predictor, fit_length_predictor, load_model

    model, _ = load_model(args.checkpoint)
    if model.autoregressive:
        raise ValueError(f"{args.checkpoint} is an autoregressive model: it ends its captions itself")
    usable, table = _training_features(args, model, "length predictor")
    predictor = fit_length_predictor(model.space, table.pooled, [r.captions for r in usable])
    add_length_predictor(args.checkpoint, predictor)
    print(f"fitted a length predictor on {len(usable)} {args.split} images and stored it in {args.checkpoint}; "
          "sample with it by --length predicted (or sample.length=predicted)")
    return 0


def cmd_fit_matcher(args: argparse.Namespace) -> int:
    from diffcap.pipeline import add_matcher, fit_caption_matcher, load_model

    model, _ = load_model(args.checkpoint)
    if model.autoregressive:
        raise ValueError(f"{args.checkpoint} is an autoregressive model: it writes one caption, there is none "
                         "to choose among")
    usable, table = _training_features(args, model, "matcher")
    matcher = fit_caption_matcher(model, table.pooled, [r.captions for r in usable], progress=True)
    add_matcher(args.checkpoint, matcher)
    print(f"fitted an image-text matcher on {len(usable)} {args.split} images and stored it in {args.checkpoint}; "
          "choose among samples with it by --candidates N --select match (or sample.select=match)")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from diffcap.experiments import sweep

    runs, failed = sweep(args.config, args.grid, budget_minutes=args.budget_minutes, out=args.out,
                         fixed=args.overrides, evaluate=not args.no_evaluate, eval_limit=args.eval_limit,
                         dry_run=args.dry_run)
    if not args.dry_run:
        print(f"{len(runs)} runs under {args.out}; compare them with: diffcap compare {args.out}/*")
    if failed:
        print(f"error: {len(failed)} variant(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from diffcap.experiments import compare

    run_dirs = [d for d in args.run_dirs if (d / "config.json").is_file()]
    for d in args.run_dirs:
        if d not in run_dirs:
            print(f"skipping {d}: not a training run (no config.json)", file=sys.stderr)
    print(f"wrote {compare(run_dirs, args.out)}")
    return 0


def _add_selection_args(p: argparse.ArgumentParser) -> None:
    """How one caption is kept among --candidates N samples (caption and evaluate)."""
    p.add_argument("--rerank", type=Path, default=None, metavar="AR_CHECKPOINT",
                   help="with --candidates N: keep the candidate this autoregressive model (trained on the same "
                        "image features) finds most likely instead of the --select choice")
    p.add_argument("--select", choices=["mbr", "match"], default=None,
                   help="with --candidates N and no --rerank: keep the minimum-Bayes-risk candidate (mbr) or the "
                        "one the checkpoint's image-text matcher prefers (match) (default: the checkpoint's)")
    p.add_argument("--match-weight", type=float, default=None,
                   help="with --rerank: add this weight x the matcher's cosine to the re-ranker's likelihood "
                        "(default: the checkpoint's sample.match_weight)")
    p.add_argument("--self-weight", type=float, default=None,
                   help="with --candidates N: subtract this weight x the diffusion model's own denoising "
                        "cross-entropy of each candidate from the matcher's cosine (--select match, or --rerank "
                        "with --match-weight W > 0) "
                        "(default: the checkpoint's sample.self_weight)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffcap", description="Image captioning with a continuous diffusion language model")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging and full tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("features", help="compute and cache image features of a dataset")
    _add_dataset_args(p)
    p.add_argument("--split", action="append", help="split(s) to cache (default: every available split)")
    p.add_argument("--encoder", default="efficientnet_lite0", help="efficientnet_lite0, efficientnet_lite2 or clip:<model id or dir>")
    p.add_argument("--cache-dir", type=Path, default=None, help="default: runs/features/<dataset>-<root hash>-<encoder>")
    p.add_argument("--on-error", choices=["skip", "fail"], default="skip", help="unreadable images: skip and report, or stop")
    p.add_argument("--batch-size", type=int, default=64)
    p.set_defaults(func=cmd_features)

    p = sub.add_parser("train", help="train a diffusion captioner")
    p.add_argument("config", help="preset name (default, tiny) or a JSON config file")
    p.add_argument("overrides", nargs="*", help="section.field=value, e.g. train.lr=1e-4 model.layers=4")
    p.add_argument("--run-dir", type=Path, default=None, help="default: runs/<config>-<differences to its preset>")
    p.add_argument("--resume", action="store_true", help="continue the checkpoint in --run-dir")
    p.add_argument("--stop-after", type=float, default=None, metavar="MINUTES",
                   help="end this process after MINUTES of wall time with a resumable checkpoint; the run's "
                        "schedule still follows train.max_minutes, counted across sittings (continue with --resume)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "caption", help="caption images and folders of images (with the shipped model, or a checkpoint named first)",
        description="Caption image files and folders. The first PATH is the model when it is a checkpoint folder "
                    "(one with a meta.json, as `diffcap train` and `export` write); any other folder is a folder of "
                    "images, read by content (hidden files and non-images are skipped and counted). A folder that "
                    "is both is refused: name the model with --checkpoint. Files that cannot be read are reported "
                    "on stderr and the rest are captioned; the exit code is 1 when any failed.")
    p.add_argument("paths", nargs="+", metavar="[CHECKPOINT] PATH",
                   help="image files and folders (the first may be a checkpoint folder)")
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="the model, explicitly (then every PATH is an image or a folder)")
    p.add_argument("-r", "--recursive", action="store_true", help="also caption the images in subfolders")
    p.add_argument("--output", type=Path, default=None,
                   help="write the captions to a .jsonl, .csv or .json file (atomically) instead of stdout")
    p.add_argument("--resume", action="store_true",
                   help="with --output: skip the images already in that file (or in its .partial file, left by an "
                        "interrupted run) and add the rest")
    p.add_argument("--batch-size", type=int, default=32, help="images loaded and captioned at a time (default 32)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--guidance", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--candidates", type=int, default=None,
                   help="sample N captions per image and keep one (--select; N times slower; default: the "
                        "checkpoint's sample.candidates); JSON/CSV outputs list the N candidates too")
    _add_selection_args(p)
    p.add_argument("--trajectory", action="store_true", help="print the rounded caption at every denoising step of the "
                                                           "sample the caption keeps")
    p.add_argument("--confidence", action="store_true", help="with --trajectory: each word piece's confidence too")
    p.add_argument("--json", action="store_true",
                   help="print JSON records ({path, caption, ...}) instead of text (with --trajectory: the "
                        "kept sample as the web app's API returns it, with its path and the candidates)")
    p.set_defaults(func=cmd_caption)

    p = sub.add_parser("evaluate", help="caption a split and score it (pycocoevalcap, PTB tokenisation)")
    p.add_argument("checkpoint", type=Path, nargs="?", default=None,
                   help="checkpoint directory (default: the one shipped with diffcap)")
    _add_dataset_args(p)
    p.add_argument("--split", default="dev", choices=["train", "dev", "test"])
    p.add_argument("--limit", type=int, default=None, help="first N images only")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--guidance", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--cache-dir", type=Path, default=None)
    p.add_argument("--clamp", action=argparse.BooleanOptionalAction, default=None,
                   help="snap predictions to the nearest word embeddings at every step (default: the checkpoint's)")
    p.add_argument("--collapse-repeats", action=argparse.BooleanOptionalAction, default=None,
                   help="merge immediate repeats of a word when decoding (default: the checkpoint's)")
    p.add_argument("--end-penalty", type=float, default=None,
                   help="rounding margin against ending the caption (default: the checkpoint's sample.end_penalty)")
    p.add_argument("--candidates", type=int, default=None,
                   help="diffusion: sample N captions per image, keep one (--select; default: the checkpoint's)")
    p.add_argument("--beam-size", type=int, default=None,
                   help="autoregressive baseline: beam width, 1 = greedy (default: the checkpoint's)")
    p.add_argument("--precision", choices=["fp32", "bf16"], default=None,
                   help="the network's matmuls while sampling (default: the checkpoint's sample.precision)")
    p.add_argument("--time-difference", type=int, default=None,
                   help="tell the network a time this much later than the true one (default: the checkpoint's)")
    p.add_argument("--eta", type=float, default=None,
                   help="0 = deterministic DDIM steps, 1 = DDPM-like fresh noise (default: the checkpoint's)")
    p.add_argument("--solver", choices=["ddim", "dpmpp_2m"], default=None,
                   help="sampler update: DDIM or DPM-Solver++(2M), second order (default: the checkpoint's)")
    p.add_argument("--spacing", choices=["linspace", "trailing"], default=None,
                   help="timesteps T-1..0 (linspace) or T-1..T/S-1 (trailing: no step spent at t=0) "
                        "(default: the checkpoint's)")
    _add_selection_args(p)
    p.add_argument("--length", choices=["free", "predicted"], default=None,
                   help="diffusion: let the denoiser end each caption (free), or fix its length from the image with "
                        "the checkpoint's length predictor (predicted) (default: the checkpoint's sample.length)")
    p.add_argument("--shuffle-features", action="store_true",
                   help="control experiment: give every image another image's features")
    p.add_argument("--output", type=Path, default=None, help="write metrics and captions as JSON")
    p.add_argument("--on-error", choices=["skip", "fail"], default="skip",
                   help="images that cannot be read: leave them out of the scores with a warning naming them "
                        "(skip, default), or refuse before any work (fail)")
    p.add_argument("--allow-training-images", action="store_true",
                   help="evaluate even images the checkpoint was trained on (refused by default: leakage)")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("serve", help="a web page (and JSON API) to caption images and watch the denoising")
    p.add_argument("checkpoint", type=Path, nargs="?", default=None,
                   help="checkpoint directory (default: the checkpoint shipped with diffcap, if any)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    p.add_argument("--port", type=int, default=None, help="port (default 7860; 0 = any free port)")
    p.add_argument("--max-upload-mb", type=float, default=8.0, help="largest accepted upload, in MB")
    p.add_argument("--max-pixels", type=int, default=25_000_000, help="largest accepted image, width x height")
    p.add_argument("--max-steps", type=int, default=100, help="most denoising steps a request may ask for")
    p.add_argument("--examples", type=Path, default=None,
                   help="folder of example images to offer (default: the photos shipped with diffcap)")
    p.add_argument("--benchmark", type=int, default=0, metavar="N",
                   help="instead of serving: send N caption requests over localhost and print latency percentiles")
    p.add_argument("--concurrency", type=int, default=8, help="with --benchmark: clients sending at once")
    p.add_argument("--steps", type=int, default=None, help="with --benchmark: denoising steps per request")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("export", help="a captioning-only copy of a checkpoint (fp16 weights, no training state)")
    p.add_argument("checkpoint", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--fp32", action="store_true", help="keep the weights in fp32")
    p.add_argument("sample", nargs="*", metavar="sample.FIELD=VALUE",
                   help="sampling defaults of the copy (e.g. sample.candidates=8 sample.select=match)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("distill-data", help="a jsonl dataset whose training captions are a teacher's (sequence-level "
                                            "distillation; see diffcap/data/distill.py)")
    p.add_argument("teacher", type=Path, nargs="+",
                   help="the teacher's captions of the training split: an `evaluate --output` file; with several "
                        "(e.g. samples under different --seed), each image keeps the one with the best CIDEr-D "
                        "against its references")
    _add_dataset_args(p)
    p.add_argument("--train-split", default="train")
    p.add_argument("--eval-split", default="dev", help="kept with its own references")
    p.add_argument("--keep-references", action="store_true", help="train on the references too, after the teacher's")
    p.add_argument("--out", type=Path, required=True, help="the jsonl to write")
    p.set_defaults(func=cmd_distill_data)

    for name, func, help_text in (
            ("fit-length", cmd_fit_length, "add a caption-length predictor to a diffusion checkpoint trained before "
                                           "training fitted one (for --length predicted)"),
            ("fit-matcher", cmd_fit_matcher, "add an image-text matcher to a diffusion checkpoint, to choose among "
                                             "its samples (--candidates N --select match)")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("checkpoint", type=Path, help="checkpoint directory (rewritten atomically)")
        _add_dataset_args(p)
        p.add_argument("--split", default="train", help="the split the checkpoint was trained on (default train)")
        p.add_argument("--cache-dir", type=Path, default=None)
        p.set_defaults(func=func)

    p = sub.add_parser("sweep", help="train (and evaluate) every variant of a config grid with the same budget and seed")
    p.add_argument("config", help="base preset name or JSON file")
    p.add_argument("overrides", nargs="*", help="key=value overrides shared by every variant")
    p.add_argument("--grid", action="append", default=[], required=True, metavar="KEY=V1,V2",
                   help="a config key and the values to try; repeat for a full product of several keys")
    p.add_argument("--budget-minutes", type=float, required=True, help="training wall-clock budget of each run")
    p.add_argument("--out", type=Path, default=Path("runs/sweep"), help="parent folder of the run directories")
    p.add_argument("--eval-limit", type=int, default=None, help="score each run on the first N eval images only")
    p.add_argument("--no-evaluate", action="store_true", help="train only (compare then uses training's own evals)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the train/evaluate commands (to launch one per GPU elsewhere) instead of running them")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("compare", help="a Markdown table and plots comparing training runs")
    p.add_argument("run_dirs", type=Path, nargs="+")
    p.add_argument("--out", type=Path, default=Path("runs/compare"), help="folder for compare.md and the PNGs")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("report", help="figures and an HTML page about a training run (losses, dev scores, "
                                      "scores vs sampling steps, trajectories, a gallery)")
    p.add_argument("run_dir", type=Path, help="a run directory of `diffcap train` (tb/, evals.jsonl, checkpoint/)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: RUN_DIR/report)")
    p.add_argument("--limit", type=int, default=50, help="dev images captioned for the report (default 50)")
    p.add_argument("--steps", default="1,5,10,20", help="sampling step counts of the sweep, comma-separated")
    p.add_argument("--no-sweep", action="store_true", help="skip the scores-vs-steps sweep (the expensive part)")
    p.add_argument("--gallery", type=int, default=12, help="dev images shown with their captions")
    p.add_argument("--trajectories", type=int, default=3, help="dev images whose denoising is drawn")
    p.add_argument("--meteor", action="store_true", help="also METEOR in the sweep (starts Java; slower)")
    p.add_argument("--root", default=None, help="dataset folder, if it moved since training (default: the run's)")
    p.add_argument("--split", default=None, help="split to caption (default: the run's eval split, else dev)")
    p.add_argument("--cache-dir", type=Path, default=None, help="feature cache (default: the run's)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("demo", help="train a small model on generated shape images and caption held-out ones into an HTML page")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--minutes", type=float, default=4.0)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    if int(os.environ.get("RANK", "0")) > 0 and not args.verbose:  # other processes of `accelerate launch`
        logging.getLogger("diffcap").setLevel(logging.WARNING)
    for noisy in ("transformers", "accelerate", "timm", "httpx", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if args.verbose:
        return args.func(args)
    try:
        return args.func(args)
    except _known_errors() as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
