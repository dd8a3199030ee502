"""Typed run configuration: one dataclass per component, YAML recipes and dotted overrides on top.

Defaults are defined once, here. A recipe (``configs/*.yaml``) and command-line overrides such as
``optim.lr=0.3`` only override them. Keys are checked against the dataclasses here (so an error names
the key and lists the valid ones); OmegaConf's structured configs do the merging and type conversion.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from twinview.augment.config import AugmentConfig, fill_recipe
from twinview.evaluate.config import EvalConfig
from twinview.pretrain.objectives import registry
from twinview.pretrain.validate import ConfigError, validate


@dataclass
class DataConfig:
    """Where the training images are and how the CPU side prepares them.

    Attributes:
        path: An image folder (walked recursively), a ``.txt``/``.csv`` file list (``path[,label]``
            per line), a Hugging Face source (``hf:owner/name``, ``hf:imagefolder:/dir``, a
            ``save_to_disk`` folder, ``.parquet``/``.arrow`` files), WebDataset tar shards
            (``/data/train-{000000..000999}.tar`` or a glob; always streamed) or ``builtin:digits``.
            Required: empty is an error.
        image_size: Side of the square uint8 images the loader returns (shorter side resized,
            then centre-cropped). Augmentation crops are made from these. ``auto``: from a sample
            of the images, their median shorter side rounded down to a multiple of 32 within
            32-224 px (:func:`twinview.pretrain.data.survey.auto_image_size`); the run prints the
            size chosen and why, and stores it in config.yaml. An explicit size always wins.
        num_workers: DataLoader worker processes that decode and resize.
        samples_per_class: K of the P x K batches of the supervised objectives (P =
            train.batch_size / K classes per batch).
        strict: Stop at the first file that cannot be decoded, instead of skipping it (skipped
            files are listed with their reason in RUN_DIR/skipped_files.txt).
        cache: ``none`` (decode every epoch), ``disk`` (decode once into a memory-mapped uint8
            array under the cache directory, reused across runs) or ``device`` (that array held on
            the training device; batches are indexed there, with no DataLoader workers).
        decode: Where JPEGs are decoded: ``cpu`` (in the DataLoader workers) or ``gpu`` (the
            workers read file bytes and the batch's JPEGs are decoded on the device with nvJPEG;
            other formats, and what nvJPEG rejects, on the CPU). ``gpu`` needs a CUDA device, an
            image folder or file list, and ``data.cache=none``.
        split: Split of a Hugging Face source (``hf:owner/name``, a ``save_to_disk`` folder, ...).
        image_column: Its image column; empty: the one ``datasets.Image`` feature.
        label_column: Its label column; empty: the one ``ClassLabel`` feature, if any.
        streaming: Stream a Hugging Face source (needs ``train.max_steps_per_epoch``).
    """

    path: str = ""
    image_size: int | str = "auto"
    num_workers: int = 2
    samples_per_class: int = 4
    strict: bool = False
    cache: str = "none"
    decode: str = "cpu"
    split: str = "train"
    image_column: str = ""
    label_column: str = ""
    streaming: bool = False

    @property
    def size(self) -> int:
        """``image_size`` in pixels, once ``auto`` has been resolved at the start of a run."""
        if not isinstance(self.image_size, int):
            raise ValueError(f"data.image_size={self.image_size} has not been resolved to pixels yet.")
        return self.image_size


@dataclass
class ModelConfig:
    """Backbone and projection head.

    Attributes:
        backbone: Any ``timm`` model name; created with ``num_classes=0`` (pooled features).
        kwargs: Extra keyword arguments for ``timm.create_model``, e.g. a ViT at 32 px:
            ``model.kwargs.img_size=32 model.kwargs.patch_size=4``. Exported with the weights.
        cifar_stem: For ResNets on small images: 3x3 stride-1 first conv and no max-pool.
        proj_hidden_dim: Hidden width of the MLP projection head.
        proj_dim: Output width of the projection head (the space the loss sees).
        proj_layers: Number of linear layers in the head (>= 1).
        proj_output_bn: End the head with a batch norm without affine parameters (SimSiam's projector).
        predictor_hidden_dim: Hidden width of the predictor MLP (built for the objectives that have
            one: MoCo v3, BYOL, SimSiam).
    """

    backbone: str = "resnet18"
    kwargs: dict[str, Any] = field(default_factory=dict)
    cifar_stem: bool = False
    proj_hidden_dim: int = 512
    proj_dim: int = 128
    proj_layers: int = 2
    proj_output_bn: bool = False
    predictor_hidden_dim: int = 512


@dataclass
class ObjectiveConfig:
    """The training objective: ``name`` picks an entry of the objective registry
    (``twinview.pretrain.objectives.registry``), and each registered objective has its own
    section, e.g. ``objective.moco_v2.queue_size=8192`` or ``objective.triplet.mining=semi_hard``.
    Only the chosen objective's section is used. The flat keys of earlier versions
    (``objective.temperature``, ``objective.queue_size``, ...) still work, with a warning naming
    the new key.

    Attributes:
        name: ``simclr``, ``moco_v2``, ``moco_v3``, ``byol``, ``simsiam``, ``barlow_twins``,
            ``vicreg``, ``dino`` (self-supervised) or ``supcon``, ``triplet``, ``contrastive``
            (supervised metric learning on a class-labelled folder), or an objective of a plugin.
        plugins: Modules (or ``.py`` files) that register objectives of their own, imported before
            the rest of the config is read (``twinview pretrain --plugin MODULE``). Saved with the
            run, so resume, evaluate, embed and export import them again.
    """

    name: str = "simclr"
    plugins: list[str] = field(default_factory=list)


def _objective_sections() -> ObjectiveConfig:
    """An ObjectiveConfig with one section per registered objective, each at its defaults."""
    key = tuple((o.name, o.config) for o in registry.objectives().values())
    if key not in _SECTIONED:
        fields = [(name, cls, field(default_factory=cls)) for name, cls in key]
        _SECTIONED[key] = dataclasses.make_dataclass("ObjectiveConfig", fields, bases=(ObjectiveConfig,))
    sections: ObjectiveConfig = _SECTIONED[key]()
    return sections


_SECTIONED: dict[tuple[tuple[str, type], ...], type] = {}


def objective_section(cfg: Config) -> Any:
    """The config section of the chosen objective, ``objective.<objective.name>``."""
    return getattr(cfg.objective, cfg.objective.name)


@dataclass
class OptimConfig:
    """Optimiser and per-step learning-rate schedule (timm's optimiser factory and cosine scheduler).

    Attributes:
        name: Any optimiser timm's ``create_optimizer_v2`` knows (``sgd``, ``lars``, ``adamw``, ...).
        lr: Peak learning rate, reached at the end of warm-up.
        momentum: Momentum for SGD-like optimisers.
        weight_decay: Decoupled from norms and biases, which get none.
        warmup_epochs: Linear warm-up length, in epochs (fractions allowed).
        min_lr: Final learning rate of the cosine decay.
        lr_scaling: ``none``, ``linear`` (lr x global batch / base_batch_size, Goyal et al. 2017) or
            ``sqrt`` (lr x sqrt(global batch / base_batch_size), SimCLR's choice for LARS); the
            resulting peak lr is logged.
        base_batch_size: The global batch ``lr`` refers to when scaling.
        clip_grad_norm: Clip the global gradient norm to this value before each step (0: off).
    """

    name: str = "sgd"
    lr: float = 0.5
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: float = 1.0
    min_lr: float = 0.0
    lr_scaling: str = "none"
    base_batch_size: int = 256
    clip_grad_norm: float = 0.0


@dataclass
class TrainConfig:
    """The training loop.

    Attributes:
        epochs: Number of passes over the data.
        batch_size: Images per process per forward pass (each gives two views). The global batch
            of an optimiser step is batch_size x processes x grad_accumulation.
        mixed_precision: ``no``, ``fp16``, ``bf16`` (also on CPU) or ``auto``: bf16 where the device
            computes it natively (CUDA compute capability >= 8.0; a CPU with AVX512-BF16 or AMX),
            fp16 on older CUDA GPUs, else no. The choice and why are printed at the start and
            stored in config.yaml.
        cpu: Train on the CPU even where an accelerator is present.
        seed: Seed for weights, data order and augmentation.
        output_dir: Parent directory of run directories.
        run_name: Run directory name; empty means a timestamp.
        resume: ``auto``: the run directory ``output_dir/run_name`` continues from its newest
            checkpoint when it has one and starts otherwise, so the same command serves the first
            start and every restart (torchrun's ``--max-restarts``, a requeued SLURM job). Needs
            ``run_name``; a directory holding a run of other settings is refused, naming them.
            ``no``: always a new run (``twinview pretrain --resume RUN_DIR`` continues a given one).
        checkpoint_every: Save a resumable checkpoint every N epochs (the last epoch always).
        keep_checkpoints: How many of the newest checkpoints are kept (older ones are deleted).
        log_every: Log loss, lr and throughput every N steps (the only host syncs of the loop).
        channels_last: Use channels-last memory format for convolutional backbones.
        compile: Compile backbone + head (+ predictor) with ``torch.compile``, in place: the
            parameters and state-dict keys stay the same, so checkpoints, resume and the export
            are unchanged. The first steps pay the compile time (docs/BENCHMARKS.md says when it
            pays off).
        max_steps_per_epoch: Cap on steps per epoch (0 = no cap), for smoke tests.
        log_with: Also log to an Accelerate tracker: ``tensorboard`` (event files in
            RUN_DIR/tensorboard) or ``wandb`` (when installed); metrics.jsonl is always written.
        grad_accumulation: Forward/backward passes per optimiser step.
        grad_accumulation_mode: ``cached``: the loss sees all passes of a step at once, as one
            big batch would (GradCache; one extra forward per pass). ``independent``: each pass
            has its own loss, so in-batch negatives, positives and mined triplets come from one
            pass. See docs/TRAINING.md.
        max_nonfinite_steps: A step whose loss or gradient is NaN/inf is skipped (weights,
            optimiser and MoCo state unchanged) and counted; after this many in a row training
            stops. 0 turns the check off.
        nonfinite_check: How a skip is applied: ``sync`` reads the flag on the host each step,
            ``device`` never does (keeps a copy of the weights and optimiser state to restore),
            ``auto`` is sync on a CPU, where it is free, and device elsewhere.
    """

    epochs: int = 10
    batch_size: int = 256
    mixed_precision: str = "no"
    cpu: bool = False
    seed: int = 0
    output_dir: str = "runs"
    run_name: str = ""
    resume: str = "no"
    checkpoint_every: int = 1
    keep_checkpoints: int = 2
    log_every: int = 10
    channels_last: bool = True
    compile: bool = False
    max_steps_per_epoch: int = 0
    log_with: str = "none"
    grad_accumulation: int = 1
    grad_accumulation_mode: str = "cached"
    max_nonfinite_steps: int = 10
    nonfinite_check: str = "auto"


@dataclass
class Config:
    """A whole run: one section per component."""

    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=_objective_sections)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def _section_class(f: dataclasses.Field[Any]) -> type | None:
    """The dataclass of a section field (``objective``'s is made from the objective registry)."""
    factory = f.default_factory
    if dataclasses.is_dataclass(factory):
        return factory
    if callable(factory):
        made = factory()
        if dataclasses.is_dataclass(made):
            return type(made)
    return None


def _check_keys(tree: Any, cls: type, prefix: str, source: str) -> None:
    """Raises ConfigError for the first key in ``tree`` that ``cls`` (a config dataclass) lacks.

    Args:
        tree: The plain nested mapping read from a recipe or an override.
        cls: The dataclass the mapping must fit.
        prefix: Dotted path of ``cls`` within Config (``""`` for the root).
        source: Where the mapping came from, for the message.
    """
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if not isinstance(tree, dict):
        example = next(iter(fields))
        raise ConfigError(
            f"{source}: '{prefix[:-1]}' is a section, not a value; set its keys, "
            f"e.g. {prefix}{example}=... Valid keys: {', '.join(prefix + k for k in fields)}."
        )
    for key, value in tree.items():
        if key not in fields:
            near = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" Did you mean '{prefix}{near[0]}'?" if near else ""
            where = f" in {prefix[:-1]}" if prefix else ""
            raise ConfigError(
                f"{source}: unknown config key '{prefix}{key}'.{hint} "
                f"Valid keys{where}: {', '.join(prefix + k for k in fields)}."
            )
        sub = _section_class(fields[key])
        if sub is not None:
            _check_keys(value, sub, f"{prefix}{key}.", source)
        elif isinstance(value, bool) and fields[key].type in ("str", str):
            # YAML reads an unquoted no/off/false as a boolean; for a text key such as
            # train.mixed_precision=no the word was meant
            tree[key] = "yes" if value else "no"


def _explain(err: OmegaConfBaseException, source: str) -> ConfigError:
    """Turns an OmegaConf type error into a ConfigError naming the key and the expected type."""
    full_key = str(getattr(err, "full_key", "") or "")
    msg = str(getattr(err, "msg", "") or err).splitlines()[0].rstrip(".")
    expected = ""
    cls: Any = Config
    try:
        for name in full_key.split("."):
            ftype = {f.name: f for f in dataclasses.fields(cls)}[name]
            cls = _section_class(ftype)
        expected = f" Expected {ftype.type}."
    except (KeyError, TypeError, UnboundLocalError):
        pass
    return ConfigError(f"{source}: invalid value for '{full_key}': {msg}.{expected}")


def recipe_path(name_or_path: str | Path) -> Path:
    """Resolves a recipe: an existing YAML path, or the name of a recipe shipped in twinview.configs.

    Args:
        name_or_path: ``configs/demo.yaml``, ``/abs/recipe.yaml`` or a shipped name like ``demo``.

    Returns:
        The path of the YAML file.

    Raises:
        ConfigError: If neither a file nor a shipped recipe of that name exists.
    """
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = resources.files("twinview.configs")
    stem = path.name[: -len(".yaml")] if path.name.endswith(".yaml") else path.name
    candidate = shipped / f"{stem}.yaml"
    if candidate.is_file():
        return Path(str(candidate))
    raise ConfigError(
        f"no recipe file '{name_or_path}' and no shipped recipe '{stem}'. Shipped: {', '.join(shipped_recipes())}."
    )


def shipped_recipes() -> list[str]:
    """The names of the recipes shipped in twinview.configs, sorted."""
    return sorted(
        p.name[: -len(".yaml")] for p in resources.files("twinview.configs").iterdir() if p.name.endswith(".yaml")
    )


def _migrate_flat_objective_keys(tree: Any, source: str) -> Any:
    """Moves the flat ``objective.KEY`` of earlier versions into every objective section that has
    KEY (``objective.temperature`` -> ``objective.simclr.temperature``, ``objective.moco_v2.temperature``,
    ...), which is what the flat key meant, and warns with the new names."""
    objective = tree.get("objective") if isinstance(tree, dict) else None
    if not isinstance(objective, dict):
        return tree
    moved: list[str] = []
    table = registry.objectives()
    for key in [k for k in objective if k not in ("name", "plugins") and k not in table]:
        owners = [o.name for o in table.values() if key in {f.name for f in dataclasses.fields(o.config)}]
        if not owners:
            continue  # an unknown key: the key check names the valid ones
        value = objective.pop(key)
        for owner in owners:
            section = objective.setdefault(owner, {})
            if isinstance(section, dict):
                section.setdefault(key, value)
        moved.append(f"objective.{key} -> " + ", ".join(f"objective.{o}.{key}" for o in owners))
    if moved:
        warnings.warn(
            f"{source}: flat objective keys are deprecated; each objective has its own section now: "
            + "; ".join(moved)
            + ".",
            FutureWarning,
            stacklevel=3,
        )
    return tree


def _merge(base: DictConfig, tree: Any, source: str) -> DictConfig:
    """Checks the keys of a recipe or override and merges it into ``base``."""
    tree = _migrate_flat_objective_keys(tree, source)
    _check_keys(tree, Config, "", source)
    try:
        merged = OmegaConf.merge(base, tree)
        assert isinstance(merged, DictConfig)
        return merged
    except OmegaConfBaseException as err:
        raise _explain(err, source) from None


def _load_plugins(trees: list[tuple[Any, str]]) -> None:
    """Imports the modules named by ``objective.plugins`` in a recipe or override (the last one
    that sets the key wins, as in the merge), so that their objectives are registered."""
    plugins: list[str] = []
    for tree, source in trees:
        objective = tree.get("objective") if isinstance(tree, dict) else None
        if isinstance(objective, dict) and "plugins" in objective:
            value = objective["plugins"]
            if isinstance(value, str):
                value = [value]
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ConfigError(f"{source}: objective.plugins must be a list of module names or .py paths.")
            # a file by its absolute path, so the run's later commands find it from any directory
            plugins = objective["plugins"] = [
                str(Path(v).expanduser().resolve()) if v.endswith(".py") else v for v in value
            ]
    try:
        registry.load_plugins(plugins)
    except registry.ObjectiveSettingError as err:
        raise ConfigError(str(err)) from None


def load_config(recipe: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Builds a Config from the defaults, an optional YAML recipe and dotted overrides.

    Args:
        recipe: A recipe path or shipped recipe name; ``None`` keeps the defaults.
        overrides: ``section.key=value`` strings, applied in order after the recipe.

    Returns:
        The resolved, type-checked Config.

    Raises:
        ConfigError: On an unknown key, a wrong type, a malformed override or a value that
            :func:`twinview.pretrain.validate.validate` refuses.
    """
    trees: list[tuple[Any, str]] = []
    if recipe is not None:
        path = recipe_path(recipe)
        trees.append((OmegaConf.to_container(OmegaConf.load(path)), str(path)))
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"override '{item}' is not of the form section.key=value (e.g. optim.lr=0.3).")
        trees.append((OmegaConf.to_container(OmegaConf.from_dotlist([item])), f"override '{item}'"))
    _load_plugins(trees)  # their objectives' sections belong to the config built next
    base: DictConfig = OmegaConf.structured(Config)
    for tree, source in trees:
        base = _merge(base, tree, source)
    cfg = OmegaConf.to_object(base)
    assert isinstance(cfg, Config)
    validate(cfg)  # before filling: an unknown augment.recipe is a ConfigError, not a KeyError
    fill_recipe(cfg.augment)
    return cfg


def to_yaml(cfg: Config) -> str:
    """Serialises a Config to YAML that :func:`load_config` reads back to an equal Config."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def save_config(cfg: Config, path: Path) -> None:
    """Writes the resolved config (every key, defaults included) to ``path``, atomically: a process
    killed while writing leaves the previous file (a resumed run rewrites it)."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(to_yaml(cfg))
    os.replace(partial, path)


def as_dict(cfg: Config) -> dict[str, Any]:
    """Returns the config as plain nested dicts (for trackers and JSON)."""
    return dataclasses.asdict(cfg)


__all__ = [
    "AugmentConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "EvalConfig",
    "ModelConfig",
    "ObjectiveConfig",
    "OptimConfig",
    "TrainConfig",
    "as_dict",
    "load_config",
    "objective_section",
    "recipe_path",
    "save_config",
    "shipped_recipes",
    "to_yaml",
]
