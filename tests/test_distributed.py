"""Two CPU processes under `accelerate launch` (gloo) cooperate: shared feature extraction, different data
shards, synchronised weights, losses averaged over processes, one checkpoint by one process (RELIABILITY.md).

The launched script records what each process did, numbered by the launcher's RANK (not by what diffcap
believes its rank is), so a run in which the processes silently train independent copies — what a plain
`Accelerator()` does on CPUs — fails here: both would see the whole data, and both would save.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")

SCRIPT = r'''
import hashlib, json, os, sys
from pathlib import Path

rank = int(os.environ["RANK"])  # the launcher's numbering
out = Path(sys.argv[1])
log = open(out / f"rank{rank}.jsonl", "a")


def note(**fields):
    log.write(json.dumps(fields) + "\n")
    log.flush()


import torch
import diffcap.cli, diffcap.data.prepare, diffcap.train
from diffcap.data.features import FeatureCache

real_shard = diffcap.train.shard_order
def shard_order(n, seed, epoch, r, world):
    order = real_shard(n, seed, epoch, r, world)
    note(kind="shard", epoch=epoch, world=world, indices=order.tolist())
    return order
diffcap.train.shard_order = shard_order

loss_name = "training_losses" if hasattr(diffcap.train, "training_losses") else "caption_losses"
real_losses = getattr(diffcap.train, loss_name)
def losses(*args, **kwargs):
    result = real_losses(*args, **kwargs)
    note(kind="loss", value=float(result["loss"]))
    return result
setattr(diffcap.train, loss_name, losses)

real_step = torch.optim.AdamW.step
def step(self, *args, **kwargs):
    result = real_step(self, *args, **kwargs)
    digest = hashlib.sha256()
    for group in self.param_groups:
        for p in group["params"]:
            digest.update(p.detach().cpu().numpy().tobytes())
    note(kind="params", sha=digest.hexdigest())
    return result
torch.optim.AdamW.step = step

real_save = diffcap.train.save_checkpoint
def save(*args, **kwargs):
    note(kind="save")
    return real_save(*args, **kwargs)
diffcap.train.save_checkpoint = save

real_build = FeatureCache.build.__func__
def build(cls, encoder, images, directory, **kwargs):
    note(kind="encode", keys=sorted(images))
    return real_build(cls, encoder, images, directory, **kwargs)
FeatureCache.build = classmethod(build)

real_merge = diffcap.data.prepare.merge_caches
def merge(sources, directory, **kwargs):
    note(kind="merge", sources=len(sources))
    return real_merge(sources, directory, **kwargs)
diffcap.data.prepare.merge_caches = merge

sys.exit(diffcap.cli.main(sys.argv[2:]))
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_two_processes_share_features_and_train_one_synchronised_model(shapes_jsonl: Path, tmp_path: Path) -> None:
    from tiny_models import fast_overrides, make_tiny_backbone, make_tiny_clip

    # the shapes data plus one broken image: both processes must agree on skipping it
    data = tmp_path / "data"
    shutil.copytree(shapes_jsonl.parent, data)
    (data / "images" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with open(data / "captions.jsonl", "a") as f:
        f.write(json.dumps({"image": "images/broken.png", "caption": "a broken image", "split": "train"}) + "\n")
    backbone, clip = make_tiny_backbone(tmp_path / "backbone"), make_tiny_clip(tmp_path / "clip")
    steps = 6
    overrides = fast_overrides(backbone, clip, data / "captions.jsonl", tmp_path / "features",
                               **{"train.max_steps": steps, "train.save_every": 3, "train.batch_size": 3})
    script = tmp_path / "launched.py"
    script.write_text(SCRIPT)
    out = tmp_path / "records"
    out.mkdir()
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(_free_port()),
               str(script), str(out), "train", "tiny", *overrides, "--run-dir", str(run_dir)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = [_records(out / f"rank{r}.jsonl") for r in range(2)]
    assert all(ranks), result.stderr[-4000:]

    def kind(records: list[dict], name: str) -> list[dict]:
        return [r for r in records if r["kind"] == name]

    # features: each process encoded its own half of the images, the main one merged them into one cache
    encoded = [set(k for r in kind(records, "encode") for k in r["keys"]) for records in ranks]
    train_images = {f"images/{p.name}" for p in (data / "images").glob("train_*.png")} | {"images/broken.png"}
    assert encoded[0] and encoded[1] and not encoded[0] & encoded[1]
    assert encoded[0] | encoded[1] == train_images
    assert len(kind(ranks[0], "merge")) == 1 and not kind(ranks[1], "merge")
    meta = json.loads((tmp_path / "features" / "train" / "meta.json").read_text())
    assert set(meta["keys"]) == train_images - {"images/broken.png"} and list(meta["failed"]) == ["images/broken.png"]

    # data: both processes knew there were two, and took disjoint halves of each epoch
    shards = [kind(records, "shard") for records in ranks]
    assert shards[0] and shards[1] and all(s["world"] == 2 for s in shards[0] + shards[1])
    first, second = set(shards[0][0]["indices"]), set(shards[1][0]["indices"])
    assert len(first) == len(second) > 0 and not first & second

    # weights: identical in both processes after every step, and changing from step to step
    params = [[r["sha"] for r in kind(records, "params")] for records in ranks]
    assert len(params[0]) == steps and params[0] == params[1]
    assert len(set(params[0])) == steps

    # the logged loss is the mean of the two processes' losses (which differ: different data)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    losses = [[r["value"] for r in kind(records, "loss")] for records in ranks]
    assert len(losses[0]) == len(losses[1]) == steps and losses[0] != losses[1]
    events = EventAccumulator(str(run_dir / "tb"))
    events.Reload()
    logged = {e.step: e.value for e in events.Scalars("train/loss")}
    assert sorted(logged) == list(range(1, steps + 1))
    for step, value in logged.items():
        assert value == pytest.approx((losses[0][step - 1] + losses[1][step - 1]) / 2, rel=1e-5)

    # checkpoints: written by the main process only, one directory, loadable
    saves = [len(kind(records, "save")) for records in ranks]
    assert saves == [3, 0]  # steps 3 and 6, and the final one
    from diffcap.checkpoint import load_checkpoint

    _, ckpt_meta, _ = load_checkpoint(run_dir / "checkpoint")
    assert ckpt_meta["step"] == steps
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoint", "config.json", "tb"]
