"""The training loop: one function, readable top to bottom (in the spirit of DiT's train.py).

Data: every (image, caption) pair of the training split; image features come from the on-disk cache,
held in memory; captions are tokenised once. Each step draws a batch, noises the caption latents at a random
t, optionally self-conditions, drops the image with probability `cond_drop_prob`, and minimises the x0
distance + rounding cross-entropy. Runs through `accelerate` (one process here; the loop shards data by
rank and lets accelerate synchronise gradients, so multi-process runs need no change to this file).

Checkpoints go to RUN_DIR/checkpoint (EMA weights for captioning + full training state for --resume),
TensorBoard events to RUN_DIR/tb, periodic dev scores to RUN_DIR/evals.jsonl.
"""

from __future__ import annotations

import copy
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

from diffcap.checkpoint import CheckpointError, load_train_state, prefixed, save_checkpoint, unprefixed
from diffcap.config import Config
from diffcap.data.datasets import check_no_leakage
from diffcap.data.prepare import FeatureTable, default_cache_dir, ensure_features, load_encoder, split_records
from diffcap.evaluate import evaluate_records
from diffcap.losses import caption_losses
from diffcap.pipeline import CaptionModel, build_model, image_key_hashes

log = logging.getLogger("diffcap")


@dataclass
class TrainData:
    table: FeatureTable  # image features of the training images
    rows: torch.Tensor  # (N,) feature row of each caption
    ids: torch.Tensor  # (N, L) token indices of each caption


def lr_at(config: Config, step: int, progress: float) -> float:
    """Linear warmup, then cosine decay to 10 % over the run's progress (steps or wall time, whichever is further)."""
    tr = config.train
    if step < tr.warmup_steps:
        return tr.lr * (step + 1) / tr.warmup_steps
    return tr.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


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


def features_root(config: Config) -> Path:
    if config.data.cache_dir:
        return Path(config.data.cache_dir)
    return default_cache_dir(config.data.dataset, Path(config.data.root), config.encoder.name)


def prepare_data(config: Config, split: str, cache_root: Path) -> tuple[list, FeatureTable]:
    """A split's records that have features, and their features (computed and cached on first use)."""
    records = split_records(config.data, split)
    encoder = load_encoder(config.encoder.name)
    cache = ensure_features(encoder, records, cache_root / split)
    usable = [r for r in records if r.key in cache]
    if len(usable) < len(records):
        log.warning("%d %s images have no features (unreadable files) and are left out", len(records) - len(usable), split)
    return usable, FeatureTable.from_cache(cache, [r.key for r in usable])


