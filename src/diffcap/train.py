"""The training loop: one function, readable top to bottom (in the spirit of DiT's train.py).

Data: every (image, caption) pair of the training split; image features come from the on-disk cache,
held in memory; captions are tokenised once. Each step draws a batch, noises the caption latents at a random
t, optionally self-conditions, drops the image with probability `cond_drop_prob`, and minimises the x0
distance + rounding cross-entropy. Runs through `accelerate`: under `accelerate launch` every process takes
an equal, disjoint shard of each epoch (train.batch_size is per process), gradients are averaged across processes,
logged values are means over processes, and only the main process writes checkpoints and logs.

Crash safety and exact resume: every batch's randomness (noise, t, dropped conditions, the self-conditioning
coin) is seeded from (train.seed, process, epoch, position in the epoch), and checkpoints hold the weights, EMA,
optimizer moments, step, epoch, position, elapsed time and RNG states, so a run killed at any point and resumed
reaches the same weights as one never interrupted (bit-identical on CPU in fp32, when train.max_steps rather than
the wall-clock budget sets the schedule). A non-finite loss or gradient skips the step (no optimizer or EMA
update); train.max_bad_steps of them in a row stop the run, and a checkpoint with a non-finite value is never
written.

Checkpoints go to RUN_DIR/checkpoint (EMA weights for captioning + full training state for --resume),
TensorBoard events to RUN_DIR/tb, periodic dev scores to RUN_DIR/evals.jsonl.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from diffcap.checkpoint import (CheckpointError, load_checkpoint, load_train_state, prefixed, recover,
                                 save_checkpoint, unprefixed)
from diffcap.config import Config, ConfigError
from diffcap.data.datasets import check_no_leakage
from diffcap.data.prepare import FeatureTable, default_cache_dir, ensure_features, load_encoder, split_records
from diffcap.evaluate import evaluate_records
from diffcap.losses import DynamicRoundingWeight
from diffcap.models.denoiser import ImageFeatures
from diffcap.models.length import LengthPredictor, caption_lengths
from diffcap.pipeline import CaptionModel, build_model, image_key_hashes, self_critical_losses, training_losses
from diffcap.rewards import CiderD
from diffcap.text.retrieval import RetrievalMemory

log = logging.getLogger("diffcap")


@dataclass
class TrainData:
    table: FeatureTable  # image features of the training images
    rows: torch.Tensor  # (N,) feature row of each caption
    ids: torch.Tensor  # (N, L) token indices of each caption
    text: torch.Tensor | None = None  # (M, Dt) the text slot's feature of each training image (model.text_slot)

    def condition(self, batch: torch.Tensor, device: torch.device) -> ImageFeatures:
        """The image features (and text-slot features) of a batch of caption indices."""
        rows = self.rows[batch]
        image = self.table.batch(rows, device)
        return image if self.text is None else image.with_text(self.text[rows].to(device))


class TrainingDiverged(RuntimeError):
    """The loss or its gradient was not finite for train.max_bad_steps consecutive steps, or a checkpoint
    would have held a non-finite value."""


def shard_order(n: int, seed: int, epoch: int, rank: int, world: int) -> torch.Tensor:
    """This process's caption indices for one epoch: one shuffle shared by every process (seeded by seed and
    epoch), cut to a multiple of `world`, every world-th index from `rank`: equal, disjoint shards."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))
    return order[: n - n % world][rank::world]


def seed_batch(seed: int, rank: int, epoch: int, position: int) -> None:
    """Seed torch (CPU and GPU), random and numpy for one batch from where the run is, so a resumed run draws
    exactly what an uninterrupted one would, and every process draws differently."""
    words = np.random.SeedSequence([seed, rank, epoch, position]).generate_state(2)
    value = (int(words[0]) << 32) | int(words[1])
    torch.manual_seed(value)
    random.seed(value)
    np.random.seed(int(words[0]))


