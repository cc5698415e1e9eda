"""The autoregressive baseline: causal teacher forcing, cached decoding equal to uncached, beam search, and the
same train/save/load/caption path as the diffusion model."""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import pytest
import torch

from diffcap.captioner import Captioner
from diffcap.models.autoregressive import CaptionDecoder, DecoderShape
from diffcap.models.denoiser import ImageFeatures
from diffcap.pipeline import generate
from diffcap.train import train

SHAPE = DecoderShape(vocab_size=11, hidden=32, heads=4, intermediate=64, layers=2, max_length=6, pooled_dim=5,
                     grid_dim=7, grid_pool=2, dropout=0.0)
END = (1, 0)  # ([SEP], [PAD]) indices in this toy vocabulary


def _image(batch: int, seed: int = 0) -> ImageFeatures:
    g = torch.Generator().manual_seed(seed)
    return ImageFeatures(torch.randn(batch, 5, generator=g), torch.randn(batch, 9, 7, generator=g))


@pytest.fixture(params=[False, True], ids=["post-norm", "pre-norm"])
def decoder(request: pytest.FixtureRequest) -> CaptionDecoder:
    """Both block layouts (model.norm): causality, the KV cache and beam search must hold for each."""
    torch.manual_seed(0)
    net = CaptionDecoder(dataclasses.replace(SHAPE, pre_norm=request.param)).eval()
    with torch.no_grad():  # non-zero cross-attention so the image matters
        for block in net.blocks:
            torch.nn.init.normal_(block.cross_out.weight, std=0.2)
        net.out_bias.normal_(std=2.0)
    return net


def test_teacher_forcing_is_causal(decoder: CaptionDecoder) -> None:
    ids = torch.randint(2, 11, (3, 6))
    logits = decoder(ids, _image(3))
    assert logits.shape == (3, 6, 11)
    changed = ids.clone()
    changed[:, 4] = (changed[:, 4] + 1 - 2) % 9 + 2
    after = decoder(changed, _image(3))
    # position i sees ids[:, :i]: changing word 4 changes only the prediction at position 5
    torch.testing.assert_close(after[:, :5], logits[:, :5])
    assert not torch.allclose(after[:, 5], logits[:, 5])


def _greedy_without_cache(net: CaptionDecoder, image: ImageFeatures) -> torch.Tensor:
    ids = torch.zeros(len(image), 0, dtype=torch.long)
    for _ in range(net.shape.max_length):
        padded = torch.cat([ids, torch.zeros(len(image), net.shape.max_length - ids.shape[1], dtype=torch.long)], 1)
        nxt = net(padded, image)[:, ids.shape[1]].argmax(-1)
        ids = torch.cat([ids, nxt[:, None]], 1)
    return ids


def test_cached_greedy_matches_full_recomputation(decoder: CaptionDecoder) -> None:
    image = _image(4, seed=1)
    cached = decoder.generate(image, end=())  # no end token: decode every position
    torch.testing.assert_close(cached, _greedy_without_cache(decoder, image))


def _sequence_logprob(net: CaptionDecoder, image: ImageFeatures, ids: torch.Tensor) -> torch.Tensor:
    logp = net(ids, image).log_softmax(-1)
    return logp.gather(-1, ids[..., None]).squeeze(-1).sum(-1)


def test_beam_search_finds_the_most_likely_caption(decoder: CaptionDecoder) -> None:
    import itertools

    short = CaptionDecoder(dataclasses.replace(decoder.shape, max_length=3)).eval()
    short.load_state_dict({k: v[:3] if k == "positions.weight" else v for k, v in decoder.state_dict().items()})
    image = _image(6, seed=2)
    every = torch.tensor(list(itertools.product(range(11), repeat=3)))  # all 1331 captions of length 3
    scores = torch.stack([_sequence_logprob(short, ImageFeatures(image.pooled[i:i + 1].expand(len(every), -1),
                                                                 image.grid[i:i + 1].expand(len(every), -1, -1)), every)
                          for i in range(6)])  # (6, 1331)
    best = every[scores.argmax(-1)]
    greedy = short.generate(image, end=())
    torch.testing.assert_close(short.generate(image, end=(), beam_size=1), greedy)
    # a beam as wide as every prefix is exhaustive search
    torch.testing.assert_close(short.generate(image, end=(), beam_size=121), best)
    g, b = _sequence_logprob(short, image, greedy), _sequence_logprob(short, image, short.generate(image, end=(), beam_size=4))
    assert (b >= g - 1e-4).all()


def test_finished_rows_repeat_the_end_token(decoder: CaptionDecoder) -> None:
    image = _image(8, seed=3)
    free = decoder.generate(image, end=())
    end = int(free[0, 1])  # the second word of row 0 becomes the end token
    ids = decoder.generate(image, end=(end,), banned=(3,))
    assert (ids != 3).all()
    for row in ids.tolist():
        if end in row:
            first = row.index(end)
            assert all(i == end for i in row[first:])