def train(config: Config, run_dir: Path, *, resume: bool = False, progress: bool = True) -> Path:
    from accelerate import Accelerator
    from torch.utils.tensorboard import SummaryWriter

    tr = config.train
    run_dir = Path(run_dir)
    ckpt_dir = run_dir / "checkpoint"
    if not resume and ckpt_dir.exists():
        raise FileExistsError(f"{run_dir} already holds a checkpoint; pass --resume to continue it or choose another run dir")
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision="bf16" if tr.precision == "bf16" else "no")
    device = accelerator.device
    torch.manual_seed(tr.seed)
    random.seed(tr.seed)
    np.random.seed(tr.seed)

    # -- data -------------------------------------------------------------------------------------------
    cache_root = features_root(config)
    train_records, train_table = prepare_data(config, config.data.train_split, cache_root)
    eval_records, eval_table = [], None
    if config.data.eval_split:
        eval_records, eval_table = prepare_data(config, config.data.eval_split, cache_root)
        check_no_leakage({config.data.train_split: train_records, config.data.eval_split: eval_records})
    encoder_identity = load_encoder(config.encoder.name).identity()
    captions = [c for r in train_records for c in r.captions]
    model = build_model(config, train_table.pooled.shape[1], train_table.grid.shape[2], captions=captions)
    model.train_image_hashes = image_key_hashes(r.key for r in train_records)
    rows = torch.tensor([i for i, r in enumerate(train_records) for _ in r.captions])
    data = TrainData(train_table, rows, model.space.encode(captions))
    log.info("training on %d captions of %d images; vocabulary %d word pieces", len(rows), len(train_records),
             model.space.vocab_size)

    # -- model, optimizer, state ------------------------------------------------------------------------
    denoiser = model.denoiser.to(device)
    model.space.to(device)
    ema = copy.deepcopy(denoiser).eval().requires_grad_(False)
    decay, no_decay = [], []
    for name, p in denoiser.named_parameters():
        (no_decay if p.ndim < 2 or "norm" in name else decay).append(p)
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": tr.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=tr.lr, betas=(0.9, 0.98))
    state: dict[str, Any] = {"step": 0, "epoch": 0, "position": 0, "elapsed": 0.0}
    if resume:
        if not ckpt_dir.exists():
            raise CheckpointError(f"nothing to resume: {ckpt_dir} does not exist")
        meta, tensors = load_train_state(ckpt_dir)
        saved = json.loads((ckpt_dir / "config.json").read_text())
        if saved != json.loads(config.to_json()):
            diff = Config.from_dict(saved).differences(config)
            log.warning("resuming with a config that differs from the checkpoint's: %s", diff)
        denoiser.load_state_dict(unprefixed("model", tensors))
        from safetensors.torch import load_file
        ema.load_state_dict(unprefixed("denoiser", load_file(str(ckpt_dir / "model.safetensors"))))
        load_optimizer(optimizer, unprefixed("optim", tensors), meta["optimizer"])
        state = {k: meta[k] for k in ("step", "epoch", "position", "elapsed")}
        torch.set_rng_state(torch.tensor(meta["torch_rng"], dtype=torch.uint8))
        log.info("resumed from step %d", state["step"])
    denoiser, optimizer = accelerator.prepare(denoiser, optimizer)
    writer = SummaryWriter(str(run_dir / "tb")) if accelerator.is_main_process else None
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(config.to_json())

    def checkpoint(extra: dict[str, Any] | None = None) -> None:
        if accelerator.is_main_process:
            full = {**state, "torch_rng": torch.get_rng_state().tolist()}
            inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the optimizer
            save_run_checkpoint(run_dir, model, ema, inner, full, {"encoder": encoder_identity, **(extra or {})})

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
    if len(data.rows) < world:
        raise ValueError(f"{len(data.rows)} training captions cannot be shared among {world} processes")
    budget = tr.max_minutes * 60
    started = time.perf_counter() - state["elapsed"]
    bar = tqdm(total=tr.max_steps, initial=state["step"], desc="training", unit="step",
               disable=not (progress and accelerator.is_main_process))
    last_log, seen_since_log = time.perf_counter(), 0
    while state["step"] < tr.max_steps and time.perf_counter() - started < budget:
        order = torch.randperm(len(data.rows), generator=torch.Generator().manual_seed(tr.seed + state["epoch"]))
        order = order[: len(order) - len(order) % world][rank::world]  # equal shards, one per process
        while state["position"] < len(order):  # the last batch of an epoch may be smaller
            batch = order[state["position"]: state["position"] + tr.batch_size]
            state["position"] += len(batch)
            step = state["step"]
            progress_frac = max(step / tr.max_steps, (time.perf_counter() - started) / budget)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(config, step, progress_frac)

            ids = data.ids[batch].to(device)  # (B, L)
            image = data.table.batch(data.rows[batch], device)
            x0 = model.space.embed(ids)  # (B, L, D)
            t = model.diffusion.sample_timesteps(len(batch), device=device)
            keep = torch.rand(len(batch), device=device) >= tr.cond_drop_prob
            use_sc = model.denoiser.shape.self_condition and random.random() < tr.self_condition_prob
            with accelerator.autocast():
                fn = lambda x, tt, sc: denoiser(x, tt, image, keep, sc)  # noqa: E731
                _, x0_hat = model.diffusion.training_prediction(fn, x0, t, torch.randn_like(x0), use_sc)
            losses = caption_losses(x0_hat, x0, ids, model.space, config.loss)
            if not torch.isfinite(losses["loss"]):
                log.warning("non-finite loss at step %d; skipping the update", step)
                optimizer.zero_grad(set_to_none=True)
                continue
            optimizer.zero_grad(set_to_none=True)
            accelerator.backward(losses["loss"])
            if tr.grad_clip > 0:
                accelerator.clip_grad_norm_(denoiser.parameters(), tr.grad_clip)
            optimizer.step()
            with torch.no_grad():
                d = min(tr.ema_decay, (1 + step) / (10 + step))  # short warmup of the average
                for e, p in zip(ema.parameters(), accelerator.unwrap_model(denoiser).parameters()):
                    e.lerp_(p.detach(), 1 - d)
            state["step"] = step = step + 1
            state["elapsed"] = time.perf_counter() - started
            seen_since_log += len(batch) * world
            bar.update(1)

            if writer is not None and step % tr.log_every == 0:
                now = time.perf_counter()
                values = {k: float(accelerator.reduce(v.detach(), "mean")) for k, v in losses.items()}
                for k, v in values.items():
                    writer.add_scalar(f"train/{k}", v, step)
                writer.add_scalar("train/lr", optimizer.param_groups[0]["lr"], step)
                writer.add_scalar("train/captions_per_second", seen_since_log / (now - last_log), step)
                left = max(budget - (now - started), 0.0) / 60
                # the wall-clock budget usually ends the run first: size the bar (and its ETA) by it
                expected = int(step / max(now - started, 1e-9) * budget)
                bar.total = max(step, min(tr.max_steps, expected))
                bar.set_postfix(loss=f"{values['loss']:.3f}", acc=f"{values['token_accuracy']:.2f}",
                                budget_left=f"{left:.1f}min")
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
            if step >= tr.max_steps or time.perf_counter() - started >= budget:
                break
        else:
            state["epoch"] += 1
            state["position"] = 0
            continue
        break
    bar.close()
    checkpoint({"finished": True})
    if eval_table is not None and accelerator.is_main_process:
        metrics = evaluate(tr.eval_limit)
        with open(run_dir / "evals.jsonl", "a") as f:
            f.write(json.dumps({"step": state["step"], "elapsed": round(state["elapsed"], 1), "final": True, **metrics}) + "\n")
        log.info("finished at step %d: dev (%d images) BLEU-4 %.1f CIDEr %.1f", state["step"],
                 min(tr.eval_limit, len(eval_records)), metrics["BLEU-4"], metrics["CIDEr"])
    if writer is not None:
        writer.close()
    return ckpt_dir