def rng_state() -> dict[str, Any]:
    """Every RNG state of this process, as JSON."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch_rng": torch.get_rng_state().tolist(),
        "cuda_rng": [s.tolist() for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
        "python_rng": [version, list(internal), gauss],
        "numpy_rng": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
    }


def set_rng_state(meta: dict[str, Any]) -> None:
    """Restore what `rng_state` saved (the parts a checkpoint has)."""
    if "torch_rng" in meta:
        torch.set_rng_state(torch.tensor(meta["torch_rng"], dtype=torch.uint8))
    cuda = meta.get("cuda_rng") or []
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in cuda])
    if "python_rng" in meta:
        version, internal, gauss = meta["python_rng"]
        random.setstate((version, tuple(internal), gauss))
    if "numpy_rng" in meta:
        name, keys, pos, has_gauss, cached = meta["numpy_rng"]
        np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def check_resumable(ckpt_dir: Path, meta: dict[str, Any], tensors: dict[str, torch.Tensor], model: CaptionModel,
                    encoder_identity: dict[str, Any]) -> None:
    """Refuse to continue a checkpoint made with another image encoder or in another text space."""
    stored = meta.get("encoder")
    current = json.loads(json.dumps(encoder_identity))
    if stored is not None and stored != current:
        fields = sorted(k for k in set(stored) | set(current) if stored.get(k) != current.get(k))
        raise CheckpointError(
            f"{ckpt_dir} was trained on the features of another image encoder or preprocessing "
            f"({'; '.join(f'{k}: checkpoint {stored.get(k)!r}, this run {current.get(k)!r}' for k in fields)}); "
            "resume it with its own encoder.name, or start a new run"
        )
    mine, theirs = model.space.state_dict(), unprefixed("text", tensors)
    if set(mine) != set(theirs) or any(mine[k].shape != theirs[k].shape or not torch.equal(mine[k].cpu(), theirs[k])
                                       for k in mine):
        raise CheckpointError(
            f"{ckpt_dir} was trained in another text space (checkpoint {meta.get('text')}, this run "
            f"{model.space.describe()}): another text.backbone, text.max_length or text.latent_scale, or a "
            "vocabulary built from other training captions; resume with the checkpoint's config and data, or start "
            "a new run"
        )


def start_from(model: CaptionModel, checkpoint: Path, encoder_identity: dict[str, Any]) -> CaptionModel:
    """`model` (freshly built from the config) with the weights (EMA) and vocabulary of `checkpoint` instead:
    the start of a fine-tuning run. The config's model and text settings must give the checkpoint's shape."""
    from diffcap.pipeline import load_model

    base, meta = load_model(checkpoint)
    stored = meta.get("encoder")
    if stored is not None and stored != json.loads(json.dumps(encoder_identity)):
        raise CheckpointError(f"train.init_from: {checkpoint} was trained on the features of another image encoder "
                              f"or preprocessing ({stored.get('encoder')}); use its encoder.name")
    if base.config.model.kind != model.config.model.kind:
        raise CheckpointError(f"train.init_from: {checkpoint} is a {base.config.model.kind} model, this config a "
                              f"{model.config.model.kind} one (model.kind)")
    # the vocabulary comes from the checkpoint; dropout may change for fine-tuning; everything else must match
    shape = dataclasses.replace(model.denoiser.shape, vocab_size=base.denoiser.shape.vocab_size)
    ours, theirs = dataclasses.asdict(shape), dataclasses.asdict(base.denoiser.shape)
    fields = [f"{k}: checkpoint {theirs[k]!r}, this config {ours[k]!r}" for k in ours
              if k != "dropout" and ours[k] != theirs[k]]
    if fields:
        raise CheckpointError(f"train.init_from: {checkpoint} has another model shape ({'; '.join(fields)}); "
                              "use its model.* settings")
    ours, theirs = dataclasses.asdict(model.config.text), dataclasses.asdict(base.config.text)
    if ours != theirs:
        fields = [f"text.{k}: checkpoint {theirs[k]!r}, this config {ours[k]!r}" for k in ours if ours[k] != theirs[k]]
        raise CheckpointError(f"train.init_from: {checkpoint} uses another text space ({'; '.join(fields)}); "
                              "use its text.* settings")
    log.info("starting from the weights and vocabulary of %s", checkpoint)
    denoiser = type(model.denoiser)(shape)
    denoiser.load_state_dict({k: v.float() for k, v in base.denoiser.state_dict().items()})
    return dataclasses.replace(model, space=base.space, denoiser=denoiser)


def non_finite(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors holding a NaN or an infinity."""
    return [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]