def test_autoregressive_baseline_trains_saves_and_captions(tmp_path: Path, shapes_jsonl: Path, tiny_config) -> None:
    config = tiny_config(shapes_jsonl, model__kind="autoregressive", train__max_steps=30)
    checkpoint = train(config, tmp_path / "run", progress=False)
    captioner = Captioner.from_pretrained(checkpoint)
    images = sorted((shapes_jsonl.parent / "images").glob("dev_*.png"))
    captions = captioner.caption(images)
    assert len(captions) == len(images) and all(isinstance(c, str) for c in captions)
    beams = generate(captioner.model, captioner.features(images), beam_size=3).captions
    assert len(beams) == len(images)
    with pytest.raises(ValueError, match="trajectory"):
        captioner.trajectory(images[0])


def test_autoregressive_baseline_learns_the_captions(tmp_path: Path, tiny_config, write_caption_dataset) -> None:
    from diffcap.demo import Scene, Shape, draw_scene

    scenes = {"r.png": (Scene((Shape("circle", "red", "large"),), "white"), "a red circle on white"),
              "b.png": (Scene((Shape("square", "blue", "large"),), "black"), "a blue square on black")}
    jsonl = write_caption_dataset(tmp_path / "data", [(n, [c] * 4, "train") for n, (_, c) in scenes.items()],
                                  lambda n: draw_scene(scenes[n][0], random.Random(n)))
    config = tiny_config(jsonl, model__kind="autoregressive", train__batch_size=8, train__max_steps=150,
                         train__ema_decay=0.9, train__lr=2e-3)
    captioner = Captioner.from_pretrained(train(config, tmp_path / "run", progress=False))
    assert captioner.caption([tmp_path / "data" / n for n in scenes]) == [c for _, c in scenes.values()]


def test_mbr_picks_the_consensus_caption() -> None:
    from diffcap.selection import mbr_scores, mbr_select, similarity

    assert similarity("a dog runs".split(), "a dog runs".split()) == 1.0
    assert similarity([], "a dog".split()) == 0.0
    assert 0 < similarity("a dog runs".split(), "a dog sits".split()) < 1
    candidates = ["a cat on a sofa", "a dog runs on the grass", "a brown dog runs on grass", "a dog runs on grass"]
    assert mbr_select(candidates) == 3
    scores = mbr_scores(candidates)  # mean similarity to the others: the outlier lowest, in [0, 1]
    assert min(scores) == scores[0] and all(0 <= x <= 1 for x in scores)
    assert mbr_scores(["a dog", "a dog"]) == [1.0, 1.0] and mbr_scores(["one"]) == [0.0]
    assert mbr_select(["only one"]) == 0
    with pytest.raises(ValueError):
        mbr_select([])


def test_candidates_choose_among_the_seeded_samples(tiny_checkpoint: Path, shapes_jsonl: Path) -> None:
    from diffcap.selection import mbr_select

    captioner = Captioner.from_pretrained(tiny_checkpoint)
    features = captioner.features(sorted((shapes_jsonl.parent / "images").glob("dev_*.png")))
    samples = [generate(captioner.model, features, seed=10 + k).captions for k in range(3)]
    chosen = generate(captioner.model, features, seed=10, candidates=3).captions
    assert chosen == [row[mbr_select(row)] for row in zip(*samples)]
    assert generate(captioner.model, features, seed=10, candidates=1).captions == samples[0]
    with pytest.raises(ValueError, match="candidates"):
        generate(captioner.model, features, candidates=0)


def test_bf16_sampling_gives_captions_and_bad_precisions_are_refused(tiny_checkpoint: Path, shapes_jsonl: Path) -> None:
    captioner = Captioner.from_pretrained(tiny_checkpoint)
    features = captioner.features(sorted((shapes_jsonl.parent / "images").glob("dev_*.png")))
    fp32 = generate(captioner.model, features, seed=4).captions
    bf16 = generate(captioner.model, features, seed=4, precision="bf16").captions
    assert len(bf16) == len(fp32) and all(isinstance(c, str) for c in bf16)
    with pytest.raises(ValueError, match="precision"):
        generate(captioner.model, features, precision="fp8")


def test_label_smoothing_changes_the_loss_not_the_logged_cross_entropy() -> None:
    from diffcap.losses import decoder_losses

    class Space:  # what decoder_losses reads of a TextSpace
        pad_index = 0

    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11) * 3
    ids = torch.tensor([[3, 4, 5, 1, 0], [6, 1, 0, 0, 0]])
    plain = decoder_losses(logits, ids, Space())  # type: ignore[arg-type]
    smooth = decoder_losses(logits, ids, Space(), label_smoothing=0.1)  # type: ignore[arg-type]
    mask = ids != 0
    expected = torch.nn.functional.cross_entropy(logits[mask], ids[mask], label_smoothing=0.1)
    torch.testing.assert_close(smooth["loss"], expected)  # [PAD] targets are left out, smoothing applied
    torch.testing.assert_close(smooth["cross_entropy"], plain["loss"])
    assert not torch.isclose(smooth["loss"], plain["loss"])

