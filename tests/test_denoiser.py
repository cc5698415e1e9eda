"""Tests for diffcap.models.denoiser and diffcap.models.guidance on tiny random networks (no downloads)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import BertConfig, BertModel, DistilBertConfig, DistilBertModel

from diffcap.models.denoiser import Denoiser, DenoiserShape, ImageFeatures, backbone_key_map, timestep_embedding
from diffcap.models.guidance import conditioned

B, L, D = 4, 10, 8
SHAPE = DenoiserShape(latent_dim=D, pooled_dim=6, grid_dim=5, hidden=32, heads=4, intermediate=37, layers=2,
                      max_length=L, use_pooled=True, grid_pool=2, timestep_embedding=True, self_condition=True,
                      dropout=0.1)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _image(seed: int, batch: int = B) -> ImageFeatures:
    g = _gen(seed)
    return ImageFeatures(torch.randn(batch, 6, generator=g), torch.randn(batch, 16, 5, generator=g))


def _model(shape: DenoiserShape = SHAPE, seed: int = 0) -> Denoiser:
    torch.manual_seed(seed)
    model = Denoiser(shape).eval()
    with torch.no_grad():  # make the time MLP and null prefix matter (they start at/near zero)
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=_gen(seed + 1)))
    return model


@pytest.fixture(scope="module")
def model() -> Denoiser:
    return _model()


@pytest.fixture(scope="module")
def inputs():
    g = _gen(3)
    return torch.randn(B, L, D, generator=g), torch.tensor([0, 10, 500, 999]), torch.randn(B, L, D, generator=g)


def _bert() -> BertModel:
    torch.manual_seed(0)
    return BertModel(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=37, max_position_embeddings=64)).eval()


def _distilbert() -> DistilBertModel:
    torch.manual_seed(0)
    return DistilBertModel(DistilBertConfig(vocab_size=100, dim=32, n_layers=2, n_heads=4, hidden_dim=37,
                                            max_position_embeddings=64)).eval()


# -- forward ------------------------------------------------------------------------------------------------


def test_output_shape(model, inputs) -> None:
    x, t, sc = inputs
    with torch.no_grad():
        assert model(x, t, _image(0), None, sc).shape == (B, L, D)
        assert model(x, t, None, None, None).shape == (B, L, D)
        assert model(x[:, :5], t, _image(0), None, sc[:, :5]).shape == (B, 5, D)  # shorter sequences work


@pytest.mark.parametrize("use_pooled, grid_pool", [(True, 0), (False, 2), (True, 1), (False, 4)])
def test_prefix_variants(use_pooled: bool, grid_pool: int, inputs) -> None:
    shape = dataclasses.replace(SHAPE, use_pooled=use_pooled, grid_pool=grid_pool, self_condition=False,
                                timestep_embedding=False)
    net = Denoiser(shape).eval()
    assert shape.prefix_length == int(use_pooled) + grid_pool**2
    x, t, _ = inputs
    with torch.no_grad():
        assert net(x, t, _image(0)).shape == (B, L, D)
        assert net.image_prefix(_image(0), None, B).shape == (B, shape.prefix_length, 32)


@pytest.mark.parametrize("use_pooled", [True, False])
def test_cross_attention_mode_reads_the_full_grid(use_pooled: bool, inputs) -> None:
    shape = dataclasses.replace(SHAPE, grid_mode="cross", grid_pool=4, use_pooled=use_pooled)
    assert shape.prefix_length == int(use_pooled) and shape.memory_length == 16
    net = _model(shape)
    x, t, sc = inputs
    image = _image(0)
    with torch.no_grad():
        out = net(x, t, image, None, sc)
        assert out.shape == (B, L, D)
        # every one of the 16 cells is read: changing one cell changes the prediction
        changed = ImageFeatures(image.pooled, image.grid.clone())
        changed.grid[:, 15] += 1.0
        assert not torch.allclose(net(x, t, changed, None, sc), out)
        # a dropped image (keep=False) is the unconditional prediction, whatever the image
        drop = torch.zeros(B, dtype=torch.bool)
        torch.testing.assert_close(net(x, t, image, drop, sc), net(x, t, None, None, sc))


def test_add_mode_adds_the_pooled_vector_to_every_position(inputs) -> None:
    shape = dataclasses.replace(SHAPE, pooled_mode="add")
    assert shape.prefix_length == SHAPE.prefix_length - 1  # the pooled vector is no longer a position
    net = _model(shape)
    x, t, sc = inputs
    image = _image(0)
    with torch.no_grad():
        out = net(x, t, image, None, sc)
        other = ImageFeatures(image.pooled + 1.0, image.grid)
        assert not torch.allclose(net(x, t, other, None, sc), out)  # the pooled vector still matters
        drop = torch.zeros(B, dtype=torch.bool)
        torch.testing.assert_close(net(x, t, image, drop, sc), net(x, t, None, None, sc))


@pytest.mark.parametrize("variant", [{}, {"grid_mode": "cross", "grid_pool": 4}, {"pooled_mode": "add"}])
def test_a_precomputed_condition_gives_the_same_prediction(variant: dict, inputs) -> None:
    """Sampling computes the image's prefix and cross-attention keys/values once; that must change nothing."""
    net = _model(dataclasses.replace(SHAPE, **variant))
    x, t, sc = inputs
    keep = torch.tensor([True, False, True, False])
    with torch.no_grad():
        cond = net.condition(_image(0), keep, B)
        torch.testing.assert_close(net(x, t, self_cond=sc, cond=cond), net(x, t, _image(0), keep, sc))
        torch.testing.assert_close(net(x, t, self_cond=sc, cond=net.condition(None, None, B)), net(x, t, None, None, sc))