def lr_at(config: Config, step: int, progress: float) -> float:
    """Linear warmup, then `train.lr_schedule` from lr to lr * lr_end_ratio over the run's progress (steps or
    wall time, whichever is further): "cosine" (default), "linear" (the original's linspace), "log" (its
    logspace: geometric), or "constant"."""
    tr = config.train
    if step < tr.warmup_steps:
        return tr.lr * (step + 1) / tr.warmup_steps
    x, end = min(progress, 1.0), tr.lr_end_ratio
    if tr.lr_schedule == "constant":
        return tr.lr
    if tr.lr_schedule == "linear":
        return tr.lr * (1 + (end - 1) * x)
    if tr.lr_schedule == "log":
        return tr.lr * end**x
    return tr.lr * (end + (1 - end) * 0.5 * (1 + math.cos(math.pi * x)))


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """AdamW state as flat tensors + JSON (safetensors cannot hold nested Python objects)."""
    sd = optimizer.state_dict()
    tensors = {f"{i}.{name}": v for i, s in sd["state"].items() for name, v in s.items()}
    return tensors, {"param_groups": sd["param_groups"]}


def load_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_run_checkpoint(run_dir: Path, model: CaptionModel, ema: torch.nn.Module, optimizer: torch.optim.Optimizer,
                        state: dict[str, Any], extra_meta: dict[str, Any]) -> None:
    opt_tensors, opt_meta = optimizer_tensors(optimizer)
    save_checkpoint(
        run_dir / "checkpoint",
        config_json=model.config.to_json(),
        meta={**model.meta(), **extra_meta, "step": state["step"], "weights": "ema"},
        tensors=model.tensors(ema.state_dict()),
        train_tensors={**prefixed("model", model.denoiser.state_dict()), **prefixed("optim", opt_tensors)},
        train_meta={**state, "optimizer": opt_meta},
    )


def save_snapshot(run_dir: Path, model: CaptionModel, ema: torch.nn.Module, state: dict[str, Any],
                  encoder_identity: dict[str, Any]) -> Path:
    """The averaged weights as they are now, as a checkpoint without training state (to evaluate later):
    <run dir>/snapshots/step-NNNNNN, its meta recording the minutes of training behind it."""
    return save_checkpoint(
        run_dir / "snapshots" / f"step-{state['step']:06d}",
        config_json=model.config.to_json(),
        meta={**model.meta(), "encoder": encoder_identity, "step": state["step"], "weights": "ema",
              "training_minutes": round(state["elapsed"] / 60, 2)},
        tensors=model.tensors(ema.state_dict()),
    )


def features_root(config: Config) -> Path:
    if config.data.cache_dir:
        return Path(config.data.cache_dir)
    return default_cache_dir(config.data.dataset, Path(config.data.root), config.encoder.name)


def prepare_data(config: Config, split: str, cache_root: Path, state: Any | None = None) -> tuple[list, FeatureTable]:
    """A split's records that have features, and their features (computed and cached on first use; `state`:
    the Accelerator, so that several processes share the work)."""
    records = split_records(config.data, split)
    encoder = load_encoder(config.encoder.name)
    cache = ensure_features(encoder, records, cache_root / split, state=state,
                            progress=state is None or state.is_main_process)
    usable = [r for r in records if r.key in cache]
    if len(usable) < len(records):
        left_out = [r.key for r in records if r.key not in cache]
        log.warning("%d %s images have no features (unreadable files) and are left out: %s", len(left_out), split,
                    "; ".join(f"{k} ({cache.failed.get(k, 'no features')})" for k in left_out[:10])
                    + (f" and {len(left_out) - 10} more" if len(left_out) > 10 else ""))
    return usable, FeatureTable.from_cache(cache, [r.key for r in usable])


