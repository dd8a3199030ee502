"""The training loop end to end: run directory contents, resume, and the real CIFAR-10 path."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from twinview.augment.views import build_views
from twinview.pretrain.config import load_config
from twinview.pretrain.data.folder import ImageFolderDataset
from twinview.pretrain.data.source import scan_source
from twinview.pretrain.engine.train import train
from twinview.pretrain.models import create_model, normalization_stats
from twinview.pretrain.objectives import registry
from twinview.pretrain.objectives.losses import nt_xent
from twinview.pretrain.runs import checkpoints, load_trained_model, new_run_dir

pytestmark = pytest.mark.slow  # end-to-end: make test-fast leaves these out

SMALL = [
    "model.backbone=resnet18",
    "model.proj_hidden_dim=64",
    "model.proj_dim=32",
    "data.image_size=24",
    "data.num_workers=0",
    "train.batch_size=8",
    "train.log_every=1",
    "optim.lr=0.1",
    "optim.warmup_epochs=0.5",
]


def _cfg(folder: Path, out: Path, *extra: str):
    return load_config(None, [f"data.path={folder}", f"train.output_dir={out}", *SMALL, *extra])


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_run_directory_holds_config_metrics_checkpoints_and_weights(image_folder: Path, tmp_path: Path) -> None:
    cfg = _cfg(image_folder, tmp_path / "runs", "train.epochs=2", "train.run_name=r")
    run_dir = new_run_dir(cfg)
    train(cfg, run_dir)
    assert load_config(run_dir / "config.yaml") == cfg
    records = _metrics(run_dir)
    steps = [r for r in records if r["kind"] == "step"]
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert len(steps) == 6 and [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]  # 24 images / 8 = 3 steps x 2
    assert [e["epoch"] for e in epochs] == [1, 2] and all(e["seconds"] > 0 for e in epochs)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records if r["kind"] != "run")
    assert steps[0]["lr"] < steps[1]["lr"]  # warm-up over the first 1.5 steps, then cosine decay
    assert steps[-1]["lr"] < steps[2]["lr"]
    assert [p.name for p in checkpoints(run_dir)] == ["epoch_0001", "epoch_0002"]
    assert load_trained_model(run_dir)[0] == cfg
    with pytest.raises(FileExistsError, match="already holds a run"):
        new_run_dir(cfg)


OBJECTIVES = {
    "simclr": [],
    "moco_v2": ["objective.moco_v2.queue_size=16", "objective.moco_v2.bn_splits=2"],
    "moco_v3": ["model.predictor_hidden_dim=32", "objective.moco_v3.momentum_schedule=cosine"],
    "supcon": [],
    "triplet": ["objective.triplet.mining=semi_hard"],
    "contrastive": [],
    "byol": ["model.predictor_hidden_dim=32"],
    "simsiam": ["model.predictor_hidden_dim=32", "model.proj_output_bn=true"],
    "barlow_twins": [],
    "vicreg": [],
    "dino": [  # the teacher temperature still warming up across the resume, local views
        "objective.dino.prototypes=32",
        "objective.dino.teacher_temperature=0.07",
        "objective.dino.warmup_teacher_epochs=1.5",
        "augment.local_crops=2",
    ],
}


@pytest.mark.parametrize("objective", list(OBJECTIVES))
def test_resume_from_a_checkpoint_matches_an_uninterrupted_run(
    image_folder: Path, tmp_path: Path, objective: str
) -> None:
    """Bitwise on CPU, for every objective: momentum encoders, MoCo's queue and shuffle RNG, DINO's
    centre are checkpointed; DINO's teacher temperature follows from the step."""
    extra = [f"objective.name={objective}", *OBJECTIVES[objective]]
    cfg = _cfg(image_folder, tmp_path / "runs", "train.epochs=2", "train.run_name=straight", *extra)
    straight = new_run_dir(cfg)
    train(cfg, straight)

    # The same run, interrupted after epoch 1: only that checkpoint survives.
    resumed = tmp_path / "runs" / "resumed"
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "checkpoints" / "epoch_0002")
    (resumed / "model.safetensors").unlink()
    train(cfg, resumed, resume=True)

    a, b = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


VIT = ["model.backbone=vit_tiny_patch16_224", "model.kwargs.img_size=24", "model.kwargs.patch_size=8"]


