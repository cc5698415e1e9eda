"""The performance suite: `python -m diffcap.bench` prints a table and writes JSON.

Every figure is measured in one run, next to the machine's own ceiling (matmul GFLOP/s at the model's shapes in
fp32 and bf16), so results are read as ratios that survive a noisy, shared machine:

- ceiling: the best matmul GFLOP/s over the denoiser's shapes (attention and feed-forward projections, rounding
  head) at the batch-64 sequence length, fp32 and bf16;
- sampling: ms per caption at batch 1 and captions/s at batch 64, for each step count, with and without
  guidance; achieved GFLOP/s of the denoiser (FLOPs counted by torch's FlopCounterMode) / the ceiling;
- autoregressive baseline (when given): greedy and beam, batch 1 and 64; the diffusion / AR latency ratio
  at the smallest diffusion step count whose CIDEr reaches AR greedy's, read from `diffcap evaluate` outputs
  (`--quality`); without them, or when no step count reaches it, at `--matched-steps`, flagged as not matched;
- training: training samples/s of one optimisation step of the diffusion model at the training batch size
  (forward, backward, AdamW; bf16 autocast as training runs) and its fraction of the bf16 ceiling;
- feature extraction images/s; cold start and peak memory of `diffcap caption IMAGE` (a fresh process).

Runs on a GPU unchanged (`--device cuda`; the card's name is recorded). `--tiny` benchmarks randomly initialised
tiny models on generated images in seconds: what the CI test runs to keep the suite working.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from diffcap.checkpoint import write_text_atomic
from diffcap.config import LossConfig
from diffcap.models.denoiser import ImageFeatures
from diffcap.pipeline import CaptionModel, build_model, generate, load_model, training_losses

STEPS = (1, 2, 5, 10, 20, 50)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timeit(fn: Callable[[], Any], device: torch.device, *, repeats: int, warmup: int = 1,
           reduce: Callable[[list[float]], float] = statistics.median) -> float:
    """Median (or `reduce`) of the seconds of `fn` over `repeats` runs after `warmup` runs."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return reduce(times)


# -- the ceiling -----------------------------------------------------------------------------------------------


def model_matmuls(model: CaptionModel, rows: int) -> dict[str, tuple[int, int, int]]:
    """The denoiser's matmul shapes (m, k, n) at `rows` sequence positions: attention projections, the
    feed-forward pair, the output projection and the rounding head (latents @ word table)."""
    s = model.denoiser.shape
    H, I, D, V = s.hidden, s.intermediate, s.latent_dim, model.space.vocab_size
    return {"attention projection": (rows, H, H), "feed-forward in": (rows, H, I), "feed-forward out": (rows, I, H),
            "output projection": (rows, H, D), "rounding head": (rows, D, V)}


def matmul_ceiling(shapes: dict[str, tuple[int, int, int]], device: torch.device, *,
                   repeats: int = 10) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """The machine's ceiling per precision: the best matmul GFLOP/s over the model's shapes, and every shape's
    figure. (One shape alone understates it: a sampler can beat the feed-forward shape's rate on the others.)
    Each shape's figure is its fastest run, not the median: a ceiling is what the machine can do, and on a shared
    machine a disturbed median once halved it (BENCHMARKS.md), which doubled every fraction."""
    per_shape: dict[str, dict[str, float]] = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        per_shape[name] = {}
        for label, (m, k, n) in shapes.items():
            a = torch.randn(m, k, device=device, dtype=dtype)
            b = torch.randn(k, n, device=device, dtype=dtype)

            def run() -> None:
                for _ in range(4):
                    a @ b

            seconds = timeit(run, device, repeats=repeats, warmup=2, reduce=min)
            per_shape[name][label] = 4 * 2 * m * k * n / seconds / 1e9
    return {name: max(figures.values()) for name, figures in per_shape.items()}, per_shape


def count_flops(fn: Callable[[], Any]) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


# -- models ----------------------------------------------------------------------------------------------------


