"""Tests for diffcap.config: presets, JSON round trip, typed dotted overrides and validation messages."""

from __future__ import annotations

import json

import pytest

from diffcap.config import PRESETS, Config, ConfigError, all_keys, load_config, validate


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_build_and_validate(name: str) -> None:
    config = load_config(name)
    assert isinstance(config, Config)
    validate(config)  # does not raise
    assert PRESETS[name]() == config


def test_tiny_preset_is_smaller_than_default() -> None:
    tiny, default = load_config("tiny"), load_config("default")
    assert tiny.model.layers < default.model.layers
    assert tiny.text.max_length < default.text.max_length
    assert tiny.sample.steps <= tiny.diffusion.timesteps


def test_autoregressive_preset_is_the_measured_reference_recipe() -> None:
    """The preset must stay the `ref` row of ABLATIONS.md: BASE + the reference recipe's overrides."""
    measured = ("model.kind=autoregressive model.grid_pool=7 train.max_minutes=20 train.eval_every=0 "
                "model.layers=4 model.norm=pre model.init_from_backbone=false loss.label_smoothing=0.1 "
                "train.ema_decay=0 train.warmup_steps=200").split()
    assert load_config("autoregressive") == load_config("default", measured)


def test_autoregressive_cider_preset_is_the_measured_fine_tuning() -> None:
    """The preset must stay the self-critical run of ABLATIONS.md: the autoregressive preset + its overrides."""
    measured = ("loss.objective=cider loss.cider_samples=5 loss.cider_temperature=0.5 train.lr=5e-5 "
                "train.warmup_steps=20 train.batch_size=16 train.max_minutes=15").split()
    assert load_config("autoregressive-cider") == load_config("autoregressive", measured)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_json_round_trip(name: str) -> None:
    config = load_config(name, ["train.lr=2.5e-4", "diffusion.schedule=sqrt", "data.root=/tmp/x"])
    assert Config.from_dict(config.to_dict()) == config
    assert Config.from_dict(json.loads(config.to_json())) == config
    # types survive the JSON trip (ints stay ints, floats floats)
    again = Config.from_dict(json.loads(config.to_json()))
    assert type(again.train.max_steps) is int and type(again.train.lr) is float


def test_from_dict_partial_keeps_defaults() -> None:
    config = Config.from_dict({"model": {"layers": 3}})
    assert config.model.layers == 3
    assert config.train == Config().train


def test_overrides_set_typed_values() -> None:
    config = load_config("default", ["train.lr=1e-4", "model.self_condition=false"])
    assert config.train.lr == pytest.approx(1e-4) and type(config.train.lr) is float
    assert config.model.self_condition is False
    config = load_config("default", ["model.layers=3", "train.max_minutes=5", "model.use_pooled=True",
                                     "data.root=some/dir", "sample.guidance=2"])
    assert config.model.layers == 3 and type(config.model.layers) is int
    assert config.train.max_minutes == 5.0 and type(config.train.max_minutes) is float  # int given to a float
    assert config.model.use_pooled is True
    assert config.data.root == "some/dir"
    assert config.sample.guidance == 2.0


def test_unknown_key_suggests_the_close_one() -> None:
    with pytest.raises(ConfigError, match=r"train\.lrr") as info:
        load_config("default", ["train.lrr=1"])
    assert "'train.lr'" in str(info.value)


def test_unknown_section_lists_keys() -> None:
    with pytest.raises(ConfigError, match="unknown config key"):
        load_config("default", ["zzzz.qqqq=1"])


def test_override_without_equals_sign() -> None:
    with pytest.raises(ConfigError, match="section.field=value"):
        load_config("default", ["train.lr"])


