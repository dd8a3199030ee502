"""The objective registry: one table that names every training objective.

Each entry says which method class trains it, which config section it reads
(``objective.<name>.*``), whether it needs class labels (P x K batches) or a predictor, the paper
(written into the export's model card and config.json), what the model needs besides backbone and
head (a predictor, prototypes), whether the method keeps a momentum encoder or uses multi-crop,
and the checks its settings must pass. The config's ``objective.name`` choices, its
``objective.<name>`` sections, the CLI help, validation, the model every command builds for a run
(train, resume, evaluate, embed, search, export), ``create_method`` and the model card all read
this table; adding an objective adds one entry here (docs/ARCHITECTURE.md walks through it).

Objectives defined outside twinview join the table in one of two ways: a package that declares an
entry point in the ``twinview.objectives`` group (loaded on the first look at the table), or a
module named in ``objective.plugins`` (``--plugin`` on the command line), which the config loader
imports before it reads any other key and which is saved in the run's config.yaml, so that resume,
evaluate, embed and export import it again in their own processes. Either calls :func:`register`
(or the entry point names an :class:`Objective`).

This module imports no torch: reading a config loads it, and the method classes are imported only
when a run builds one (``method`` is a ``module:Class`` path).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class ObjectiveSettingError(ValueError):
    """An objective setting that cannot work with this run's batches (names the key)."""


@dataclass(frozen=True)
class BatchShape:
    """What an objective's checks may depend on besides its own section.

    Attributes:
        per_process: Images per process and forward pass (``train.batch_size``).
        processes: Number of processes.
        passes: Passes per optimiser step (``train.grad_accumulation``).
        cached: Whether the loss sees all passes at once (``train.grad_accumulation_mode=cached``).
    """

    per_process: int
    processes: int
    passes: int = 1
    cached: bool = True

    @property
    def global_batch(self) -> int:
        """Images of one pass over all processes."""
        return self.per_process * self.processes


# --- the config sections, one per objective: objective.<name>.* ---------------------------------


@dataclass
class SimCLRConfig:
    """``objective.simclr``: NT-Xent over two views.

    Attributes:
        temperature: Softmax temperature t of NT-Xent.
    """

    temperature: float = 0.2


@dataclass
class MoCoV2Config:
    """``objective.moco_v2``: momentum key encoder and a queue of negative keys.

    Attributes:
        temperature: Softmax temperature of InfoNCE.
        momentum: Key-encoder EMA momentum m: ``theta_k <- m theta_k + (1 - m) theta_q``.
        momentum_schedule: ``constant``, or ``cosine`` from ``momentum`` to 1 over the run.
        queue_size: Number of negative keys K; a multiple of the keys added per optimiser step.
        bn_splits: On one process, keys are encoded in this many groups with their own batch-norm
            statistics (split BN; 1 turns it off). Several processes use shuffle BN.
        symmetric: Also contrast the second view's query with the first view's key.
    """

    temperature: float = 0.2
    momentum: float = 0.99
    momentum_schedule: str = "constant"
    queue_size: int = 4096
    bn_splits: int = 8
    symmetric: bool = False


@dataclass
class MoCoV3Config:
    """``objective.moco_v3``: a predictor on the query branch, symmetric in-batch keys, no queue.

    Attributes:
        temperature: Softmax temperature of InfoNCE.
        momentum: Key-encoder EMA momentum m.
        momentum_schedule: ``constant``, or ``cosine`` from ``momentum`` to 1 over the run.
    """

    temperature: float = 0.2
    momentum: float = 0.99
    momentum_schedule: str = "constant"


@dataclass
class SupConConfig:
    """``objective.supcon``: supervised contrastive loss on class labels.

    Attributes:
        temperature: Softmax temperature.
    """

    temperature: float = 0.2


@dataclass
class TripletConfig:
    """``objective.triplet``: triplet margin loss with online mining (L2-normalised embeddings).

    Attributes:
        margin: Margin m of ``max(0, d(a, p) - d(a, n) + m)``.
        mining: ``batch_hard``, ``batch_all`` or ``semi_hard``.
    """

    margin: float = 0.5
    mining: str = "batch_hard"


@dataclass
class ContrastiveConfig:
    """``objective.contrastive``: the pairwise margin loss of Hadsell, Chopra and LeCun.

    Attributes:
        margin: Margin of the dissimilar pairs' hinge (L2-normalised embeddings).
    """

    margin: float = 0.5


@dataclass
class BYOLConfig:
    """``objective.byol``: a predictor on the online branch regresses the momentum target's projection.

    Attributes:
        momentum: Target EMA momentum tau: ``xi <- tau xi + (1 - tau) theta``.
        momentum_schedule: ``cosine`` from ``momentum`` to 1 over the run (the paper's), or ``constant``.
    """

    momentum: float = 0.996
    momentum_schedule: str = "cosine"