def fake_features(model: CaptionModel, batch: int, seed: int = 0) -> ImageFeatures:
    """Random features of the shapes the model was built for (sampling speed does not depend on values)."""
    s = model.denoiser.shape
    g = torch.Generator().manual_seed(seed)
    return ImageFeatures(torch.randn(batch, s.pooled_dim, generator=g), torch.randn(batch, 49, s.grid_dim, generator=g))


def tiny_models() -> tuple[CaptionModel, CaptionModel]:
    """(diffusion, autoregressive) tiny random models of the tiny preset, built offline in seconds."""
    from diffcap.config import load_config

    captions = ["a dog runs on the grass", "a red car on a street", "two children play in the snow"]
    torch.manual_seed(0)
    diffusion = build_model(load_config("tiny"), 64, 32, captions=captions)
    ar = build_model(load_config("tiny", ["model.kind=autoregressive"]), 64, 32, captions=captions)
    return diffusion, ar


# -- sections --------------------------------------------------------------------------------------------------


@dataclass
class Results:
    machine: dict[str, Any] = field(default_factory=dict)
    ceiling: dict[str, float] = field(default_factory=dict)  # per precision: the best over ceiling_shapes
    ceiling_shapes: dict[str, dict[str, float]] = field(default_factory=dict)  # precision -> shape -> GFLOP/s
    sampling: list[dict[str, Any]] = field(default_factory=list)
    autoregressive: list[dict[str, Any]] = field(default_factory=list)
    ratios: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    features: dict[str, Any] = field(default_factory=dict)
    caption_process: dict[str, Any] = field(default_factory=dict)
    levers: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def bench_sampling(model: CaptionModel, device: torch.device, ceiling: dict[str, float], *, steps: tuple[int, ...],
                   batches: tuple[int, ...], guidances: tuple[float, ...], precision: str, repeats: int) -> list[dict[str, Any]]:
    rows = []
    per_forward = {b: count_flops(lambda b=b: generate(model, fake_features(model, b).to(device), steps=1,
                                                       precision="fp32")) for b in batches}
    for b in batches:
        image = fake_features(model, b).to(device)
        for w in guidances:
            for n in steps:
                seconds = timeit(lambda: generate(model, image, steps=n, guidance=w, precision=precision), device,
                                 repeats=repeats)
                flops = per_forward[b] * n * (2 if w > 0 else 1)
                gflops = flops / seconds / 1e9
                rows.append({"batch": b, "steps": n, "guidance": w, "precision": precision,
                             "ms_per_caption": 1000 * seconds / b, "captions_per_s": b / seconds,
                             "gflops": gflops, "fraction_of_ceiling": gflops / ceiling[precision]})
    return rows


def bench_autoregressive(model: CaptionModel, device: torch.device, *, batches: tuple[int, ...], beams: tuple[int, ...],
                         precision: str, repeats: int) -> list[dict[str, Any]]:
    rows = []
    for b in batches:
        image = fake_features(model, b).to(device)
        for k in beams:
            seconds = timeit(lambda: generate(model, image, beam_size=k, precision=precision), device, repeats=repeats)
            rows.append({"batch": b, "beam_size": k, "precision": precision, "ms_per_caption": 1000 * seconds / b,
                         "captions_per_s": b / seconds})
    return rows


def with_settings(model: CaptionModel, section: str, **fields: Any) -> CaptionModel:
    """`model` with `config.<section>`'s `fields` replaced (same weights): a lever's other setting."""
    changed = dataclasses.replace(getattr(model.config, section), **fields)
    return dataclasses.replace(model, config=dataclasses.replace(model.config, **{section: changed}))