def test_cross_attention_starts_as_the_text_only_network(inputs) -> None:
    """Fresh cross-attention outputs are zero, so blocks loaded from a backbone start unchanged."""
    shape = dataclasses.replace(SHAPE, grid_mode="cross", use_pooled=False)
    torch.manual_seed(0)
    net = Denoiser(shape).eval()
    x, t, sc = inputs
    with torch.no_grad():
        torch.testing.assert_close(net(x, t, _image(0), None, sc), net(x, t, _image(1), None, sc))


def test_eval_mode_is_deterministic(model, inputs) -> None:
    x, t, sc = inputs
    with torch.no_grad():
        a, b = model(x, t, _image(0), None, sc), model(x, t, _image(0), None, sc)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_train_mode_uses_dropout(inputs) -> None:
    net = _model().train()
    x, t, sc = inputs
    with torch.no_grad():
        a, b = net(x, t, _image(0), None, sc), net(x, t, _image(0), None, sc)
    assert not torch.allclose(a, b)


def test_inputs_matter(model, inputs) -> None:
    x, t, sc = inputs
    with torch.no_grad():
        base = model(x, t, _image(0), None, sc)
        assert not torch.allclose(base, model(x, t, _image(0), None, None), atol=1e-4)  # self-conditioning
        assert not torch.allclose(base, model(x, t.flip(0), _image(0), None, sc), atol=1e-4)  # timestep
        assert not torch.allclose(base, model(x + 0.5, t, _image(0), None, sc), atol=1e-4)  # x_t


def test_rows_are_independent(model, inputs) -> None:
    x, t, sc = inputs
    with torch.no_grad():
        whole = model(x, t, _image(0), None, sc)
        img = _image(0)
        one = model(x[1:2], t[1:2], ImageFeatures(img.pooled[1:2], img.grid[1:2]), None, sc[1:2])
    torch.testing.assert_close(whole[1:2], one, rtol=1e-5, atol=1e-5)


