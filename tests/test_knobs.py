"""Every research knob of the config reaches the model: each variant builds, trains a step, samples, and changes
what it should (and the rest of the config rejects invalid combinations)."""

from __future__ import annotations

import pytest
import torch

from diffcap.config import ConfigError, load_config
from diffcap.models.denoiser import ImageFeatures
from diffcap.pipeline import build_model, generate, training_losses

CAPTIONS = ["a dog runs on the grass", "a red car on a street", "two children play in the snow", "a man rides a bike"]


def _model(*overrides: str):
    config = load_config("tiny", ["model.layers=1", "text.max_length=8", *overrides])
    torch.manual_seed(0)
    return build_model(config, pooled_dim=6, grid_dim=5, captions=CAPTIONS)


def _batch(model, n: int = 4):
    g = torch.Generator().manual_seed(0)
    image = ImageFeatures(torch.randn(n, 6, generator=g), torch.randn(n, 16, 5, generator=g))
    ids = model.space.encode(CAPTIONS[:n])
    return ids, image, torch.ones(n, dtype=torch.bool)


KNOBS = [
    [],
    ["diffusion.target=eps"],
    ["diffusion.target=x_prev", "diffusion.target_interval=30"],
    ["diffusion.target=x_prev", "diffusion.target_interval=100"],
    ["diffusion.schedule=linear"],
    ["diffusion.schedule=sqrt", "diffusion.timesteps=2000"],
    ["loss.distance=l1"],
    ["loss.reduction=series_sum"],
    ["loss.reduction=series_sum_sample_mean"],
    ["loss.x_1_weight=1.0"],
    ["loss.x_1_weight=1.0", "loss.rounding_on=both"],
    ["loss.x_t_weight=0", "loss.rounding_on=x_1"],
    ["loss.rounding_weight=0"],
    ["train.samples_per_caption=3"],
    ["model.pooled_mode=add"],
    ["model.grid_mode=cross", "model.grid_pool=4"],
    ["model.timestep_embedding=false"],
    ["model.self_condition=false"],
    ["model.kind=autoregressive"],
    ["model.kind=autoregressive", "model.norm=pre", "model.init_from_backbone=false", "loss.label_smoothing=0.1"],
    ["model.norm=pre", "model.init_from_backbone=false"],
    ["model.norm=pre", "model.grid_mode=cross", "model.grid_pool=4"],
    ["text.embeddings=trainable"],
    ["text.embeddings=learned", "text.embedding_dim=16"],
]