def native_bf16(device: torch.device) -> bool:
    """Whether `device` multiplies bf16 matrices natively: a CUDA GPU that supports bf16, or an x86 CPU with
    AVX512-BF16 or AMX. Elsewhere bf16 autocast is emulated, slower than fp32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(check() for check in checks if check is not None)


def resolve_precision(requested: str, device: torch.device | None = None) -> str:
    """`train.precision` as used: "auto" becomes "bf16" where the hardware has native bf16 matmuls, else "fp32"."""
    if requested != "auto":
        return requested
    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return "bf16" if native_bf16(device) else "fp32"


def train(config: Config, run_dir: Path, *, resume: bool = False, progress: bool = True,
          stop_after_minutes: float | None = None) -> Path:
    """Train (or with `resume`, continue) the run in `run_dir`; returns its checkpoint directory.

    `stop_after_minutes` ends this process's share of the run after that much wall time with a resumable
    checkpoint, without changing the run itself: the learning-rate schedule follows `train.max_minutes` of
    training time counted across every process that works on the run, so a run split into sittings with
    `--resume` is the same run as one that never stopped."""
    from accelerate import Accelerator
    from torch.utils.tensorboard import SummaryWriter

    tr = config.train
    if stop_after_minutes is not None and not stop_after_minutes > 0:
        raise ValueError(f"stop after {stop_after_minutes} minutes: must be > 0")
    run_dir = Path(run_dir)
    ckpt_dir = run_dir / "checkpoint"
    if config.loss.objective == "cider" and not tr.init_from:
        raise ConfigError("loss.objective=cider fine-tunes a trained autoregressive model: set "
                          "train.init_from=CHECKPOINT (from random weights its samples earn no reward to learn from)")
    precision = "bf16" if resolve_precision(tr.precision) == "bf16" else "no"
    if tr.precision == "auto":
        log.info("train.precision=auto: %s", "bf16 autocast (native bf16 matmuls)" if precision == "bf16"
                 else "fp32 (no native bf16 matmuls on this hardware)")
    from accelerate.state import AcceleratorState

    if AcceleratorState._shared_state.get("_mixed_precision", precision) != precision:
        # an earlier training in this process (tests, notebooks) used another precision, which accelerate keeps
        # per process: reset that choice (the process group, if any, stays)
        AcceleratorState._reset_state()
    # cpu=True without GPUs: under `accelerate launch`, a plain Accelerator() on CPUs would run independent,
    # unsynchronised copies instead of joining one process group
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=precision)
    if accelerator.is_main_process:
        recover(ckpt_dir)  # a save that a kill interrupted between its two renames
    accelerator.wait_for_everyone()
    if not resume and ckpt_dir.exists():
        raise FileExistsError(f"{run_dir} already holds a checkpoint; pass --resume to continue it or choose another run dir")
    device = accelerator.device
    torch.manual_seed(tr.seed)
    random.seed(tr.seed)
    np.random.seed(tr.seed)

    # -- data -------------------------------------------------------------------------------------------
    cache_root = features_root(config)
    train_records, train_table = prepare_data(config, config.data.train_split, cache_root, accelerator)
    eval_records, eval_table = [], None
    if config.data.eval_split:
        eval_records, eval_table = prepare_data(config, config.data.eval_split, cache_root, accelerator)
        check_no_leakage({config.data.train_split: train_records, config.data.eval_split: eval_records})
    encoder_identity = load_encoder(config.encoder.name).identity()
    captions = [c for r in train_records for c in r.captions]
    model = build_model(config, train_table.pooled.shape[1], train_table.grid.shape[2], captions=captions)
    if tr.init_from:  # its vocabulary; when resuming, the weights are then replaced by the run's own
        model = start_from(model, Path(tr.init_from), encoder_identity)
    model.train_image_hashes = image_key_hashes(r.key for r in train_records)
    rows = torch.tensor([i for i, r in enumerate(train_records) for _ in r.captions])
    data = TrainData(train_table, rows, model.space.encode(captions))
    if tr.init_from:
        unknown = int((data.ids == model.space.unk_index).sum())
        if unknown:
            log.warning("%d word pieces of the training captions are outside the vocabulary of %s: trained as "
                        "[UNK]", unknown, tr.init_from)
    if not model.autoregressive:  # P(length | image) for sample.length="predicted": deterministic, seconds
        model.lengths = LengthPredictor.fit(train_table.pooled, caption_lengths(data.ids, model.space.sep_index),
                                            rows, config.text.max_length)
    if config.model.text_slot == "retrieved":  # every process builds the same memory
        model.memory = RetrievalMemory.build(config.text.backbone, train_table.pooled,
                                             [r.captions for r in train_records],
                                             progress=progress and accelerator.is_main_process)
        # each training image's text feature: its nearest *other* training image's captions
        data.text = model.memory.nearest(train_table.pooled, exclude=torch.arange(len(train_records)))
    log.info("training on %d captions of %d images; vocabulary %d word pieces", len(rows), len(train_records),
             model.space.vocab_size)
    reward = None
    if config.loss.objective == "cider":  # self-critical: each batch row stands for its image and references
        reward = CiderD([r.captions for r in train_records])
        log.info("self-critical training: %d captions sampled per image, rewarded by CIDEr-D against the %d "
                 "training images' references", config.loss.cider_samples, len(reward))

    # -- model, optimizer, state ------------------------------------------------------------------------
    denoiser = model.denoiser.to(device)
    model.space.to(device)
    ema = copy.deepcopy(denoiser).eval().requires_grad_(False)
    decay, no_decay = [], []
    for name, p in denoiser.named_parameters():
        # no decay on norms, biases and a learned word table (decay would shrink it against fixed-size noise)
        (no_decay if p.ndim < 2 or "norm" in name or name == "words" else decay).append(p)
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": tr.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=tr.lr, betas=(0.9, 0.98))
    state: dict[str, Any] = {"step": 0, "epoch": 0, "position": 0, "elapsed": 0.0}
    # the original's "dynamic" rounding weight: running sums over the epoch, part of the resumable state
    dynamic = DynamicRoundingWeight(config.loss.dynamic_rounding, config.loss.rounding_weight) \
        if config.loss.dynamic_rounding > 0 and not model.autoregressive else None
    saved_step: int | None = None  # step of the newest checkpoint on disk
    if resume and not ckpt_dir.exists():
        log.warning("--resume: %s holds no checkpoint yet; starting from step 0", run_dir)
    elif resume:
        saved, saved_meta, saved_tensors = load_checkpoint(ckpt_dir)
        meta, tensors = load_train_state(ckpt_dir)
        if saved != json.loads(config.to_json()):
            diff = Config.from_dict(saved).differences(config)
            log.warning("resuming with a config that differs from the checkpoint's: %s", diff)
        check_resumable(ckpt_dir, saved_meta, saved_tensors, model, encoder_identity)
        try:
            denoiser.load_state_dict(unprefixed("model", tensors))
            ema.load_state_dict(unprefixed("denoiser", saved_tensors))
            load_optimizer(optimizer, unprefixed("optim", tensors), meta["optimizer"])
        except (RuntimeError, KeyError, ValueError) as exc:
            raise CheckpointError(f"{ckpt_dir} does not fit this config's model (was model.* changed?): {exc}") from exc
        state = {k: meta[k] for k in ("step", "epoch", "position", "elapsed")}
        if dynamic is not None and "dynamic_rounding" in meta:
            dynamic.load(meta["dynamic_rounding"])
            state["dynamic_rounding"] = dynamic.state()
        set_rng_state(meta)
        saved_step = state["step"]
        log.info("resumed from step %d", state["step"])
    denoiser, optimizer = accelerator.prepare(denoiser, optimizer)
    writer = SummaryWriter(str(run_dir / "tb")) if accelerator.is_main_process else None
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(config.to_json())

    def checkpoint(extra: dict[str, Any] | None = None) -> None:
        nonlocal saved_step
        inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the optimizer
        # every process checks (their weights are identical), so that all of them stop together
        bad = non_finite({**prefixed("model", model.denoiser.state_dict()), **prefixed("ema", ema.state_dict()),
                          **prefixed("optim", optimizer_tensors(inner)[0])})
        if bad:
            raise stopped(TrainingDiverged(
                f"refusing to write a checkpoint at step {state['step']}: non-finite values in {', '.join(bad[:5])}"
                + (f" and {len(bad) - 5} more" if len(bad) > 5 else "") + "; "
                + (f"{ckpt_dir} still holds step {saved_step}" if saved_step is not None else "no checkpoint was written")
            ))
        if accelerator.is_main_process:
            full = {**state, **rng_state()}
            try:
                save_run_checkpoint(run_dir, model, ema, inner, full, {"encoder": encoder_identity, **(extra or {})})
            except BaseException as exc:
                raise stopped(exc)
        saved_step = state["step"]

    def stopped(exc: BaseException) -> BaseException:
        """Close the progress bar (so the error starts its own line) and the event file, before `exc` is raised."""
        bar.close()
        if writer is not None:
            writer.close()
        return exc

    def evaluate(limit: int) -> dict[str, float]:
        assert eval_table is not None
        n = min(limit, len(eval_records))
        sub = FeatureTable(eval_table.keys[:n], eval_table.pooled[:n], eval_table.grid[:n])
        live, model.denoiser = model.denoiser, ema
        try:
            result = evaluate_records(model, eval_records[:n], sub, meteor=False, progress=False)
        finally:
            model.denoiser = live
        return result["metrics"]

    # -- loop -------------------------------------------------------------------------------------------
    world, rank = accelerator.num_processes, accelerator.process_index
    bad_steps = 0  # non-finite steps in a row
    if len(data.rows) < world:
        raise ValueError(f"{len(data.rows)} training captions cannot be shared among {world} processes")
    budget = tr.max_minutes * 60
    started = time.perf_counter() - state["elapsed"]
    sitting = time.perf_counter()

    def sitting_over() -> bool:
        return stop_after_minutes is not None and time.perf_counter() - sitting >= stop_after_minutes * 60

    snapshot_every = tr.snapshot_minutes * 60
    last_mark = int(state["elapsed"] // snapshot_every) if snapshot_every else 0
    bar = tqdm(total=tr.max_steps, initial=state["step"], desc="training", unit="step",
               disable=not (progress and accelerator.is_main_process))
    last_log, seen_since_log = time.perf_counter(), 0
    while state["step"] < tr.max_steps and time.perf_counter() - started < budget and not sitting_over():
        order = shard_order(len(data.rows), tr.seed, state["epoch"], rank, world)
        while state["position"] < len(order):  # the last batch of an epoch may be smaller
            batch = order[state["position"]: state["position"] + tr.batch_size]
            seed_batch(tr.seed, rank, state["epoch"], state["position"])
            state["position"] += len(batch)
            step = state["step"]
            progress_frac = max(step / tr.max_steps, (time.perf_counter() - started) / budget)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(config, step, progress_frac)

            ids = data.ids[batch].to(device)  # (B, L)
            image = data.condition(batch, device)
            keep = torch.rand(len(batch), device=device) >= tr.cond_drop_prob
            use_sc = not model.autoregressive and model.denoiser.shape.self_condition \
                and random.random() < tr.self_condition_prob
            with accelerator.autocast():
                if reward is not None:
                    losses = self_critical_losses(model, denoiser, image, data.rows[batch], reward)
                else:
                    losses = training_losses(model, denoiser, ids, image, keep, use_sc,
                                             rounding_weight=None if dynamic is None else dynamic.value())
            bad = not bool(torch.isfinite(losses["loss"]))
            if world > 1:  # every process must skip the same steps (or the gradient all-reduce would hang)
                bad = bool(accelerator.reduce(torch.tensor([float(bad)], device=device), "sum").item() > 0)
            if not bad:
                optimizer.zero_grad(set_to_none=True)
                accelerator.backward(losses["loss"])
                # the norm of the averaged gradient, the same on every process; inf = measure without clipping
                norm = accelerator.clip_grad_norm_(denoiser.parameters(), tr.grad_clip if tr.grad_clip > 0 else math.inf)
                bad = norm is not None and not bool(torch.isfinite(torch.as_tensor(norm)))
            if bad:  # skip: no optimizer step, no EMA update, the step counter stays
                optimizer.zero_grad(set_to_none=True)
                bad_steps += 1
                log.warning("non-finite loss or gradient at step %d (%d in a row); update skipped", step, bad_steps)
                if bad_steps >= tr.max_bad_steps:
                    raise stopped(TrainingDiverged(
                        f"training diverged: the loss or its gradient was not finite for {bad_steps} steps in a row "
                        f"(train.max_bad_steps={tr.max_bad_steps}) at step {step}; stopped. "
                        + (f"{ckpt_dir} (step {saved_step}) holds no NaN: resume it with --resume after lowering "
                           "train.lr, setting train.precision=fp32 or train.grad_clip" if saved_step is not None
                           else "No checkpoint was written; lower train.lr or set train.precision=fp32")
                    ))
                continue
            bad_steps = 0
            optimizer.step()
            if dynamic is not None:
                losses["rounding_weight"] = torch.tensor(dynamic.value())  # logged with the loss terms
                dynamic.update(losses, config.loss)
                state["dynamic_rounding"] = dynamic.state()
            with torch.no_grad():
                d = min(tr.ema_decay, (1 + step) / (10 + step))  # short warmup of the average
                for e, p in zip(ema.parameters(), accelerator.unwrap_model(denoiser).parameters()):
                    e.lerp_(p.detach(), 1 - d)
            state["step"] = step = step + 1
            state["elapsed"] = time.perf_counter() - started
            seen_since_log += len(batch) * world
            bar.update(1)

            if step % tr.log_every == 0:  # every process joins the reduce; the main one writes
                values = {k: float(accelerator.reduce(v.detach().float(), "mean")) for k, v in losses.items()}
            if writer is not None and step % tr.log_every == 0:
                now = time.perf_counter()
                for k, v in values.items():
                    writer.add_scalar(f"train/{k}", v, step)
                writer.add_scalar("train/lr", optimizer.param_groups[0]["lr"], step)
                writer.add_scalar("train/captions_per_second", seen_since_log / (now - last_log), step)
                left = max(budget - (now - started), 0.0) / 60
                # the wall-clock budget usually ends the run first: size the bar (and its ETA) by it
                expected = int(step / max(now - started, 1e-9) * budget)
                bar.total = max(step, min(tr.max_steps, expected))
                shown = ("acc", values["token_accuracy"]) if "token_accuracy" in values else ("cider", values["reward"])
                bar.set_postfix({"loss": f"{values['loss']:.3f}", shown[0]: f"{shown[1]:.2f}",
                                 "budget_left": f"{left:.1f}min"})
                last_log, seen_since_log = now, 0
            if tr.eval_every and step % tr.eval_every == 0 and eval_table is not None and accelerator.is_main_process:
                metrics = evaluate(tr.eval_limit)
                for k, v in metrics.items():
                    if writer is not None:
                        writer.add_scalar(f"dev/{k}", v, step)
                with open(run_dir / "evals.jsonl", "a") as f:
                    f.write(json.dumps({"step": step, "elapsed": round(state["elapsed"], 1), **metrics}) + "\n")
                log.info("step %d dev BLEU-4 %.1f CIDEr %.1f", step, metrics["BLEU-4"], metrics["CIDEr"])
            if step % tr.save_every == 0:
                checkpoint()
            if snapshot_every and int(state["elapsed"] // snapshot_every) > last_mark:
                last_mark = int(state["elapsed"] // snapshot_every)
                if accelerator.is_main_process:
                    save_snapshot(run_dir, model, ema, state, encoder_identity)
            if step >= tr.max_steps or time.perf_counter() - started >= budget or sitting_over():
                break
        else:
            state["epoch"] += 1
            state["position"] = 0
            if dynamic is not None:  # the running sums cover one epoch
                dynamic.reset()
                state["dynamic_rounding"] = dynamic.state()
            continue
        break
    bar.close()
    finished = state["step"] >= tr.max_steps or time.perf_counter() - started >= budget
    checkpoint({"finished": True} if finished else None)
    accelerator.wait_for_everyone()  # every process returns once the checkpoint is complete
    if not finished:
        log.info("stopped this sitting after %.1f minutes at step %d (%.1f of the run's %.0f minutes of training); "
                 "continue it with --resume", (time.perf_counter() - sitting) / 60, state["step"],
                 state["elapsed"] / 60, tr.max_minutes)
    if finished and eval_table is not None and accelerator.is_main_process:
        metrics = evaluate(tr.eval_limit)
        with open(run_dir / "evals.jsonl", "a") as f:
            f.write(json.dumps({"step": state["step"], "elapsed": round(state["elapsed"], 1), "final": True, **metrics}) + "\n")
        log.info("finished at step %d: dev (%d images) BLEU-4 %.1f CIDEr %.1f", state["step"],
                 min(tr.eval_limit, len(eval_records)), metrics["BLEU-4"], metrics["CIDEr"])
    if writer is not None:
        writer.close()
    return ckpt_dir