def training_step(model: CaptionModel, device: torch.device, *, batch: int,
                  precision: str = "bf16") -> Callable[[], None]:
    """One AdamW step of the denoiser on random captions and features (without self-conditioning's no-grad pass),
    in `precision` autocast as training runs; the network is left in train mode."""
    net = model.denoiser.to(device).train()
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4)
    ids = torch.randint(0, model.space.vocab_size, (batch, model.space.max_length), device=device)
    image = fake_features(model, batch).to(device)
    keep = torch.ones(batch, dtype=torch.bool, device=device)

    def step() -> None:
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            losses = training_losses(model, net, ids, image, keep, self_condition=False)
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        optimizer.step()

    return step


def bench_training(model: CaptionModel, device: torch.device, ceiling: dict[str, float], *, batch: int,
                   repeats: int, epoch_captions: int | None, precision: str = "bf16") -> dict[str, Any]:
    step = training_step(model, device, batch=batch, precision=precision)
    flops = count_flops(step)
    seconds = timeit(step, device, repeats=repeats)
    samples = batch * model.config.train.samples_per_caption
    model.denoiser.eval()
    out = {"batch": batch, "precision": precision, "samples_per_s": samples / seconds, "seconds_per_step": seconds,
           "gflops": flops / seconds / 1e9, "fraction_of_ceiling": flops / seconds / 1e9 / ceiling[precision],
           "note": f"one AdamW step, {precision}, rounding head in {model.config.loss.rounding_precision} precision, "
                   "without self-conditioning's extra no-grad pass"}
    if epoch_captions:
        out["minutes_per_epoch"] = epoch_captions / (samples / seconds) / 60
    return out


def pytorch_dropout_and_attention() -> contextlib.ExitStack:
    """A context in which the networks use PyTorch's F.dropout and SDPA (with its own dropout) in training, as
    before models/ops.py: the "before" of that lever."""
    from unittest import mock

    def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, p: float = 0.0, causal: bool = False,
             training: bool = False) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=p if training else 0.0, is_causal=causal)

    stack = contextlib.ExitStack()
    for target, value in (("diffcap.models.denoiser.dropout", F.dropout), ("diffcap.models.denoiser.attention", sdpa),
                          ("diffcap.models.autoregressive.dropout", F.dropout)):
        stack.enter_context(mock.patch(target, value))
    return stack


def bench_levers(model: CaptionModel, device: torch.device, *, steps: int, batches: tuple[int, ...], repeats: int,
                 compile_: bool = True) -> list[dict[str, Any]]:
    """Sampling time with each lever of the performance issue off and on, one at a time, at `steps` steps:
    fp32 vs bf16 matmuls; the image condition (prefix positions, cross-attention keys/values) computed once per
    call vs at every step; one thread vs all; torch.compile of the denoiser's forward."""
    from unittest import mock

    def uncached(denoiser: Any, image: ImageFeatures | None, guidance: float = 0.0) -> Callable[..., torch.Tensor]:
        return lambda x_t, t, self_cond: denoiser(x_t, t, image, None, self_cond)  # condition rebuilt every step

    rows = []

    def record(lever: str, setting: str, b: int, fn: Callable[[], Any]) -> None:
        seconds = timeit(fn, device, repeats=repeats)
        rows.append({"lever": lever, "setting": setting, "batch": b, "steps": steps,
                     "ms_per_caption": 1000 * seconds / b, "captions_per_s": b / seconds})

    threads = torch.get_num_threads()
    for b in batches:
        image = fake_features(model, b).to(device)
        run = lambda precision="fp32": generate(model, image, steps=steps, precision=precision)  # noqa: E731
        record("precision", "fp32", b, run)
        record("precision", "bf16", b, lambda: run("bf16"))
        with mock.patch("diffcap.pipeline.conditioned", uncached):
            record("image condition", "every step", b, run)
        record("image condition", "once per call", b, run)
        if device.type == "cpu" and threads > 1:
            torch.set_num_threads(1)
            try:
                record("threads", "1", b, run)
            finally:
                torch.set_num_threads(threads)
            record("threads", str(threads), b, run)
    if compile_:
        plain = model.denoiser.forward
        model.denoiser.forward = torch.compile(plain)  # type: ignore[method-assign]
        try:
            for b in batches:
                image = fake_features(model, b).to(device)
                run = lambda: generate(model, image, steps=steps)  # noqa: E731
                start = time.perf_counter()
                run()  # compiles (once per batch shape)
                compile_s = time.perf_counter() - start
                record("torch.compile", "compiled", b, run)
                rows[-1]["first_call_s"] = compile_s
        finally:
            model.denoiser.forward = plain  # type: ignore[method-assign]
        for b in batches:
            image = fake_features(model, b).to(device)
            record("torch.compile", "eager", b, lambda: generate(model, image, steps=steps))
    return rows