def test_dropped_rows_equal_null_condition(model, inputs) -> None:
    x, t, sc = inputs
    keep = torch.tensor([True, False, True, False])
    with torch.no_grad():
        mixed = model(x, t, _image(0), keep, sc)
        null = model(x, t, None, None, sc)
        cond = model(x, t, _image(0), None, sc)
    torch.testing.assert_close(mixed[~keep], null[~keep], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mixed[keep], cond[keep], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(cond, null, atol=1e-4)
    all_kept = model(x, t, _image(0), torch.ones(B, dtype=torch.bool), sc)
    torch.testing.assert_close(all_kept, cond, rtol=0, atol=1e-6)


def test_image_change_affects_only_kept_rows(model, inputs) -> None:
    x, t, sc = inputs
    keep = torch.tensor([True, False, False, True])
    with torch.no_grad():
        a = model(x, t, _image(0), keep, sc)
        b = model(x, t, _image(1), keep, sc)
    diff = (a - b).abs().amax(dim=(1, 2))
    assert bool(torch.all(diff[keep] > 1e-4)), diff
    assert bool(torch.all(diff[~keep] < 1e-6)), diff


def test_timestep_embedding() -> None:
    t = torch.tensor([0, 1, 999])
    emb = timestep_embedding(t, 33)
    assert emb.shape == (3, 33)
    torch.testing.assert_close(emb[0, :16], torch.ones(16))  # cos(0)
    torch.testing.assert_close(emb[0, 16:32], torch.zeros(16))  # sin(0)
    assert float(emb[:, 32].abs().max()) == 0.0  # odd width padded with zeros
    assert not torch.allclose(emb[1], emb[2])


# -- backbone initialisation --------------------------------------------------------------------------------

BERT_NAMES = {
    "query": "attention.self.query", "key": "attention.self.key", "value": "attention.self.value",
    "attn_out": "attention.output.dense", "attn_norm": "attention.output.LayerNorm",
    "ff_in": "intermediate.dense", "ff_out": "output.dense", "ff_norm": "output.LayerNorm",
}
DISTIL_NAMES = {
    "query": "attention.q_lin", "key": "attention.k_lin", "value": "attention.v_lin",
    "attn_out": "attention.out_lin", "attn_norm": "sa_layer_norm",
    "ff_in": "ffn.lin1", "ff_out": "ffn.lin2", "ff_norm": "output_layer_norm",
}


@pytest.mark.parametrize("kind", ["bert", "distilbert"])
@pytest.mark.parametrize("layers", [1, 2])
def test_load_backbone_copies_weights(kind: str, layers: int) -> None:
    backbone = _bert() if kind == "bert" else _distilbert()
    state = backbone.state_dict()
    net = Denoiser(dataclasses.replace(SHAPE, layers=layers))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    net.load_backbone(state)
    mine = net.state_dict()
    prefix, names = ("encoder.layer", BERT_NAMES) if kind == "bert" else ("transformer.layer", DISTIL_NAMES)
    for i in range(layers):
        for ours, theirs in names.items():
            for p in ("weight", "bias"):
                torch.testing.assert_close(mine[f"blocks.{i}.{ours}.{p}"], state[f"{prefix}.{i}.{theirs}.{p}"],
                                           rtol=0, atol=0)
    torch.testing.assert_close(mine["positions.weight"], state["embeddings.position_embeddings.weight"][:L],
                               rtol=0, atol=0)
    torch.testing.assert_close(mine["embed_norm.weight"], state["embeddings.LayerNorm.weight"], rtol=0, atol=0)
    torch.testing.assert_close(mine["embed_norm.bias"], state["embeddings.LayerNorm.bias"], rtol=0, atol=0)
    if kind == "bert":
        torch.testing.assert_close(mine["types.weight"], state["embeddings.token_type_embeddings.weight"],
                                   rtol=0, atol=0)
    else:  # DistilBERT has no token types: ours stay as initialised
        torch.testing.assert_close(mine["types.weight"], before["types.weight"], rtol=0, atol=0)
    # nothing the backbone lacks was touched
    for name in ("in_proj.weight", "out_proj.weight", "prefix_positions", "null_prefix", "time_mlp.0.weight"):
        torch.testing.assert_close(mine[name], before[name], rtol=0, atol=0)
    mapping = backbone_key_map(state, layers)
    assert len(mapping) == layers * 16 + (4 if kind == "bert" else 3)
    assert set(mapping.values()) <= set(state)


@pytest.mark.parametrize("kind", ["bert", "distilbert"])
def test_loaded_block_computes_the_backbone_layer(kind: str) -> None:
    """The weights land in the right roles: our Block reproduces the backbone's own layer."""
    backbone = _bert() if kind == "bert" else _distilbert()
    net = Denoiser(SHAPE).eval()
    net.load_backbone(backbone.state_dict())
    layers = backbone.encoder.layer if kind == "bert" else backbone.transformer.layer
    h = torch.randn(2, 7, 32, generator=_gen(5))
    with torch.no_grad():
        for i in range(2):
            theirs = layers[i](h)
            theirs = theirs[0] if isinstance(theirs, tuple) else theirs
            torch.testing.assert_close(net.blocks[i](h), theirs, rtol=1e-4, atol=1e-5)


def test_load_backbone_inverts_latent_standardisation() -> None:
    """With latent width == hidden width, in_proj maps a standardised latent back to the raw embedding."""
    shape = dataclasses.replace(SHAPE, latent_dim=32)
    net = Denoiser(shape).eval()
    bert = _bert()
    raw = bert.get_input_embeddings().weight.detach()
    mean, std, scale = raw.mean(0), raw.std(0), 0.25
    net.load_backbone(bert.state_dict(), mean, std, scale)
    latents = ((raw - mean) / std * scale)[:5].unsqueeze(0)  # (1, 5, 32)
    with torch.no_grad():
        back = net.in_proj(torch.cat([latents, torch.zeros_like(latents)], dim=-1))
    torch.testing.assert_close(back[0], raw[:5], rtol=1e-4, atol=1e-5)


def test_too_many_layers() -> None:
    for backbone in (_bert(), _distilbert()):
        with pytest.raises(ValueError, match="only 2 layers"):
            backbone_key_map(backbone.state_dict(), 3)
        with pytest.raises(ValueError, match="only 2 layers"):
            Denoiser(dataclasses.replace(SHAPE, layers=3)).load_backbone(backbone.state_dict())


def test_unrecognised_backbone() -> None:
    with pytest.raises(ValueError, match="unrecognised backbone"):
        backbone_key_map({"foo.weight": torch.zeros(1)}, 1)


def test_mismatched_width() -> None:
    net = Denoiser(dataclasses.replace(SHAPE, hidden=16, heads=4, intermediate=20))
    with pytest.raises(ValueError, match="shape"):
        net.load_backbone(_bert().state_dict())


# -- classifier-free guidance -------------------------------------------------------------------------------


def test_guidance_zero_is_plain_conditioning(model, inputs) -> None:
    x, t, sc = inputs
    image = _image(0)
    fn = conditioned(model, image, 0.0)
    with torch.no_grad():
        torch.testing.assert_close(fn(x, t, sc), model(x, t, image, None, sc), rtol=0, atol=0)
        torch.testing.assert_close(fn(x, t, None), model(x, t, image, None, None), rtol=0, atol=0)


def test_guidance_without_image_is_unconditional(model, inputs) -> None:
    x, t, sc = inputs
    with torch.no_grad():
        torch.testing.assert_close(conditioned(model, None, 3.0)(x, t, sc), model(x, t, None, None, sc),
                                   rtol=0, atol=0)


@pytest.mark.parametrize("w", [1.0, 2.5])
def test_guidance_formula(model, inputs, w: float) -> None:
    x, t, sc = inputs
    image = _image(0)
    with torch.no_grad():
        cond = model(x, t, image, None, sc)
        uncond = model(x, t, None, None, sc)
        guided = conditioned(model, image, w)(x, t, sc)
        guided_no_sc = conditioned(model, image, w)(x, t, None)
        cond0, uncond0 = model(x, t, image, None, None), model(x, t, None, None, None)
    torch.testing.assert_close(guided, (1 + w) * cond - w * uncond, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(guided_no_sc, (1 + w) * cond0 - w * uncond0, rtol=1e-4, atol=1e-5)
    if w == 1.0:
        torch.testing.assert_close(guided, 2 * cond - uncond, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(guided, cond, atol=1e-4)


def test_pre_norm_denoiser_has_a_final_norm_and_learns_from_random_init() -> None:
    shape = DenoiserShape(latent_dim=8, pooled_dim=5, grid_dim=7, hidden=32, heads=4, intermediate=64, layers=2,
                          max_length=6, use_pooled=True, grid_pool=2, timestep_embedding=True, self_condition=False,
                          dropout=0.0, pre_norm=True)
    torch.manual_seed(0)
    net = Denoiser(shape)
    assert net.final_norm is not None and all(block.pre_norm for block in net.blocks)
    image = ImageFeatures(torch.randn(4, 5), torch.randn(4, 9, 7))
    x, t, target = torch.randn(4, 6, 8), torch.randint(0, 100, (4,)), torch.randn(4, 6, 8)
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
    first = None
    for _ in range(60):
        loss = torch.nn.functional.mse_loss(net(x, t, image), target)
        first = loss.item() if first is None else first
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.2 * first