@pytest.mark.parametrize(
    ("objective", "backbone"),
    [("moco_v2", []), ("moco_v3", []), ("moco_v3", VIT), ("supcon", [])],
    ids=["moco_v2", "moco_v3", "moco_v3-vit", "supcon"],
)
def test_each_objective_trains_and_its_weights_load_and_export(
    image_folder: Path, tmp_path: Path, objective: str, backbone: list[str]
) -> None:
    import timm

    from twinview.pretrain.app.export import export_run

    cfg = _cfg(
        image_folder,
        tmp_path / "runs",
        "train.epochs=1",
        f"objective.name={objective}",
        *OBJECTIVES[objective],
        *backbone,
    )
    run_dir = new_run_dir(cfg)
    train(cfg, run_dir)
    records = [r for r in _metrics(run_dir) if r["kind"] in ("step", "epoch")]
    assert [r["kind"] for r in records][-1] == "epoch" and len(records) >= 2  # logged steps and the epoch
    assert all(r["loss"] is not None and torch.isfinite(torch.tensor(r["loss"])) for r in records)
    _, model = load_trained_model(run_dir)  # strict: the predictor of moco_v3 is part of the weights
    assert (model.predictor is not None) == registry.get(objective).predictor
    export_run(run_dir, tmp_path / "export")
    exported = timm.create_model(f"local-dir:{tmp_path / 'export'}", pretrained=True).eval()
    x = torch.randn(2, 3, 24, 24)
    with torch.no_grad():
        torch.testing.assert_close(exported(x), model.backbone(x))


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            ["objective.name=moco_v2", "objective.moco_v2.queue_size=20"],
            "queue_size=20 must be a multiple of the keys added per optimiser step, 8",
        ),
        (
            ["objective.name=moco_v2", "objective.moco_v2.queue_size=24", "objective.moco_v2.symmetric=true"],
            "multiple of the keys added per optimiser step, 16",
        ),
        (
            ["objective.name=moco_v2", "objective.moco_v2.queue_size=24", "train.grad_accumulation=2"],
            "keys added per optimiser step, 16 (train.batch_size=8 x 1 processes x 2 accumulated passes)",
        ),
        (
            [
                "objective.name=moco_v2",
                "objective.moco_v2.queue_size=24",
                "train.grad_accumulation=2",
                "train.grad_accumulation_mode=independent",
            ],
            "keys added per optimiser step, 16",
        ),
        (["train.grad_accumulation=4"], "train.grad_accumulation=4 needs at least that many batches"),
        (["train.grad_accumulation=0"], "train.grad_accumulation=0 must be >= 1"),
        (["train.keep_checkpoints=0"], "train.keep_checkpoints=0 must be >= 1"),
        (["objective.name=moco_v2", "objective.moco_v2.bn_splits=3"], "bn_splits=3 must divide train.batch_size=8"),
        (["objective.name=supcon", "data.samples_per_class=3"], "multiple of data.samples_per_class=3"),
        (["objective.name=triplet", "data.samples_per_class=2"], "needs 4 classes but the data has 3"),
        (["train.batch_size=1"], "at least 2 images"),
        (["objective.name=contrastive", "data.samples_per_class=8"], "hold one class"),
    ],
)
def test_objective_settings_that_cannot_work_fail_before_training(
    image_folder: Path, tmp_path: Path, extra: list[str], message: str
) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        train(_cfg(image_folder, tmp_path / "runs", *extra), tmp_path / "r")
    assert not (tmp_path / "r" / "metrics.jsonl").exists()


def test_supervised_objective_on_an_unlabeled_folder_is_a_clear_error(image_folder: Path, tmp_path: Path) -> None:
    flat = tmp_path / "flat"
    flat.mkdir()
    for i, f in enumerate(sorted(image_folder.rglob("*.png"))):
        shutil.copy(f, flat / f"{i:03d}.png")
    cfg = _cfg(flat, tmp_path / "runs", "objective.name=supcon")
    with pytest.raises(ValueError, match="no class sub-folders"):
        train(cfg, tmp_path / "r")


