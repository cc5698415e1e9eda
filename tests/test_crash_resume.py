"""Crash and resume: SIGKILL a training run at random moments, resume it each time, and compare with a run that
was never interrupted (RELIABILITY.md)."""

from __future__ import annotations

import itertools
import json
import os
import random
import signal
import sys
import time
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffcap.checkpoint import load_checkpoint, load_train_state
from tiny_models import tiny_setup  # noqa: F401 - a fixture

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="fork, SIGKILL and /proc")


def _step_on_disk(ckpt: Path) -> int:
    """The step of the checkpoint a running process last completed (-1: none yet or mid-swap); read-only."""
    try:
        return json.loads((ckpt / "meta.json").read_text())["step"]
    except (OSError, ValueError, KeyError):
        return -1


def _final_state(ckpt: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    meta, train_tensors = load_train_state(ckpt)
    tensors = {**{f"train/{k}": v for k, v in train_tensors.items()},
               **{f"model/{k}": v for k, v in load_file(str(ckpt / "model.safetensors")).items()}}
    return {k: v for k, v in meta.items() if k != "elapsed"}, tensors


def test_sigkill_at_random_moments_then_resume_matches_an_uninterrupted_run(tiny_setup: dict, tmp_path: Path) -> None:
    from fork_server import ForkServer

    steps = 60
    overrides = tiny_setup["overrides"](**{"train.max_steps": steps})
    server = ForkServer(backbones=[str(tiny_setup["backbone"])], encoders=[f"clip:{tiny_setup['clip']}"])
    try:
        # the uninterrupted run (also a forked child: same process setup as the killed ones)
        reference = tmp_path / "reference"
        pid = server.start(["train", "tiny", *overrides, "--run-dir", str(reference)], tmp_path / "reference.log")
        assert server.wait(pid) == 0, (tmp_path / "reference.log").read_text()[-3000:]

        run = tmp_path / "killed"
        ckpt = run / "checkpoint"
        rng = random.Random(1234)
        kills, last_step, seen_steps = 0, -1, []
        while kills < 12:
            log = tmp_path / f"killed-{kills}.log"
            pid = server.start(["train", "tiny", *overrides, "--run-dir", str(run), "--resume"], log)
            if kills == 0:  # the first kill lands during start-up, before any checkpoint exists
                time.sleep(rng.uniform(0.0, 0.5))
            else:  # the others at a random moment of a step or a save: wait for two new checkpoints to measure
                # how long a step (and its save) takes here, then kill at a random moment of the next one
                times = []
                deadline = time.monotonic() + 120
                while len(times) < 2 and not server.exited(pid):
                    assert time.monotonic() < deadline, log.read_text()[-3000:]
                    if _step_on_disk(ckpt) > last_step + len(times):
                        times.append(time.monotonic())
                    time.sleep(0.001)
                time.sleep(rng.uniform(0.0, 1.0) * (times[1] - times[0] if len(times) == 2 else 0.0))
            os.kill(pid, signal.SIGKILL)
            code = server.wait(pid)
            if code == 0:  # it finished before the kill landed
                break
            assert code == -signal.SIGKILL, log.read_text()[-3000:]
            kills += 1
            if not ckpt.exists() and not list(run.glob(".checkpoint.old-*")):
                assert last_step == -1  # killed before its first checkpoint: nothing to check yet
                continue
            # never a corrupt checkpoint: it loads (moving back one a kill left aside), is consistent, finite
            _, meta, tensors = load_checkpoint(ckpt)
            train_meta, train_tensors = load_train_state(ckpt)
            assert meta["step"] == train_meta["step"] >= max(last_step, 1)
            assert all(torch.isfinite(t).all() for t in [*tensors.values(), *train_tensors.values()]
                       if t.is_floating_point())
            last_step = meta["step"]
            seen_steps.append(last_step)
        assert kills >= 10, f"only {kills} kills landed before the run finished (steps {seen_steps})"
        assert last_step < steps  # the kills happened during training, not after it
        # finish it
        pid = server.start(["train", "tiny", *overrides, "--run-dir", str(run), "--resume"], tmp_path / "final.log")
        assert server.wait(pid) == 0, (tmp_path / "final.log").read_text()[-3000:]
    finally:
        server.close()

    expected_meta, expected = _final_state(reference / "checkpoint")
    meta, got = _final_state(ckpt)
    assert meta["step"] == expected_meta["step"] == steps and set(got) == set(expected)
    different = [k for k in expected if not torch.equal(got[k], expected[k])]
    assert not different, f"resumed run differs from the uninterrupted one in {len(different)} tensors: {different[:5]}"
    assert meta == expected_meta  # epoch, data position, RNG states, optimizer settings
    assert [p.name for p in run.iterdir() if p.name.startswith(".")] == []  # no leftovers of killed saves


def test_a_run_split_into_sittings_is_the_run_that_never_stopped(tiny_setup: dict, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """`train --stop-after MINUTES` then `--resume`, many times over (a long run across several sittings): the
    result is bit-identical to one uninterrupted run, and the snapshots taken along the way are checkpoints."""
    from diffcap.pipeline import load_model
    from diffcap.train import train

    steps = 30
    config = tiny_setup["config"](**{"train.max_steps": steps, "train.save_every": 1000})
    reference = train(config, tmp_path / "reference", progress=False)

    config = tiny_setup["config"](**{"train.max_steps": steps, "train.save_every": 1000,
                                     "train.snapshot_minutes": 0.001})
    # a clock that ticks 10 ms per reading, so the sittings split the run the same way on a fast or a slow machine
    ticks = itertools.count()
    monkeypatch.setattr("diffcap.train.time", types.SimpleNamespace(perf_counter=lambda: next(ticks) * 0.01))
    run, sittings, steps_seen = tmp_path / "sittings", 0, []
    while sittings < 200:
        ckpt = train(config, run, resume=sittings > 0, progress=False, stop_after_minutes=0.002)
        sittings += 1
        meta = json.loads((ckpt / "meta.json").read_text())
        steps_seen.append(meta["step"])
        if meta.get("finished"):
            break
    assert meta["step"] == steps and len(steps_seen) >= 3, steps_seen  # it really was split
    assert steps_seen == sorted(steps_seen)
    expected_meta, expected = _final_state(reference)
    got_meta, got = _final_state(ckpt)
    different = [k for k in expected if not torch.equal(got[k], expected[k])]
    assert not different, f"the run in {sittings} sittings differs in {len(different)} tensors: {different[:5]}"
    assert got_meta == expected_meta
    snapshots = sorted((run / "snapshots").iterdir())
    assert snapshots, "no snapshot was kept"
    minutes = [json.loads((s / "meta.json").read_text())["training_minutes"] for s in snapshots]
    assert minutes == sorted(minutes)
    for snapshot in snapshots[:2]:
        assert not (snapshot / "train_state.json").exists()
        model, meta = load_model(snapshot)
        assert int(snapshot.name.split("-")[1]) == meta["step"] <= steps
    with pytest.raises(ValueError, match="must be > 0"):
        train(config, run, resume=True, progress=False, stop_after_minutes=0)
