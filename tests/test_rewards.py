"""Self-critical training (loss.objective=cider): the CIDEr-D reward is pycocoevalcap's CIDEr-D, the loss
favours the better-rewarded sample, sampled decoding draws from the model, and a run trained on the reward
alone learns the captions."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from diffcap.captioner import Captioner
from diffcap.losses import self_critical_loss
from diffcap.models.autoregressive import CaptionDecoder, DecoderShape
from diffcap.models.denoiser import ImageFeatures
from diffcap.rewards import CiderD
from diffcap.train import train

REFERENCES = [
    ["a dog runs on the grass", "a brown dog running through a field", "the dog is running outside"],
    ["two children play in the water", "kids splash in a pool", "two kids swimming in the water"],
    ["a man rides a bike down a hill", "a cyclist on a mountain trail", "a man on a bicycle"],
    ["a dog jumps into the water", "a black dog swims", "a dog in a lake"],
]
HYPOTHESES = ["a dog runs through the grass", "children in the water", "a man on a bike", "a cat on a sofa"]


def test_cider_d_is_pycocoevalcap_cider_caption_by_caption() -> None:
    from pycocoevalcap.cider.cider import Cider

    gts = {str(i): refs for i, refs in enumerate(REFERENCES)}
    res = {str(i): [hyp] for i, hyp in enumerate(HYPOTHESES)}
    _, expected = Cider().compute_score(gts, res)
    reward = CiderD(REFERENCES)
    got = reward.scores(HYPOTHESES, range(len(HYPOTHESES)))
    assert got == pytest.approx(list(expected), rel=1e-9)
    assert got[3] == 0.0 < got[2]  # no shared n-gram: nothing; some: something
    # PTB-style tokenisation: case and punctuation do not change the score
    assert reward.score("A dog runs through the grass .", 0) == pytest.approx(got[0])
    with pytest.raises(ValueError, match="reference"):
        CiderD([["a dog"], []])


def test_self_critical_loss_favours_the_better_sample() -> None:
    torch.manual_seed(0)
    logits = torch.zeros(4, 3, 5, requires_grad=True)  # 2 samples x 2 images, 3 positions, 5 pieces
    tokens = torch.tensor([[2, 3, 1], [4, 1, 0], [3, 3, 1], [2, 1, 0]])  # end pieces: 1 ([SEP]) and 0 ([PAD])
    rewards = torch.tensor([1.0, 0.2, 0.0, 0.2])  # image 0: sample 0 better; image 1: a tie
    out = self_critical_loss(logits, tokens, rewards, samples=2, end=(1, 0))
    out["loss"].backward()
    grad = logits.grad
    assert grad is not None
    assert grad[0, 0, 2] < 0 < grad[2, 0, 3]  # descent raises image 0's better sample, lowers its worse one
    assert torch.all(grad[1] == 0) and torch.all(grad[3] == 0)  # equal rewards: no advantage, no push
    assert torch.all(grad[0, 2] != 0) and torch.all(grad[1, 2] == 0)  # the first end counts; after it, nothing
    assert float(out["reward"]) == pytest.approx(0.35)
    raw = torch.randn(4, 3, 5)
    hot = self_critical_loss(raw, tokens, rewards, samples=2, end=(1, 0), temperature=2.0)["loss"]
    scaled = self_critical_loss(raw / 2.0, tokens, rewards, samples=2, end=(1, 0))["loss"]
    plain = self_critical_loss(raw, tokens, rewards, samples=2, end=(1, 0))["loss"]
    assert float(hot) == pytest.approx(float(scaled)) and float(hot) != pytest.approx(float(plain))
    with pytest.raises(ValueError, match="2 samples"):
        self_critical_loss(logits, tokens, rewards, samples=1, end=(1, 0))


def test_sampled_decoding_draws_from_the_model() -> None:
    torch.manual_seed(0)
    shape = DecoderShape(vocab_size=11, hidden=32, heads=4, intermediate=64, layers=2, max_length=6, pooled_dim=5,
                         grid_dim=7, grid_pool=2, dropout=0.0)
    net = CaptionDecoder(shape).eval()
    image = ImageFeatures(torch.randn(64, 5), torch.randn(64, 9, 7))
    greedy = net.generate(image, end=(1, 0), banned=(3,))
    draws = [net.generate(image, end=(1, 0), banned=(3,), sample=True) for _ in range(2)]
    assert not torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], greedy)
    for ids in draws:
        assert not bool((ids == 3).any())  # banned pieces are never drawn
        for row in ids.tolist():  # after the first end piece, only [SEP]
            ends = [i for i, x in enumerate(row) if x in (1, 0)]
            assert not ends or all(x == 1 for x in row[ends[0] + 1:])
    cold = net.generate(image, end=(1, 0), banned=(3,), sample=True, temperature=1e-6)
    assert torch.equal(cold, greedy)  # near zero temperature, sampling is greedy decoding
    with torch.no_grad():  # an overwhelming preference is always drawn
        net.out_bias[7] = 1e4
    assert bool((net.generate(image, end=(1, 0), sample=True) == 7).all())
    with pytest.raises(ValueError, match="beam_size"):
        net.generate(image, end=(1, 0), sample=True, beam_size=2)
    with pytest.raises(ValueError, match="temperature"):
        net.generate(image, end=(1, 0), sample=True, temperature=0.0)


def test_self_critical_fine_tuning_raises_the_reward(tmp_path: Path, tiny_config, write_caption_dataset) -> None:
    """A briefly likelihood-trained model, fine-tuned on the reward alone (train.init_from), captions its
    training images with a higher CIDEr-D than before."""
    from diffcap.demo import Scene, Shape, draw_scene

    scenes = {f"{colour}-{shape}.png": (Scene((Shape(shape, colour, "large"),), ground),
                                        f"a {colour} {shape} on {ground}")
              for colour, ground in (("red", "white"), ("blue", "black")) for shape in ("circle", "square")}
    jsonl = write_caption_dataset(tmp_path / "data", [(n, [c] * 4, "train") for n, (_, c) in scenes.items()],
                                  lambda n: draw_scene(scenes[n][0], random.Random(n)))
    images = [tmp_path / "data" / n for n in scenes]
    reward = CiderD([[c] * 4 for _, c in scenes.values()])

    def mean_reward(checkpoint: Path) -> float:
        captions = Captioner.from_pretrained(checkpoint).caption(images)
        return sum(reward.scores(captions, range(len(images)))) / len(images)

    base = train(tiny_config(jsonl, model__kind="autoregressive", train__batch_size=8, train__max_steps=10,
                             train__lr=2e-3), tmp_path / "likelihood", progress=False)
    tuned = train(tiny_config(jsonl, model__kind="autoregressive", train__batch_size=8, train__max_steps=40,
                              train__lr=1e-4, train__init_from=str(base), loss__objective="cider",
                              loss__cider_samples=4), tmp_path / "cider", progress=False)
    before, after = mean_reward(base), mean_reward(tuned)
    assert after > before + 0.5, (before, after)


def test_self_critical_training_needs_a_trained_model(tmp_path: Path, shapes_jsonl: Path, tiny_config) -> None:
    from diffcap.config import ConfigError

    config = tiny_config(shapes_jsonl, model__kind="autoregressive", loss__objective="cider")
    with pytest.raises(ConfigError, match="train.init_from"):
        train(config, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()  # refused before anything was written