def test_resume_without_checkpoints_is_an_error(image_folder: Path, tmp_path: Path) -> None:
    cfg = _cfg(image_folder, tmp_path / "runs", "train.epochs=1")
    with pytest.raises(FileNotFoundError, match="no checkpoints"):
        train(cfg, tmp_path / "empty-run", resume=True)


def test_fewer_images_than_a_batch_is_a_clear_error(image_folder: Path, tmp_path: Path) -> None:
    cfg = _cfg(image_folder, tmp_path / "runs", "train.batch_size=64")
    with pytest.raises(ValueError, match="fewer than one global batch"):
        train(cfg, tmp_path / "r")


def test_bf16_mixed_precision_on_cpu_trains(image_folder: Path, tmp_path: Path) -> None:
    cfg = _cfg(image_folder, tmp_path / "runs", "train.epochs=1", "train.mixed_precision=bf16", "train.cpu=true")
    run_dir = new_run_dir(cfg)
    train(cfg, run_dir)
    records = [r for r in _metrics(run_dir) if r["kind"] in ("step", "epoch")]
    assert [r["kind"] for r in records][-1] == "epoch" and len(records) >= 2  # logged steps and the epoch
    assert all(r["loss"] is not None and torch.isfinite(torch.tensor(r["loss"])) for r in records)
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["mixed_precision"] == "bf16"


def test_real_cifar10_short_run_lowers_the_loss(cifar10_root: Path, tmp_path: Path) -> None:
    # 400 real CIFAR-10 images (40 per class), resnet18 at 32 px, 5 short epochs of 12 steps. SimCLR's
    # per-batch loss is too noisy over so few steps, so the check is the NT-Xent of the same seeded
    # views of all 400 images, before (the run's initial weights) and after training.
    subset = tmp_path / "cifar-subset"
    for class_dir in sorted((cifar10_root / "train").iterdir()):
        (subset / class_dir.name).mkdir(parents=True)
        for f in sorted(class_dir.iterdir())[:40]:
            (subset / class_dir.name / f.name).symlink_to(f)
    cfg = load_config(
        "simclr-cifar10",
        [
            f"data.path={subset}",
            f"train.output_dir={tmp_path}",
            "train.run_name=c",
            "train.epochs=5",
            "train.batch_size=32",
            "optim.lr=0.3",
            "optim.warmup_epochs=0.1",
            "data.num_workers=1",
        ],
    )
    run_dir = new_run_dir(cfg)
    train(cfg, run_dir)
    assert len([r for r in _metrics(run_dir) if r["kind"] == "epoch"]) == 5

    torch.manual_seed(cfg.train.seed)
    initial = create_model(cfg.model)  # the loop seeds, then builds the model first: same weights
    _, trained = load_trained_model(run_dir)
    dataset = ImageFolderDataset(scan_source(subset), cfg.data.image_size)
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    torch.manual_seed(123)
    view_a, view_b = build_views(cfg.augment, cfg.data.image_size, *normalization_stats(initial.backbone))(images)
    with torch.no_grad():
        before = nt_xent(initial.train()(view_a), initial(view_b), cfg.objective.simclr.temperature).item()
        after = nt_xent(trained.train()(view_a), trained(view_b), cfg.objective.simclr.temperature).item()
    assert after < before - 0.05, (before, after)


def test_online_knn_monitor_is_logged_every_n_epochs(image_folder: Path, tmp_path: Path) -> None:
    cfg = _cfg(
        image_folder,
        tmp_path / "runs",
        "train.epochs=2",
        "eval.monitor_every=1",
        "eval.knn_k=5",
        f"eval.monitor_train={image_folder}",
        f"eval.monitor_test={image_folder}",
    )
    run_dir = new_run_dir(cfg)
    train(cfg, run_dir)
    epochs = [r for r in _metrics(run_dir) if r["kind"] == "epoch"]
    assert [("knn_top1" in e) for e in epochs] == [True, True]
    assert all(0.0 <= e["knn_top1"] <= e["knn_top5"] <= 1.0 for e in epochs)
    with pytest.raises(ValueError, match="monitor_train"):
        train(_cfg(image_folder, tmp_path / "runs", "eval.monitor_every=1"), tmp_path / "bad")


