"""Config: defaults, recipes, dotted overrides, and errors that name the key and the valid ones."""

from __future__ import annotations

from pathlib import Path

import pytest

from twinview.pretrain.config import Config, ConfigError, load_config, recipe_path, save_config, shipped_recipes


def test_defaults_are_the_dataclass_defaults() -> None:
    cfg = load_config(None, ["data.path=/x"])
    assert cfg.optim == Config().optim and cfg.model == Config().model
    assert cfg.data.path == "/x"


def test_recipe_overrides_and_dotted_overrides_apply_in_order() -> None:
    cfg = load_config("simclr-cifar10", ["data.path=/imgs", "optim.lr=0.3", "augment.crop_scale=[0.2,1.0]"])
    assert cfg.optim.lr == 0.3
    assert cfg.augment.crop_scale == (0.2, 1.0)
    assert cfg.augment.jitter_strength == 0.5  # from the recipe
    assert cfg.train.seed == Config().train.seed  # untouched default
    assert isinstance(cfg.train.epochs, int)


def test_shipped_recipes_resolve_by_name_and_path() -> None:
    assert {"demo", "simclr-cifar10", "simclr-photos", "simclr-imagenet", "moco-v3-vit-small"} <= set(shipped_recipes())
    assert recipe_path("demo").name == "demo.yaml"
    assert recipe_path("configs/simclr-cifar10.yaml").name == "simclr-cifar10.yaml"
    with pytest.raises(ConfigError, match="Shipped: " + ", ".join(shipped_recipes())):
        recipe_path("nope")


def test_every_shipped_recipe_loads() -> None:
    for name in shipped_recipes():  # and takes an optimiser step: tests/test_structure.py
        assert load_config(name, ["data.path=/imgs"]).data.path == "/imgs"


def test_an_unquoted_no_stays_a_word_for_text_keys(tmp_path: Path) -> None:
    assert load_config(None, ["data.path=/imgs", "train.mixed_precision=no"]).train.mixed_precision == "no"
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  mixed_precision: no\n  channels_last: no\n")
    cfg = load_config(recipe, ["data.path=/imgs"])
    assert cfg.train.mixed_precision == "no" and cfg.train.channels_last is False


def test_model_kwargs_take_dotted_timm_arguments() -> None:
    cfg = load_config(None, ["data.path=/imgs", "model.kwargs.img_size=32", "model.kwargs.patch_size=4"])
    assert cfg.model.kwargs == {"img_size": 32, "patch_size": 4}


def test_unknown_key_names_the_key_and_the_valid_ones() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, ["optim.lrr=0.3"])
    msg = str(err.value)
    assert "'optim.lrr'" in msg and "Did you mean 'optim.lr'" in msg
    assert "optim.weight_decay" in msg and "optim.warmup_epochs" in msg


def test_unknown_section_lists_sections() -> None:
    with pytest.raises(ConfigError, match=r"'optimm'.*Valid keys: data, augment, model, objective, optim, train, eval"):
        load_config(None, ["optimm.lr=1"])


def test_unknown_key_in_a_recipe_file_names_the_file(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  epoch: 3\n")
    with pytest.raises(ConfigError, match=r"r.yaml: unknown config key 'train.epoch'. Did you mean 'train.epochs'"):
        load_config(recipe)


@pytest.mark.parametrize(
    "override,fragment",
    [
        ("optim.lr=abc", "'optim.lr'.*Expected float"),
        ("train.epochs=1.5", "'train.epochs'.*Expected int"),
        ("model.cifar_stem=maybe", "'model.cifar_stem'.*Expected bool"),
        ("data=3", "'data' is a section"),
        ("train.mixed_precision=fp8", "Valid values: no, fp16, bf16"),
        ("lr", "not of the form section.key=value"),
        ("augment.progressive_min=4", r"augment.progressive_min=4 must be 0 \(off\) or a side in pixels >= 8"),
        ("augment.progressive_ramp=[0.9,0.5]", r"augment.progressive_ramp=\[0.9, 0.5\].*0 <= start <= end <= 1"),
        ("augment.progressive_multiple=0", "augment.progressive_multiple=0 must be >= 1"),
    ],
)
def test_wrong_values_are_named(override: str, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        load_config(None, ["data.path=/x", override])


def test_progressive_resolution_must_start_below_the_full_view_side() -> None:
    with pytest.raises(ConfigError, match=r"progressive_min=64 must be below the global views' full side, 64 px"):
        load_config("moco-v2-photos", ["data.path=/x", "augment.progressive_min=64"])
    load_config("moco-v2-photos", ["data.path=/x", "augment.progressive_min=40"])


def test_missing_data_path_is_an_error() -> None:
    with pytest.raises(ConfigError, match=r"data.path is not set"):
        load_config("simclr-cifar10")


def test_saved_config_reads_back_equal(tmp_path: Path) -> None:
    cfg = load_config("demo", ["optim.lr=0.123", "augment.crop_scale=[0.5,0.9]"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg


@pytest.mark.parametrize("objective", ["byol", "simsiam", "barlow_twins", "vicreg"])
def test_multi_crop_is_refused_before_compute_where_the_paper_has_none(objective: str) -> None:
    from twinview.pretrain.validate import World, validate

    cfg = load_config(None, ["data.path=x", f"objective.name={objective}", "augment.local_crops=2"])
    world = World(processes=1, device_type="cpu", bf16_supported=True, device_name="cpu", bf16_native=False)
    with pytest.raises(ConfigError, match=rf"augment.local_crops=2: objective '{objective}'.*dino"):
        validate(cfg, world)
    validate(load_config(None, ["data.path=x", "objective.name=dino", "augment.local_crops=2"]), world)


@pytest.mark.parametrize(
    "override,message",
    [
        ("objective.dino.prototypes=1", "objective.dino.prototypes=1 must be at least 2"),
        ("objective.dino.teacher_temperature=0", "objective.dino.teacher_temperature=0.0 must be > 0"),
        ("objective.byol.momentum_schedule=linear", "objective.byol.momentum_schedule"),
    ],
)
def test_bad_settings_of_the_new_objectives_name_the_key(override: str, message: str) -> None:
    from twinview.pretrain.validate import World, validate

    name = override.split(".")[1]
    world = World(processes=1, device_type="cpu", bf16_supported=True, device_name="cpu", bf16_native=False)
    with pytest.raises(ConfigError, match=message):
        validate(load_config(None, ["data.path=x", f"objective.name={name}", override]), world)