@dataclass
class SimSiamConfig:
    """``objective.simsiam``: a predictor and a stop-gradient, no momentum encoder and no negatives.

    SimSiam has no setting of its own: its architecture is the model section's (a 3-layer projector
    ending in batch norm, ``model.proj_output_bn=true``, and a bottleneck predictor in its recipes).
    """


@dataclass
class BarlowTwinsConfig:
    """``objective.barlow_twins``: the cross-correlation of the two views' embeddings pushed to identity.

    Attributes:
        lambd: Weight lambda of the off-diagonal (redundancy reduction) term.
    """

    lambd: float = 5e-3


@dataclass
class VICRegConfig:
    """``objective.vicreg``: invariance, variance and covariance terms.

    Attributes:
        sim_weight: Weight of the invariance (mean squared error) term.
        var_weight: Weight of the variance (hinge on the standard deviation) term.
        cov_weight: Weight of the covariance (off-diagonal) term.
    """

    sim_weight: float = 25.0
    var_weight: float = 25.0
    cov_weight: float = 1.0


@dataclass
class DINOConfig:
    """``objective.dino``: self-distillation with a momentum teacher, centring and sharpening.

    Attributes:
        prototypes: Output width K of the DINO head (its weight-normalised last layer).
        student_temperature: Temperature of the student's softmax.
        teacher_temperature: Temperature of the teacher's softmax after the warm-up.
        warmup_teacher_temperature: Teacher temperature at the start of training.
        warmup_teacher_epochs: Epochs of the linear warm-up from ``warmup_teacher_temperature`` to
            ``teacher_temperature``.
        center_momentum: EMA momentum of the centre subtracted from the teacher's outputs.
        momentum: Teacher EMA momentum.
        momentum_schedule: ``cosine`` from ``momentum`` to 1 over the run (the paper's), or ``constant``.
    """

    prototypes: int = 65536
    student_temperature: float = 0.1
    teacher_temperature: float = 0.04
    warmup_teacher_temperature: float = 0.04
    warmup_teacher_epochs: float = 0.0
    center_momentum: float = 0.9
    momentum: float = 0.996
    momentum_schedule: str = "cosine"


# --- the checks: a section and the batch shape in, an ObjectiveSettingError out ----------------

Check = Callable[[Any, BatchShape], None]


def _two_per_process(name: str) -> Check:
    def check(section: Any, shape: BatchShape) -> None:
        if shape.per_process < 2:
            raise ObjectiveSettingError(
                f"objective.name={name} needs at least 2 images per process and batch (train.batch_size="
                f"{shape.per_process}): batch-norm statistics of one image are degenerate."
            )

    return check


def _check_moco_v2(section: MoCoV2Config, shape: BatchShape) -> None:
    keys_per_step = shape.global_batch * shape.passes * (2 if section.symmetric else 1)
    if section.queue_size % keys_per_step:
        raise ObjectiveSettingError(
            f"objective.moco_v2.queue_size={section.queue_size} must be a multiple of the keys added per optimiser "
            f"step, {keys_per_step} (train.batch_size={shape.per_process} x {shape.processes} processes"
            f"{f' x {shape.passes} accumulated passes' if shape.passes > 1 else ''}"
            f"{' x 2 views (symmetric)' if section.symmetric else ''})."
        )
    if shape.processes == 1 and section.bn_splits > 1 and shape.per_process % section.bn_splits:
        raise ObjectiveSettingError(
            f"objective.moco_v2.bn_splits={section.bn_splits} must divide train.batch_size={shape.per_process}."
        )


def _check_dino(section: DINOConfig, shape: BatchShape) -> None:
    if section.prototypes < 2:
        raise ObjectiveSettingError(f"objective.dino.prototypes={section.prototypes} must be at least 2.")
    for key in ("student_temperature", "teacher_temperature", "warmup_teacher_temperature"):
        if getattr(section, key) <= 0:
            raise ObjectiveSettingError(f"objective.dino.{key}={getattr(section, key)} must be > 0.")
    if not 0 <= section.center_momentum < 1:
        raise ObjectiveSettingError(f"objective.dino.center_momentum={section.center_momentum} must be in [0, 1).")