def test_overwrite_starts_clean(image_folder: Path, tmp_path: Path) -> None:
    cfg = _cfg(image_folder, tmp_path / "runs", "train.epochs=2", "train.run_name=same")
    train(cfg, new_run_dir(cfg))
    (tmp_path / "runs" / "same" / "skipped_files.txt").write_text("old\treason\n")
    again = _cfg(image_folder, tmp_path / "runs", "train.epochs=1", "train.run_name=same")
    run_dir = new_run_dir(again, overwrite=True)
    assert not (run_dir / "skipped_files.txt").exists() and not checkpoints(run_dir)
    train(again, run_dir)
    assert [p.name for p in checkpoints(run_dir)] == ["epoch_0001"]
    assert [r["epoch"] for r in _metrics(run_dir) if r["kind"] == "epoch"] == [1]


def test_lr_scaling_clipping_and_tensorboard(image_folder: Path, tmp_path: Path) -> None:
    cfg = _cfg(
        image_folder,
        tmp_path / "runs",
        "train.epochs=1",
        "optim.lr_scaling=linear",
        "optim.base_batch_size=256",
        "train.log_with=tensorboard",
        "train.run_name=tb",
    )
    run_dir = new_run_dir(cfg)
    train(cfg, run_dir)
    run = next(r for r in _metrics(run_dir) if r["kind"] == "run")
    assert run["peak_lr"] == pytest.approx(0.1 * 8 / 256) and run["global_batch"] == 8
    assert list(run_dir.rglob("events.out.tfevents.*")), "no TensorBoard event file"
    assert load_config(None, ["data.path=x", "optim.lr_scaling=sqrt"]).optim.lr_scaling == "sqrt"

    # plain SGD with a clipped norm of 1e-8: one step moves every weight by at most lr * 1e-8
    clipped = _cfg(
        image_folder,
        tmp_path / "runs",
        "train.epochs=1",
        "train.max_steps_per_epoch=1",
        "optim.name=momentum",
        "optim.momentum=0",
        "optim.weight_decay=0",
        "optim.warmup_epochs=0",
        "optim.clip_grad_norm=1e-8",
        "train.run_name=clip",
    )
    run_dir = new_run_dir(clipped)
    train(clipped, run_dir)
    torch.manual_seed(clipped.train.seed)
    initial = create_model(clipped.model).state_dict()
    final = load_file(run_dir / "model.safetensors")
    moved = max(
        (final[k].float() - initial[k].float()).abs().max().item()
        for k in final
        if "running" not in k and "num_batches" not in k
    )
    assert moved <= 0.1 * 1e-8 * 1.01