def bench_features(encoder_name: str, device: torch.device, *, batch: int, repeats: int) -> dict[str, Any]:
    from PIL import Image

    from diffcap.encoders.base import build_encoder

    encoder = build_encoder(encoder_name).to(device)
    g = torch.Generator().manual_seed(0)
    images = [Image.fromarray(torch.randint(0, 255, (300, 400, 3), generator=g, dtype=torch.uint8).numpy())
              for _ in range(batch)]
    seconds = timeit(lambda: encoder.encode(images), device, repeats=repeats)
    return {"encoder": encoder_name, "batch": batch, "images_per_s": batch / seconds,
            "note": "preprocessing + forward, in memory (no JPEG decoding)"}


def _peak_rss_gb(pid: int) -> float | None:
    """The process's own high-water mark (VmHWM; Linux), or None where /proc has no such field."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        return None
    return None


def bench_caption_process(checkpoint: Path, image: Path, device: str) -> dict[str, Any]:
    """Wall time and peak RSS of a fresh `diffcap caption CHECKPOINT IMAGE` process.

    The peak is the child's own VmHWM, polled until it exits (getrusage's children figure would count the
    pages a forked child shares with this, much larger, process)."""
    start = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-m", "diffcap.cli", "caption", str(checkpoint), str(image)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "HF_HUB_OFFLINE": "1"})
    peak = None
    while child.poll() is None:
        value = _peak_rss_gb(child.pid)
        peak = value if peak is None or (value is not None and value > peak) else peak
        time.sleep(0.02)
    seconds = time.perf_counter() - start
    stdout, stderr = child.communicate()
    if child.returncode != 0:
        return {"error": stderr.strip()[-500:]}
    return {"cold_start_s": seconds, "peak_rss_gb": peak,
            "caption": stdout.strip().splitlines()[-1] if stdout.strip() else ""}


def quality_match(files: list[Path], diffusion_checkpoint: Path, ar_checkpoint: Path,
                  metric: str = "CIDEr") -> dict[str, Any]:
    """The smallest diffusion step count whose `metric` reaches the AR baseline's greedy score, from
    `diffcap evaluate --output` files of both checkpoints on the same images (None when no step count does).

    Each file is assigned to a checkpoint by its recorded path; files must share the split and the number of
    images, diffusion files must use single-sample unguided sampling with one file per step count, and the AR
    file must be greedy — anything else is refused, since it would not compare like with like."""
    def same(a: str | Path, b: Path) -> bool:
        return Path(a).resolve() == b.resolve()

    ar_score: float | None = None
    by_steps: dict[int, float] = {}
    scope: set[tuple[Any, Any]] = set()
    for f in files:
        try:
            data = json.loads(Path(f).read_text())
            checkpoint, score = data["checkpoint"], float(data["metrics"][metric])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{f}: not a `diffcap evaluate --output` file with {metric} ({e})") from e
        scope.add((data.get("split"), data.get("num_images")))
        if same(checkpoint, ar_checkpoint):
            if data.get("beam_size", 1) != 1 or ar_score is not None:
                raise ValueError(f"{f}: the AR baseline needs exactly one greedy evaluation (beam size 1)")
            ar_score = score
        elif same(checkpoint, diffusion_checkpoint):
            if data.get("candidates", 1) != 1 or data.get("guidance", 0.0) != 0.0:
                raise ValueError(f"{f}: only single-sample, unguided diffusion evaluations are comparable")
            if data["steps"] in by_steps:
                raise ValueError(f"{f}: a second evaluation at {data['steps']} steps")
            by_steps[int(data["steps"])] = score
        else:
            raise ValueError(f"{f}: evaluates {checkpoint}, neither --checkpoint nor --ar-checkpoint")
    if len(scope) > 1:
        raise ValueError(f"the evaluations cover different images (split, images): {sorted(scope, key=str)}")
    if ar_score is None or not by_steps:
        raise ValueError("--quality needs a greedy evaluation of the AR baseline and at least one of the diffusion model")
    reaching = [n for n in sorted(by_steps) if by_steps[n] >= ar_score]
    return {"metric": metric, "ar_greedy": ar_score, "diffusion_by_steps": dict(sorted(by_steps.items())),
            "matched_steps": reaching[0] if reaching else None}


# -- the suite -------------------------------------------------------------------------------------------------


def run(args: argparse.Namespace, quality: dict[str, Any] | None = None) -> Results:
    """The whole suite; `quality` (from `quality_match`) picks the step count of the diffusion / AR ratios."""
    device = torch.device(args.device)
    results = Results()
    results.machine = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
                       "threads": torch.get_num_threads(), "device": str(device),
                       "cuda": torch.cuda.get_device_name(device) if device.type == "cuda" else None}
    if args.tiny:
        diffusion, ar = tiny_models()
        steps, batches, repeats = (1, 2), (1, 4), 1
    else:
        diffusion = load_model(args.checkpoint)[0]
        ar = load_model(args.ar_checkpoint)[0] if args.ar_checkpoint else None
        steps, batches, repeats = tuple(args.steps), (1, args.batch), args.repeats
    diffusion.denoiser.to(device).eval()
    diffusion.space.to(device)
    s = diffusion.denoiser.shape
    rows = batches[-1] * (s.prefix_length + s.max_length)
    results.ceiling, results.ceiling_shapes = matmul_ceiling(model_matmuls(diffusion, rows), device,
                                                             repeats=3 if args.tiny else 10)
    matched = quality["matched_steps"] if quality and quality["matched_steps"] else args.matched_steps
    if args.tiny:
        matched = steps[-1]
    elif matched not in steps:
        steps = tuple(sorted({*steps, matched}))
    precision = args.precision
    guidances = (0.0, args.guidance) if args.guidance > 0 else (0.0,)
    results.sampling = bench_sampling(diffusion, device, results.ceiling, steps=steps, batches=batches,
                                      guidances=guidances, precision=precision, repeats=repeats)
    if ar is not None:
        ar.denoiser.to(device).eval()
        ar.space.to(device)
        results.autoregressive = bench_autoregressive(ar, device, batches=batches, beams=(1, args.beam),
                                                      precision=precision, repeats=repeats)
        diff1 = next(r for r in results.sampling if r["batch"] == 1 and r["steps"] == matched and r["guidance"] == 0)
        greedy1 = next(r for r in results.autoregressive if r["batch"] == 1 and r["beam_size"] == 1)
        # "quality_matched": None = not checked (no --quality), False = no step count reaches AR greedy's score,
        # in which case the ratios are at --matched-steps and are not the quality-matched figure
        results.ratios = {"steps": matched,
                          "quality_matched": None if quality is None else quality["matched_steps"] is not None,
                          "latency_diffusion_over_ar_greedy_batch1": diff1["ms_per_caption"] / greedy1["ms_per_caption"]}
        if quality is not None:
            results.ratios["quality"] = quality
        big = batches[-1]
        diffb = next(r for r in results.sampling if r["batch"] == big and r["steps"] == matched and r["guidance"] == 0)
        greedyb = next(r for r in results.autoregressive if r["batch"] == big and r["beam_size"] == 1)
        results.ratios[f"throughput_diffusion_over_ar_greedy_batch{big}"] = diffb["captions_per_s"] / greedyb["captions_per_s"]
    if args.levers:
        results.levers = bench_levers(diffusion, device, steps=args.matched_steps if not args.tiny else 2,
                                      batches=batches, repeats=repeats, compile_=not args.no_compile)
    # training is timed with today's default loss settings (the target is the default config's throughput), not
    # the ones recorded in the checkpoint, which may predate a faster default
    trainee = dataclasses.replace(diffusion, config=dataclasses.replace(diffusion.config, loss=LossConfig()))
    results.training = bench_training(trainee, device, results.ceiling, batch=batches[-1] if args.tiny else 64,
                                      repeats=repeats, epoch_captions=None if args.tiny else args.epoch_captions)
    if args.levers:
        batch = results.training["batch"]

        def lever(name: str, setting: str, row: dict[str, Any]) -> None:
            results.levers.append({"lever": name, "setting": setting, "batch": row["batch"],
                                   "samples_per_s": row["samples_per_s"], "fraction_of_ceiling": row["fraction_of_ceiling"]})

        def timed(model: CaptionModel, captions: int = batch, precision: str = "bf16") -> dict[str, Any]:
            return bench_training(model, device, results.ceiling, batch=captions, repeats=repeats, epoch_captions=None,
                                  precision=precision)

        lever("training precision", "fp32", timed(trainee, precision="fp32"))
        lever("training precision", "bf16", results.training)
        # the rounding head (x0 estimate @ word table, V x D) in fp32 or in the training precision (bf16, the default)
        lever("training: rounding head", "fp32", timed(with_settings(trainee, "loss", rounding_precision="fp32")))
        lever("training: rounding head", "train", results.training)
        # dropout masks and attention: PyTorch's (bernoulli_ masks, SDPA) or models/ops.py's (packed masks, explicit)
        with pytorch_dropout_and_attention():
            lever("training: dropout+attention", "pytorch", timed(trainee))
        lever("training: dropout+attention", "diffcap ops", results.training)
        # the "sample size" trick: k noise levels per caption, batch / k captions (the same samples per step)
        k = 4 if batch % 4 == 0 else 1
        lever("training: noise levels", "1 per caption", results.training)
        lever("training: noise levels", f"{k} per caption",
              timed(with_settings(trainee, "train", samples_per_caption=k), captions=batch // k))
    if not args.no_features:
        results.features = bench_features(diffusion.config.encoder.name, device, batch=4 if args.tiny else 32,
                                          repeats=repeats)
    if args.image and not args.tiny:
        results.caption_process = bench_caption_process(args.checkpoint, args.image, args.device)
    return results


def format_table(results: Results) -> str:
    lines = [f"machine: {results.machine}",
             "ceiling (best matmul GFLOP/s over the model's shapes): " + ", ".join(f"{k} {v:.0f}" for k, v in results.ceiling.items()),
             "", "sampling            batch steps guidance  ms/caption  captions/s  GFLOP/s  of ceiling"]
    for r in results.sampling:
        lines.append(f"  diffusion {r['precision']:>6} {r['batch']:5d} {r['steps']:5d} {r['guidance']:8.1f} "
                     f"{r['ms_per_caption']:11.1f} {r['captions_per_s']:11.1f} {r['gflops']:8.0f} {r['fraction_of_ceiling']:10.0%}")
    for r in results.autoregressive:
        lines.append(f"  AR beam={r['beam_size']} {r['precision']:>6} {r['batch']:5d}     -        - "
                     f"{r['ms_per_caption']:11.1f} {r['captions_per_s']:11.1f}")
    if results.ratios:
        r = results.ratios
        lines.append(f"ratios: {json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in r.items() if k != 'quality'})}")
        if "quality" in r:
            q = r["quality"]
            scores = ", ".join(f"{n}: {v:.1f}" for n, v in q["diffusion_by_steps"].items())
            verdict = (f"first reached at {q['matched_steps']} steps" if q["matched_steps"] is not None
                       else f"no step count reaches it: the ratios are at {r['steps']} steps, NOT quality-matched")
            lines.append(f"quality ({q['metric']}): AR greedy {q['ar_greedy']:.1f}; diffusion by steps {scores}; {verdict}")
    t = results.training
    if t:
        lines.append(f"training: {t['samples_per_s']:.0f} samples/s at batch {t['batch']}, {t['gflops']:.0f} GFLOP/s = "
                     f"{t['fraction_of_ceiling']:.0%} of the bf16 ceiling"
                     + (f", {t['minutes_per_epoch']:.1f} min per epoch" if "minutes_per_epoch" in t else ""))
    if results.features:
        lines.append(f"features: {results.features['images_per_s']:.1f} images/s ({results.features['encoder']})")
    if results.caption_process:
        lines.append(f"diffcap caption (fresh process): {json.dumps(results.caption_process)}")
    if results.levers:
        lines += ["", "levers (one at a time)        setting         batch  ms/caption  captions/s (training: samples/s)"]
        for r in results.levers:
            speed = r.get("captions_per_s", r.get("samples_per_s", 0.0))
            ms = f"{r['ms_per_caption']:11.1f}" if "ms_per_caption" in r else f"{'-':>11}"
            lines.append(f"  {r['lever']:<27} {r['setting']:<15} {r['batch']:5d} {ms} {speed:11.1f}"
                         + (f"  (first call {r['first_call_s']:.1f} s)" if "first_call_s" in r else ""))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m diffcap.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, default=None, help="diffusion checkpoint (default: the shipped one)")
    p.add_argument("--ar-checkpoint", type=Path, default=None, help="autoregressive baseline checkpoint")
    p.add_argument("--tiny", action="store_true", help="tiny random models, seconds (what CI runs)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, nargs="+", default=list(STEPS))
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--beam", type=int, default=3)
    p.add_argument("--guidance", type=float, default=1.0, help="also time guided sampling with this weight (0 = skip)")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--matched-steps", type=int, default=20,
                   help="the diffusion step count for the diffusion / AR ratios when --quality finds no match or is "
                        "not given (then the ratios are not quality-matched, and say so)")
    p.add_argument("--quality", type=Path, nargs="+", default=None, metavar="EVAL_JSON",
                   help="`diffcap evaluate --output` files of --checkpoint at several step counts and of "
                        "--ar-checkpoint (greedy), on the same images: the ratios are taken at the smallest step count "
                        "whose CIDEr reaches AR greedy's")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--epoch-captions", type=int, default=30_000, help="captions per epoch (Flickr8k train: 30,000)")
    p.add_argument("--image", type=Path, default=None, help="time `diffcap caption` on this image in a fresh process")
    p.add_argument("--no-features", action="store_true", help="skip the feature-extraction benchmark")
    p.add_argument("--levers", action="store_true",
                   help="also time sampling with each speed lever off and on (precision, cached condition, threads, "
                        "torch.compile) at --matched-steps")
    p.add_argument("--no-compile", action="store_true", help="with --levers: skip torch.compile (slow to compile)")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.tiny and args.checkpoint is None:
        from diffcap.app import DEFAULT_CHECKPOINT

        if not (DEFAULT_CHECKPOINT / "meta.json").is_file():
            print("error: no --checkpoint given and no shipped checkpoint found; use --tiny for a smoke run",
                  file=sys.stderr)
            return 2
        args.checkpoint = DEFAULT_CHECKPOINT
    quality = None
    if args.quality:
        if args.ar_checkpoint is None:
            print("error: --quality compares with the AR baseline: give --ar-checkpoint too", file=sys.stderr)
            return 2
        try:
            quality = quality_match(args.quality, args.checkpoint, args.ar_checkpoint)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    results = run(args, quality)
    print(format_table(results))
    if args.out:
        write_text_atomic(args.out, json.dumps(results.to_dict(), indent=2))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