# --- the table ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Objective:
    """One registry entry.

    Attributes:
        name: The value of ``objective.name``, and the name of its config section.
        method: ``module:Class`` of its :class:`~twinview.pretrain.objectives.methods.Method`,
            built as ``Class(section, online, seed)``.
        config: The dataclass of its section ``objective.<name>``.
        summary: One line for the CLI help and the README.
        paper: The paper it follows, for the model card and the export's config.json.
        supervised: Trains on class labels, from P x K class-balanced batches.
        predictor: The model gets a predictor MLP on top of the head (MoCo v3, BYOL, SimSiam).
        prototypes: The head ends in a weight-normalised layer with ``objective.<name>.prototypes``
            outputs (DINO).
        momentum: The method keeps a momentum (EMA) copy of backbone + head: MoCo's key encoder,
            BYOL's target, DINO's teacher (its section has ``momentum`` and ``momentum_schedule``).
        multi_crop: Its method uses multi-crop local views (``augment.local_crops``); the others
            refuse them.
        choices: Allowed values of string keys of the section.
        checks: Settings that cannot work with the run's batches, refused before any compute.
    """

    name: str
    method: str
    config: type
    summary: str
    paper: str
    supervised: bool = False
    predictor: bool = False
    prototypes: bool = False
    momentum: bool = False
    multi_crop: bool = False
    choices: tuple[tuple[str, tuple[str, ...]], ...] = ()
    checks: tuple[Check, ...] = ()

    def method_class(self) -> type:
        """Imports and returns the method class."""
        module, cls = self.method.split(":")
        method_class: type = getattr(importlib.import_module(module), cls)
        return method_class


_METHODS = "twinview.pretrain.objectives.methods"
_MOMENTUM = (("momentum_schedule", ("constant", "cosine")),)

OBJECTIVES: dict[str, Objective] = {
    o.name: o
    for o in (
        Objective(
            "simclr",
            f"{_METHODS}:SimCLR",
            SimCLRConfig,
            "NT-Xent over two views; negatives from every process, gathered with gradient",
            "Chen et al. 2020, A Simple Framework for Contrastive Learning of Visual Representations "
            "(arXiv:2002.05709)",
            multi_crop=True,
            checks=(_two_per_process("simclr"),),
        ),
        Objective(
            "moco_v2",
            f"{_METHODS}:MoCoV2",
            MoCoV2Config,
            "query encoder vs momentum key encoder, InfoNCE against a queue of keys",
            "Chen, Fan, Girshick, He 2020, Improved Baselines with Momentum Contrastive Learning (arXiv:2003.04297)",
            momentum=True,
            multi_crop=True,
            choices=_MOMENTUM,
            checks=(_check_moco_v2,),
        ),
        Objective(
            "moco_v3",
            f"{_METHODS}:MoCoV3",
            MoCoV3Config,
            "predictor on the query branch, symmetric InfoNCE against the in-batch momentum keys",
            "Chen, Xie, He 2021, An Empirical Study of Training Self-Supervised Vision Transformers (arXiv:2104.02057)",
            predictor=True,
            momentum=True,
            multi_crop=True,
            choices=_MOMENTUM,
            checks=(_two_per_process("moco_v3"),),
        ),
        Objective(
            "byol",
            f"{_METHODS}:BYOL",
            BYOLConfig,
            "predictor regresses a momentum target's projection of the other view; no negatives",
            "Grill et al. 2020, Bootstrap Your Own Latent: A New Approach to Self-Supervised Learning "
            "(arXiv:2006.07733)",
            predictor=True,
            momentum=True,
            choices=_MOMENTUM,
            checks=(_two_per_process("byol"),),
        ),
        Objective(
            "simsiam",
            f"{_METHODS}:SimSiam",
            SimSiamConfig,
            "predictor regresses the other view's projection behind a stop-gradient; no momentum encoder",
            "Chen, He 2021, Exploring Simple Siamese Representation Learning (arXiv:2011.10566)",
            predictor=True,
            checks=(_two_per_process("simsiam"),),
        ),
        Objective(
            "barlow_twins",
            f"{_METHODS}:BarlowTwins",
            BarlowTwinsConfig,
            "cross-correlation of the two views' embeddings over the global batch pushed to identity",
            "Zbontar et al. 2021, Barlow Twins: Self-Supervised Learning via Redundancy Reduction (arXiv:2103.03230)",
            checks=(_two_per_process("barlow_twins"),),
        ),
        Objective(
            "vicreg",
            f"{_METHODS}:VICReg",
            VICRegConfig,
            "invariance + variance + covariance of the embeddings over the global batch",
            "Bardes, Ponce, LeCun 2022, VICReg: Variance-Invariance-Covariance Regularization for "
            "Self-Supervised Learning (arXiv:2105.04906)",
            checks=(_two_per_process("vicreg"),),
        ),
        Objective(
            "dino",
            f"{_METHODS}:DINO",
            DINOConfig,
            "student matches a momentum teacher's centred, sharpened softmax over prototypes; multi-crop",
            "Caron et al. 2021, Emerging Properties in Self-Supervised Vision Transformers (arXiv:2104.14294)",
            prototypes=True,
            momentum=True,
            multi_crop=True,
            choices=_MOMENTUM,
            checks=(_two_per_process("dino"), _check_dino),
        ),
        Objective(
            "supcon",
            f"{_METHODS}:SupCon",
            SupConConfig,
            "supervised contrastive loss on class labels",
            "Khosla et al. 2020, Supervised Contrastive Learning (arXiv:2004.11362)",
            supervised=True,
        ),
        Objective(
            "triplet",
            f"{_METHODS}:Triplet",
            TripletConfig,
            "triplet margin loss with online mining",
            "Hermans, Beyer, Leibe 2017, In Defense of the Triplet Loss for Person Re-Identification "
            "(arXiv:1703.07737)",
            supervised=True,
            choices=(("mining", ("batch_hard", "batch_all", "semi_hard")),),
        ),
        Objective(
            "contrastive",
            f"{_METHODS}:Contrastive",
            ContrastiveConfig,
            "pairwise margin loss on same-class and other-class pairs (Siamese)",
            "Hadsell, Chopra, LeCun 2006, Dimensionality Reduction by Learning an Invariant Mapping",
            supervised=True,
        ),
    )
}