def test_mixed_precision_the_device_cannot_run_is_refused_before_compute(
    image_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from twinview.pretrain.validate import World, validate

    cfg = _cfg(image_folder, tmp_path / "runs", "train.mixed_precision=fp16", "train.run_name=fp16")
    run_dir = tmp_path / "runs" / "fp16"
    with pytest.raises(ValueError, match=r"train.mixed_precision=fp16 is not supported on a CPU"):
        train(cfg, run_dir)
    assert not (run_dir / "metrics.jsonl").exists()  # nothing ran
    bf16 = _cfg(image_folder, tmp_path / "runs", "train.mixed_precision=bf16")
    with pytest.raises(ValueError, match="bf16 is not supported by Tesla V100"):
        validate(bf16, World(device_type="cuda", bf16_supported=False, device_name="Tesla V100-SXM2-16GB"))
    validate(bf16, World(device_type="cpu"))  # bf16 autocast runs on CPUs
    validate(_cfg(image_folder, tmp_path / "runs"), World(device_type="cpu"))


def test_the_newest_k_checkpoints_are_kept(image_folder: Path, tmp_path: Path) -> None:
    cfg = _cfg(
        image_folder, tmp_path / "runs", "train.epochs=4", "train.keep_checkpoints=3", "train.max_steps_per_epoch=1"
    )
    run_dir = new_run_dir(cfg)
    train(cfg, run_dir)
    assert [p.name for p in checkpoints(run_dir)] == ["epoch_0002", "epoch_0003", "epoch_0004"]


@pytest.mark.parametrize(("name", "kind"), [("sgd", "SGD"), ("lars", "Lars"), ("adamw", "AdamW")])
def test_optimizers_leave_norms_and_biases_out_of_weight_decay(name: str, kind: str) -> None:
    from twinview.pretrain.engine.optim import build_optimizer

    cfg = load_config(None, ["data.path=unused", f"optim.name={name}", "optim.weight_decay=0.01"])
    model = create_model(cfg.model)
    optimizer = build_optimizer(cfg, model, lr=0.3)
    assert type(optimizer).__name__ == kind
    decay = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    for param_name, p in model.named_parameters():
        expected = 0.0 if p.ndim <= 1 else 0.01  # biases and batch-norm scales/shifts are 1-D
        assert decay[id(p)] == expected, param_name
    assert {g["lr"] for g in optimizer.param_groups} == {0.3}
    assert sum(p.ndim <= 1 for p in model.parameters()) > 10  # the check above saw both kinds


def test_on_a_gpu_the_adam_family_keeps_its_step_count_on_the_device() -> None:
    """``capturable`` Adam keeps ``state['step']`` on the GPU, which the device-mode non-finite
    check restores with the weights (construction only: no GPU needed)."""
    from twinview.pretrain.engine.optim import build_optimizer

    model = torch.nn.Linear(2, 2)
    for name, capturable in [("adamw", True), ("adam", True), ("lars", None), ("sgd", None)]:
        cfg = load_config(None, ["data.path=unused", f"optim.name={name}"])
        assert build_optimizer(cfg, model, 0.1, torch.device("cuda", 0)).defaults.get("capturable") == capturable
        assert not build_optimizer(cfg, model, 0.1, torch.device("cpu")).defaults.get("capturable")


@pytest.mark.parametrize(("rule", "factor"), [("none", 1.0), ("linear", 4.0), ("sqrt", 2.0)])
def test_lr_scales_with_the_global_batch_of_an_optimiser_step(rule: str, factor: float) -> None:
    """64 per pass x 2 processes x 2 accumulated passes = 256 = 4 x base_batch_size 64."""
    from twinview.pretrain.engine.optim import scaled_lr

    cfg = load_config(
        None,
        [
            "data.path=unused",
            "optim.lr=0.3",
            f"optim.lr_scaling={rule}",
            "optim.base_batch_size=64",
            "train.batch_size=64",
            "train.grad_accumulation=2",
        ],
    )
    assert scaled_lr(cfg, num_processes=2) == pytest.approx(0.3 * factor)


TINY_VIT = [
    "model.backbone=vit_tiny_patch16_224",
    "model.kwargs.img_size=24",
    "model.kwargs.patch_size=8",
    "model.kwargs.depth=1",
]


def test_a_compiled_run_resumes_exactly_trains_like_eager_and_exports_to_plain_timm(
    image_folder: Path, tmp_path: Path
) -> None:
    """train.compile: the same state-dict keys, so checkpoints, resume and export are unchanged."""
    import timm
    from torch._dynamo.utils import counters

    from twinview.pretrain.app.export import export_run

    cfg = _cfg(
        image_folder, tmp_path / "runs", "train.epochs=2", "train.run_name=compiled", "train.compile=true", *TINY_VIT
    )
    compiled = new_run_dir(cfg)
    counters.clear()
    train(cfg, compiled)
    assert counters["stats"]["unique_graphs"] >= 1  # it was compiled
    resumed = tmp_path / "runs" / "resumed"
    shutil.copytree(compiled, resumed)
    shutil.rmtree(resumed / "checkpoints" / "epoch_0002")
    (resumed / "model.safetensors").unlink()
    train(cfg, resumed, resume=True)
    eager_cfg = _cfg(image_folder, tmp_path / "runs", "train.epochs=2", "train.run_name=eager", *TINY_VIT)
    eager = new_run_dir(eager_cfg)
    train(eager_cfg, eager)

    a, b, c = (load_file(d / "model.safetensors") for d in (compiled, resumed, eager))
    assert a.keys() == b.keys() == c.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
        torch.testing.assert_close(a[key], c[key], rtol=1e-3, atol=1e-4)  # the same function, fused differently
    start = _cfg(image_folder, tmp_path / "runs", *TINY_VIT)
    from twinview.pretrain.models import create_model

    torch.manual_seed(start.train.seed)
    init = create_model(start.model).state_dict()
    assert max((a[k] - init[k]).abs().max().item() for k in a if k in init) > 1e-3  # it trained
    export_run(compiled, tmp_path / "export")
    exported = timm.create_model(f"local-dir:{tmp_path / 'export'}", pretrained=True).eval()
    _, model = load_trained_model(compiled)
    x = torch.randn(2, 3, 24, 24)
    with torch.no_grad():
        torch.testing.assert_close(exported(x), model.backbone(x))


@pytest.mark.parametrize(
    ("objective", "extra"),
    [
        ("simclr", ()),
        ("simclr", ("train.grad_accumulation=2", "train.batch_size=4")),  # cached: the loss sees both passes
        ("moco_v2", ("objective.moco_v2.queue_size=16", "objective.moco_v2.bn_splits=2")),
        ("moco_v3", ()),
    ],
)
def test_multi_crop_local_views_train(image_folder: Path, tmp_path: Path, objective: str, extra: tuple) -> None:
    cfg = _cfg(
        image_folder,
        tmp_path,
        f"objective.name={objective}",
        "augment.local_crops=2",
        "augment.local_crop_size=12",
        "train.epochs=1",
        "train.run_name=mc",
        *extra,
    )
    train(cfg, tmp_path / "mc")
    losses = [r["loss"] for r in _metrics(tmp_path / "mc") if r["kind"] == "step"]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))