@pytest.mark.parametrize(
    "override, field",
    [
        ("model.layers=abc", "model.layers"),
        ("model.layers=1.5", "model.layers"),
        ("model.layers=true", "model.layers"),  # a bool is not an int
        ("model.self_condition=yes", "model.self_condition"),
        ("model.self_condition=1", "model.self_condition"),
        ("train.lr=fast", "train.lr"),
        ("train.lr=false", "train.lr"),
        ("data.root=3", "data.root"),
        ("model.layers=NaN", "model.layers"),
        ("model.layers=Infinity", "model.layers"),
    ],
)
def test_wrong_type_names_the_field(override: str, field: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config("default", [override])
    assert field in str(info.value)


@pytest.mark.parametrize(
    "override, field",
    [
        ("sample.steps=0", "sample.steps"),
        ("sample.steps=1001", "sample.steps"),
        ("diffusion.timesteps=1", "diffusion.timesteps"),
        ("text.max_length=1", "text.max_length"),
        ("text.latent_scale=0", "text.latent_scale"),
        ("model.dropout=1.0", "model.dropout"),
        ("sample.eta=1.5", "sample.eta"),
        ("sample.guidance=-1", "sample.guidance"),
        ("train.lr=0", "train.lr"),
        ("train.lr=NaN", "train.lr"),
        ("sample.time_difference=1000", "sample.time_difference"),
        ("train.max_bad_steps=0", "train.max_bad_steps"),
        ("train.save_every=0", "train.save_every"),
        ("train.log_every=0", "train.log_every"),
    ],
)
def test_impossible_values_name_the_field(override: str, field: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config("default", [override])
    assert str(info.value).startswith(field) or field in str(info.value)


def test_pooled_and_grid_cannot_both_be_off() -> None:
    with pytest.raises(ConfigError, match="model.use_pooled"):
        load_config("default", ["model.use_pooled=false", "model.grid_pool=0"])
    config = load_config("default", ["model.use_pooled=false"])  # the grid alone is fine
    assert config.model.grid_pool > 0


def test_literal_lists_allowed_values() -> None:
    with pytest.raises(ConfigError) as info:
        load_config("default", ["diffusion.schedule=quadratic"])
    message = str(info.value)
    assert "diffusion.schedule" in message and "quadratic" in message
    for allowed in ("cosine", "linear", "sqrt"):
        assert allowed in message


def test_cross_field_validation_in_from_dict() -> None:
    with pytest.raises(ConfigError, match="sample.steps"):
        Config.from_dict({"diffusion": {"timesteps": 10}, "sample": {"steps": 20}})


def test_json_file_with_preset_and_partial_section(tmp_path) -> None:
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"preset": "tiny", "train": {"lr": 0.02, "max_steps": 7}}), encoding="utf-8")
    config = load_config(str(path), ["model.layers=1"])
    tiny = load_config("tiny")
    assert config.train.lr == 0.02 and config.train.max_steps == 7
    assert config.model.layers == 1  # overrides come after the file
    assert config.text == tiny.text and config.sample == tiny.sample  # the rest comes from the preset
    assert config.train.batch_size == tiny.train.batch_size
    assert config.differences(tiny) == {"train.lr": 0.02, "train.max_steps": 7, "model.layers": 1}


def test_json_file_without_preset_uses_defaults(tmp_path) -> None:
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"model": {"layers": 4}}), encoding="utf-8")
    config = load_config(str(path))
    assert config.differences(Config()) == {"model.layers": 4}


def test_json_file_full_round_trip(tmp_path) -> None:
    config = load_config("tiny", ["diffusion.schedule=linear"])
    path = tmp_path / "full.json"
    path.write_text(config.to_json(), encoding="utf-8")
    assert load_config(str(path)) == config


@pytest.mark.parametrize(
    "content, match",
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "JSON object"),
        (json.dumps({"preset": "huge"}), "unknown preset"),
        (json.dumps({"train": {"lrr": 1}}), "train.lr"),
        (json.dumps({"model": {"layers": "two"}}), "model.layers"),
        (json.dumps({"train": 5}), "unknown config key"),
        (json.dumps({"preset": ["tiny"]}), "preset"),
    ],
)
def test_bad_json_file(tmp_path, content: str, match: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ConfigError, match=match):
        load_config(str(path))


def test_missing_file(tmp_path) -> None:
    with pytest.raises(ConfigError, match="neither a preset"):
        load_config(str(tmp_path / "nope.json"))


def test_differences() -> None:
    default, tiny = Config(), load_config("tiny")
    assert default.differences(Config()) == {}
    diff = tiny.differences(default)
    assert diff["text.max_length"] == 12 and diff["model.layers"] == 2 and diff["train.lr"] == 1e-3
    assert "diffusion.schedule" not in diff
    assert set(diff) <= set(all_keys())
    # symmetric in its keys, each side reporting its own values
    back = default.differences(tiny)
    assert set(back) == set(diff) and back["model.layers"] == default.model.layers


def test_all_keys_are_settable() -> None:
    keys = all_keys()
    assert "train.lr" in keys and "diffusion.schedule" in keys and len(keys) == len(set(keys))
    config = Config()
    for key in keys:  # setting every key to its own value is accepted
        section, name = key.split(".")
        Config.from_dict({section: {name: getattr(getattr(config, section), name)}})