def register(objective: Objective) -> None:
    """Adds an objective defined outside twinview (a plugin module calls this when imported).

    The objectives shipped with twinview are entries of :data:`OBJECTIVES` above; this is for a
    project's own, e.g. ``examples/dcl_objective.py``.
    """
    if objective.name in OBJECTIVES and OBJECTIVES[objective.name] != objective:
        raise ValueError(f"an objective named '{objective.name}' is already registered")
    OBJECTIVES[objective.name] = objective


ENTRY_POINT_GROUP = "twinview.objectives"
_loaded_entry_points: set[str] = set()


def objectives() -> dict[str, Objective]:
    """The whole table: the shipped objectives, those of installed packages (entry points in the
    ``twinview.objectives`` group, each loaded on the first call) and those registered by plugins.

    An entry point that fails to load is reported with a warning naming it and left out; the
    shipped objectives and the other plugins still work.
    """
    for entry in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if entry.value in _loaded_entry_points:
            continue
        _loaded_entry_points.add(entry.value)
        try:
            loaded = entry.load()  # a module that calls register(), or an Objective
            if isinstance(loaded, Objective):
                register(loaded)
        except Exception as err:  # a broken installed package must not break every command
            warnings.warn(
                f"twinview: the objective plugin '{entry.name} = {entry.value}' (entry point group "
                f"{ENTRY_POINT_GROUP}) failed to load and is left out: {type(err).__name__}: {err}",
                stacklevel=2,
            )
    return OBJECTIVES


def load_plugins(plugins: Sequence[str]) -> None:
    """Imports the modules of ``objective.plugins``, which register their objectives.

    Running a run's commands (resume, evaluate, embed, search, export) imports the plugins its
    config.yaml names, as its training did; each is announced on stderr the first time.

    Args:
        plugins: Importable module names (``my_package.objectives``) or paths of ``.py`` files
            (imported under the file's stem).

    Raises:
        ObjectiveSettingError: If a plugin cannot be found, or a ``.py`` file's name is already the
            name of another imported module (names ``objective.plugins``).
    """
    for plugin in plugins:
        if plugin.endswith(".py"):
            _load_file(Path(plugin).expanduser().resolve())
            continue
        if plugin in sys.modules:
            continue
        print(f"twinview: loading objective plugin {plugin} (objective.plugins)", file=sys.stderr)
        try:
            importlib.import_module(plugin)
        except ModuleNotFoundError as err:
            if err.name is None or not (plugin == err.name or plugin.startswith(err.name + ".")):
                raise  # the plugin was found; something it imports is missing
            raise ObjectiveSettingError(
                f"objective.plugins: cannot import '{plugin}' (is it installed, or on PYTHONPATH? A file can be "
                f"given by its path, e.g. --plugin ./my_objective.py)."
            ) from None


def _load_file(path: Path) -> None:
    """Imports a plugin file under its stem (its method paths say ``stem:Class``)."""
    name = path.stem
    if name in sys.modules:
        loaded = getattr(sys.modules[name], "__file__", None)
        if loaded and Path(loaded).resolve() == path:
            return
        raise ObjectiveSettingError(
            f"objective.plugins: '{path}' would be imported as module '{name}', which is already the name of "
            f"{loaded or 'a built-in module'}; rename the file."
        )
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None or not path.is_file():
        raise ObjectiveSettingError(f"objective.plugins: no Python file '{path}'.")
    print(f"twinview: loading objective plugin {path} (objective.plugins)", file=sys.stderr)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # before running it: its method paths are 'name:Class'
    before = dict(OBJECTIVES)
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        OBJECTIVES.clear()  # nothing half-registered points at the removed module
        OBJECTIVES.update(before)
        raise


def get(name: str) -> Objective:
    """The entry of ``name``; the error lists the registered names."""
    table = objectives()
    if name not in table:
        raise ObjectiveSettingError(f"unknown objective.name '{name}'. Valid values: {', '.join(table)}.")
    return table[name]