def test_objectives_without_multi_crop_refuse_local_views(image_folder: Path, tmp_path: Path) -> None:
    from twinview.pretrain.validate import ConfigError, World, validate

    cfg = _cfg(image_folder, tmp_path, "objective.name=supcon", "augment.local_crops=2")
    with pytest.raises(ConfigError, match=r"local_crops=2: objective 'supcon'.*multi-crop: simclr, moco_v2, moco_v3"):
        validate(cfg, World())


PROGRESSIVE = ["augment.progressive_min=16", "augment.progressive_ramp=[0,1]", "augment.progressive_multiple=4"]


def test_progressive_resolution_grows_the_views_per_epoch_and_resumes_exactly(
    image_folder: Path, tmp_path: Path
) -> None:
    cfg = _cfg(
        image_folder,
        tmp_path / "runs",
        "train.epochs=3",
        "train.keep_checkpoints=3",
        "train.run_name=straight",
        *PROGRESSIVE,
    )
    straight = new_run_dir(cfg)
    train(cfg, straight)
    epochs = [r for r in _metrics(straight) if r["kind"] == "epoch"]
    assert [r["view_side"] for r in epochs] == [16, 20, 24]  # 16 px, a ramp, the full 24 px at the end

    resumed = tmp_path / "runs" / "resumed"  # interrupted after the first (16 px) epoch
    shutil.copytree(straight, resumed)
    for name in ("epoch_0002", "epoch_0003"):
        shutil.rmtree(resumed / "checkpoints" / name)
    (resumed / "model.safetensors").unlink()
    train(cfg, resumed, resume=True)
    a, b = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert all(torch.equal(a[key], b[key]) for key in a)


def test_progressive_resolution_refuses_a_fixed_size_vit_before_compute(image_folder: Path, tmp_path: Path) -> None:
    from twinview.pretrain.validate import ConfigError

    cfg = _cfg(image_folder, tmp_path, *VIT, "train.epochs=2", "train.run_name=vit", *PROGRESSIVE)
    with pytest.raises(ConfigError, match=r"augment.progressive_min.*16 px views.*model.kwargs.dynamic_img_size=true"):
        train(cfg, tmp_path / "vit")
    assert not (tmp_path / "vit" / "metrics.jsonl").exists()
    dynamic = [*VIT, "model.kwargs.dynamic_img_size=true", "train.run_name=vit3"]
    cfg = _cfg(
        image_folder, tmp_path, *dynamic, "train.epochs=3", *PROGRESSIVE
    )  # a 20 px epoch: patches of 8 do not fit
    with pytest.raises(ConfigError, match=r"cannot take the 20 px views"):
        train(cfg, tmp_path / "vit3")
    cfg = _cfg(image_folder, tmp_path, *VIT, "model.kwargs.dynamic_img_size=true", "train.epochs=2", *PROGRESSIVE)
    train(cfg, tmp_path / "vit-dynamic")
    assert [r["view_side"] for r in _metrics(tmp_path / "vit-dynamic") if r["kind"] == "epoch"] == [16, 24]