@pytest.mark.parametrize("overrides", KNOBS, ids=lambda o: ",".join(o) or "default")
def test_each_variant_trains_a_step_and_samples(overrides: list[str]) -> None:
    model = _model(*overrides)
    ids, image, keep = _batch(model)
    model.denoiser.train()
    losses = training_losses(model, model.denoiser, ids, image, keep, self_condition=True)
    assert torch.isfinite(losses["loss"]) and losses["loss"] > 0
    losses["loss"].backward()
    grads = [p.grad for p in model.denoiser.parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    captions = generate(model, image, steps=3).captions
    assert len(captions) == 4 and all(isinstance(c, str) for c in captions)


def test_x_1_term_runs_only_when_asked() -> None:
    plain, with_x1 = _model(), _model("loss.x_1_weight=0.5")
    for model, expected in ((plain, False), (with_x1, True)):
        ids, image, keep = _batch(model)
        assert ("x_1" in training_losses(model, model.denoiser, ids, image, keep, False)) is expected


def test_reductions_scale_as_documented() -> None:
    values = {}
    for how in ("mean", "series_sum", "series_sum_sample_mean"):
        model = _model(f"loss.reduction={how}")
        ids, image, keep = _batch(model)
        torch.manual_seed(1)  # the same t and noise for every reduction
        model.denoiser.eval()
        values[how] = training_losses(model, model.denoiser, ids, image, keep, False)["x_t"].item()
    B, L = 4, 8
    assert values["series_sum"] == pytest.approx(values["mean"] * B * L, rel=1e-4)
    assert values["series_sum_sample_mean"] == pytest.approx(values["mean"] * L, rel=1e-4)


def test_l1_and_mse_differ() -> None:
    out = {}
    for kind in ("mse", "l1"):
        model = _model(f"loss.distance={kind}")
        ids, image, keep = _batch(model)
        torch.manual_seed(1)
        model.denoiser.eval()
        out[kind] = training_losses(model, model.denoiser, ids, image, keep, False)["x_t"].item()
    assert out["mse"] != pytest.approx(out["l1"])


def test_rounding_head_runs_in_the_training_precision_unless_asked_for_fp32() -> None:
    """Same network pass (bf16 autocast), same t and noise: only the head's matmul precision differs."""
    out = {}
    for precision in ("fp32", "train"):
        model = _model(f"loss.rounding_precision={precision}")
        ids, image, keep = _batch(model)
        model.denoiser.eval()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            torch.manual_seed(1)
            losses = training_losses(model, model.denoiser, ids, image, keep, False)
        assert losses["rounding"].dtype == torch.float32  # the softmax is fp32 either way
        out[precision] = losses["rounding"].item()
    assert out["train"] != out["fp32"] and out["train"] == pytest.approx(out["fp32"], rel=0.05)


def test_samples_per_caption_multiplies_the_batch() -> None:
    model = _model("train.samples_per_caption=3")
    ids, image, keep = _batch(model)
    seen = []
    handle = model.denoiser.register_forward_hook(lambda m, args, out: seen.append(out.shape[0]))
    training_losses(model, model.denoiser, ids, image, keep, False)
    handle.remove()
    assert seen == [12]


def test_eps_target_trains_the_network_to_predict_noise() -> None:
    """With target=eps the network's training target is the noise that made x_t."""
    model = _model("diffusion.target=eps")
    ids, image, keep = _batch(model)
    x0 = model.space.embed(ids)
    t, noise = torch.full((4,), 500), torch.randn_like(x0)
    fn = lambda x, tt, sc: model.denoiser(x, tt, image, keep, sc)  # noqa: E731
    pred = model.diffusion.training_prediction(fn, x0, t, noise, False)
    torch.testing.assert_close(pred.target, noise)


@pytest.mark.parametrize("overrides, field", [
    (["diffusion.target=v"], "diffusion.target"),
    (["diffusion.target=x_prev", "diffusion.target_interval=1000"], "diffusion.target_interval"),
    (["loss.distance=l2"], "loss.distance"),
    (["loss.reduction=sum"], "loss.reduction"),
    (["loss.x_t_weight=0", "loss.rounding_weight=0"], "loss.x_t_weight"),
    (["loss.rounding_on=x_2"], "loss.rounding_on"),
    (["loss.x_1_weight=-1"], "loss.x_1_weight"),
    (["model.pooled_mode=mul"], "model.pooled_mode"),
    (["model.grid_mode=attention"], "model.grid_mode"),
    (["train.samples_per_caption=0"], "train.samples_per_caption"),
    (["model.kind=autoregressive", "model.grid_pool=0"], "model.grid_pool"),
    (["text.embeddings=learned", "text.embedding_dim=1"], "text.embedding_dim"),
    (["text.embeddings=random"], "text.embeddings"),
    (["model.kind=autoregressive", "text.embeddings=trainable"], "text.embeddings"),
    (["model.kind=autoregressive", "model.text_slot=retrieved"], "model.text_slot"),
    (["model.text_slot=caption"], "model.text_slot"),
    (["model.norm=sandwich"], "model.norm"),
    (["loss.label_smoothing=0.1"], "loss.label_smoothing"),  # diffusion has no next-word loss to smooth
    (["model.kind=autoregressive", "loss.label_smoothing=1.0"], "loss.label_smoothing"),
    (["loss.objective=cider"], "loss.objective"),  # diffusion samples no left-to-right captions to reward
    (["model.kind=autoregressive", "loss.objective=bleu"], "loss.objective"),
    (["model.kind=autoregressive", "loss.objective=cider", "loss.cider_samples=1"], "loss.cider_samples"),
    (["model.kind=autoregressive", "loss.objective=cider", "loss.cider_temperature=0"], "loss.cider_temperature"),
])
def test_invalid_knobs_name_the_field(overrides: list[str], field: str) -> None:
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config("default", overrides)


@pytest.mark.parametrize("schedule", ["cosine", "linear", "log", "constant"])
def test_lr_schedules_run_from_lr_to_lr_end(schedule: str) -> None:
    from diffcap.train import lr_at

    config = load_config("default", [f"train.lr_schedule={schedule}", "train.lr=1e-3", "train.lr_end_ratio=0.01",
                                     "train.warmup_steps=10"])
    assert lr_at(config, 0, 0.0) == pytest.approx(1e-4)  # warmup
    start, middle, end = (lr_at(config, 10, p) for p in (0.0, 0.5, 1.0))
    assert start == pytest.approx(1e-3)
    expected_end, expected_middle = {"cosine": (1e-5, 1e-5 + (1e-3 - 1e-5) / 2), "linear": (1e-5, (1e-3 + 1e-5) / 2),
                                     "log": (1e-5, 1e-4), "constant": (1e-3, 1e-3)}[schedule]
    assert end == pytest.approx(expected_end) and middle == pytest.approx(expected_middle)
    assert lr_at(config, 10, 2.0) == pytest.approx(end)  # past the budget stays at the end value


def test_dynamic_rounding_weight_keeps_the_ratio_over_the_epoch() -> None:
    from diffcap.config import LossConfig
    from diffcap.losses import DynamicRoundingWeight

    cfg = LossConfig(x_t_weight=1.0, x_1_weight=0.5)
    w = DynamicRoundingWeight(c=3.0, initial=0.3)
    assert w.value() == 0.3  # nothing seen yet this epoch
    w.update({"x_t": torch.tensor(2.0), "x_1": torch.tensor(2.0), "rounding": torch.tensor(6.0)}, cfg)
    w.update({"x_t": torch.tensor(1.0), "rounding": torch.tensor(3.0)}, cfg)
    assert w.value() == pytest.approx(3.0 * (2.0 + 1.0 + 1.0) / 9.0)
    restored = DynamicRoundingWeight(c=3.0, initial=0.3)
    restored.load(w.state())
    assert restored.value() == w.value()
    w.reset()
    assert w.value() == 0.3


def test_dynamic_rounding_trains_and_resumes(tmp_path, shapes_jsonl, tiny_config) -> None:
    import json

    from diffcap.train import train

    config = tiny_config(shapes_jsonl, loss__dynamic_rounding=1.0, train__max_steps=4, train__save_every=2)
    checkpoint = train(config, tmp_path / "run", progress=False)
    state = json.loads((checkpoint / "train_state.json").read_text())
    sums = state["dynamic_rounding"]
    assert sums["distance"] > 0 and sums["rounding"] > 0


def test_frozen_embeddings_have_no_learned_table() -> None:
    model = _model()
    assert model.word_table is None and "words" not in dict(model.denoiser.named_parameters())


def test_trainable_embeddings_start_at_the_frozen_table_and_get_gradients() -> None:
    model = _model("text.embeddings=trainable")
    table = model.word_table
    assert table is not None and torch.equal(table.detach(), model.space.table)
    ids, image, keep = _batch(model)
    losses = training_losses(model, model.denoiser, ids, image, keep, self_condition=False)
    losses["loss"].backward()
    assert table.grad is not None
    rows = table.grad.abs().sum(-1)
    used = ids.unique()
    # the rows of words in the batch get a gradient (the embedding, the rounding target), through the same table
    assert bool((rows[used] > 0).all())


def test_learned_embeddings_are_low_dimensional_and_round_with_the_same_table() -> None:
    model = _model("text.embeddings=learned", "text.embedding_dim=16")
    table = model.word_table
    assert table is not None and table.shape == (model.space.vocab_size, 16)
    assert model.denoiser.in_proj.in_features == 2 * 16 and model.denoiser.out_proj.out_features == 16  # up / down
    ids = model.space.encode(CAPTIONS)
    latents = model.space.embed(ids, table)
    assert latents.shape[-1] == 16
    # rounding is tied to the learned table: its own rows round back to their words
    assert torch.equal(model.space.round(latents, table=table), ids)


@pytest.mark.parametrize("kind", ["trainable", "learned"])
def test_learned_tables_are_trained_saved_and_reloaded(tmp_path, shapes_jsonl, tiny_config, kind: str) -> None:
    from diffcap.pipeline import load_model
    from diffcap.train import train

    config = tiny_config(shapes_jsonl, text__embeddings=kind, text__embedding_dim=16, train__max_steps=3)
    checkpoint = train(config, tmp_path / "run", progress=False)
    model, _ = load_model(checkpoint)
    assert model.word_table is not None
    assert model.word_table.shape == (model.space.vocab_size, 16 if kind == "learned" else model.space.dim)
    if kind == "trainable":  # the optimizer moved it away from where it started
        start = model.space.table
        assert not torch.allclose(model.word_table, start)
    image = ImageFeatures(torch.randn(2, model.denoiser.shape.pooled_dim), torch.randn(2, 16, model.denoiser.shape.grid_dim))
    assert len(generate(model, image, steps=2).captions) == 2


# -- the text slot (model.text_slot="retrieved") -----------------------------------------------------------------


def test_sentence_vectors_put_paraphrases_closer_than_unrelated_captions() -> None:
    from diffcap.text.retrieval import sentence_vectors

    v = sentence_vectors("minilm", ["a dog runs on the grass", "a puppy running across a lawn",
                                    "a red car parked on a city street"])
    assert torch.allclose(v.norm(dim=-1), torch.ones(3), atol=1e-4)
    assert float(v[0] @ v[1]) > float(v[0] @ v[2]) + 0.2


def test_retrieval_finds_the_most_similar_image_and_never_itself_when_excluded() -> None:
    from diffcap.text.retrieval import RetrievalMemory

    pooled = torch.tensor([[1.0, 0.0, 0.0], [0.9, 0.1, 0.0], [0.0, 0.0, 1.0]])
    memory = RetrievalMemory.build("minilm", pooled, [["a dog runs"], ["a puppy runs", "a dog running"], ["a car"]])
    values = memory.values.float()
    assert torch.equal(memory.nearest(pooled), values)  # each image is its own nearest
    excluded = memory.nearest(pooled, exclude=torch.arange(3))
    assert torch.equal(excluded[0], values[1]) and torch.equal(excluded[1], values[0])  # 0 <-> 1 are neighbours
    # a caption-less image has no text feature
    with pytest.raises(ValueError, match="at least one caption"):
        RetrievalMemory.build("minilm", pooled[:1], [[]])


def test_text_slot_is_one_more_prefix_position_that_the_output_depends_on() -> None:
    plain, slotted = _model(), _model("model.text_slot=retrieved")
    s = slotted.denoiser.shape
    assert s.prefix_length == plain.denoiser.shape.prefix_length + 1 and s.text_dim == 384
    ids, image, keep = _batch(slotted)
    x = slotted.space.embed(ids)
    t = torch.full((4,), 500)
    slotted.denoiser.eval()
    with pytest.raises(ValueError, match="text slot"):
        slotted.denoiser(x, t, image, keep)
    a = slotted.denoiser(x, t, image.with_text(torch.randn(4, 384)), keep)
    b = slotted.denoiser(x, t, image.with_text(torch.randn(4, 384)), keep)
    assert not torch.allclose(a, b)
    drop = torch.zeros(4, dtype=torch.bool)  # a dropped condition drops the text with the image
    assert torch.allclose(slotted.denoiser(x, t, image.with_text(torch.randn(4, 384)), drop),
                          slotted.denoiser(x, t, image.with_text(torch.randn(4, 384)), drop))


def test_text_slot_trains_saves_its_memory_and_captions_new_images(tmp_path, shapes_jsonl, tiny_config) -> None:
    from diffcap.checkpoint import load_checkpoint
    from diffcap.pipeline import load_model
    from diffcap.train import train

    config = tiny_config(shapes_jsonl, model__text_slot="retrieved", train__max_steps=3)
    checkpoint = train(config, tmp_path / "run", progress=False)
    _, _, tensors = load_checkpoint(checkpoint)
    assert {"retrieval.keys", "retrieval.values"} <= set(tensors)
    model, _ = load_model(checkpoint)
    assert model.memory is not None and len(model.memory.keys) == len(model.train_image_hashes)
    s = model.denoiser.shape
    image = ImageFeatures(torch.randn(2, s.pooled_dim), torch.randn(2, 16, s.grid_dim))  # no text: retrieved
    assert len(generate(model, image, steps=2).captions) == 2
    assert len(generate(model, image, steps=2, guidance=1.0).captions) == 2
    # a checkpoint that lost its memory is refused with a clear error, not a shape mismatch at sampling
    import json

    from diffcap.checkpoint import CheckpointError, save_checkpoint

    config, meta, _ = load_checkpoint(checkpoint)
    damaged = {k: v for k, v in tensors.items() if not k.startswith("retrieval.")}
    save_checkpoint(tmp_path / "damaged", config_json=json.dumps(config), meta=meta, tensors=damaged)
    with pytest.raises(CheckpointError, match="no memory"):
        load_model(tmp_path / "damaged")


@pytest.mark.parametrize("kind", ["diffusion", "autoregressive"])
def test_init_from_backbone_decides_the_blocks_not_the_embeddings(kind: str) -> None:
    from diffcap.text.space import load_backbone

    _, backbone = load_backbone("minilm")
    state = backbone.state_dict()
    pretrained, random = (_model(f"model.kind={kind}", f"model.init_from_backbone={flag}").denoiser
                          for flag in ("true", "false"))
    layer0 = state["encoder.layer.0.attention.self.query.weight"]
    torch.testing.assert_close(pretrained.blocks[0].query.weight, layer0)
    assert not torch.allclose(random.blocks[0].query.weight, layer0)
    for net in (pretrained, random):  # positions and the embedding LayerNorm come from the backbone either way
        torch.testing.assert_close(net.positions.weight, state["embeddings.position_embeddings.weight"][:8])
        torch.testing.assert_close(net.embed_norm.weight, state["embeddings.LayerNorm.weight"])
    if kind == "autoregressive":  # the tied word table is the text space's, from the backbone
        torch.testing.assert_close(random.embed.weight, pretrained.embed.weight)


@pytest.mark.parametrize(("avx512_bf16", "amx", "expected"), [(False, False, "fp32"), (True, False, "bf16"),
                                                              (False, True, "bf16")])
def test_auto_precision_is_bf16_only_where_the_cpu_multiplies_bf16_natively(
        monkeypatch: pytest.MonkeyPatch, avx512_bf16: bool, amx: bool, expected: str) -> None:
    """Emulated bf16 autocast is about 4x slower than fp32 on a CPU without AVX512-BF16 or AMX (BENCHMARKS.md),
    so train.precision=auto (the default) only picks bf16 where the hardware has it; an explicit choice stands."""
    from diffcap.train import resolve_precision

    assert load_config("default").train.precision == "auto"
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == expected
    assert resolve_precision("fp32", cpu) == "fp32" and resolve_precision("bf16", cpu) == "bf16"
    with pytest.raises(ConfigError):
        load_config("default", ["train.precision=fp16"])
