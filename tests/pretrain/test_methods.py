"""Methods: their state round-trips through a checkpoint, including checkpoints of earlier versions."""

from __future__ import annotations

import pytest
import torch

from twinview.pretrain.config import load_config
from twinview.pretrain.models import create_model, create_run_model
from twinview.pretrain.objectives import registry
from twinview.pretrain.objectives.methods import create_method

# what the checkpoints of commit 20fd5f4 held besides the buffers: every MoCo method saved its
# shuffle-BN generator, every supervised method a pair generator
EARLIER = {
    "moco_v2": "shuffle_generator",
    "moco_v3": "shuffle_generator",
    "supcon": "pair_generator",
    "triplet": "pair_generator",
    "contrastive": "pair_generator",
}


def _model_and_method(objective: str, *extra: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    cfg = load_config(
        None,
        [
            "data.path=x",
            f"objective.name={objective}",
            "model.proj_hidden_dim=16",
            "model.proj_dim=8",
            "model.predictor_hidden_dim=16",
            "objective.moco_v2.queue_size=32",
            "objective.dino.prototypes=12",
            *extra,
        ],
    )
    torch.manual_seed(0)
    model = create_run_model(cfg).train()
    return model, create_method(cfg, model).train()


def _method(objective: str) -> torch.nn.Module:
    return _model_and_method(objective)[1]


@pytest.mark.parametrize("objective", list(registry.objectives()))
def test_state_round_trips_and_an_earlier_versions_checkpoint_loads(objective: str) -> None:
    method = _method(objective)
    state = method.state_dict()
    fresh = _method(objective)
    fresh.load_state_dict(state)
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, state[key])
    if objective in EARLIER:
        earlier = {**state, EARLIER[objective]: torch.Generator().manual_seed(3).get_state()}
        _method(objective).load_state_dict(earlier)  # resumes (the entry is dropped or used)
    if objective != "contrastive":  # its state is only its generator
        with pytest.raises(RuntimeError, match="Unexpected key"):
            _method(objective).load_state_dict({**state, "not_a_key": torch.zeros(1)})


def _views(count: int, n: int = 16, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 3, 32 if i < 2 else 16, 32 if i < 2 else 16, generator=g) for i in range(count)]


def test_a_list_of_resolutions_is_one_forward_equal_to_separate_calls() -> None:
    cfg = load_config(None, ["data.path=x", "model.proj_hidden_dim=16", "model.proj_dim=8"])
    torch.manual_seed(0)
    model = create_model(cfg.model).eval()  # eval: the head's batch norm does not mix the groups
    big, small = torch.randn(4, 3, 32, 32), torch.randn(6, 3, 16, 16)
    together = model([big, small])
    torch.testing.assert_close(together, torch.cat([model(big), model(small)]))


@pytest.mark.parametrize("objective", ["simclr", "moco_v2", "moco_v3"])
def test_multi_crop_losses_are_their_formulas_over_query_key_pairs(objective: str) -> None:
    from twinview.pretrain.objectives.losses import info_nce, multi_positive_nt_xent
    from twinview.pretrain.objectives.methods import _in_batch_info_nce

    method = _method(objective)
    cfg = load_config(None, ["data.path=x", "model.proj_hidden_dim=16", "model.proj_dim=8"])
    torch.manual_seed(1)
    model = create_model(cfg.model, predictor=registry.get(objective).predictor)
    views = _views(4)  # 2 global views at 32 px, 2 local views at 16 px
    outputs, keys = method.embed(model, views), method.keys(views)
    assert len(outputs) == {"simclr": 4, "moco_v2": 3, "moco_v3": 4}[objective]
    loss = method.loss(outputs, keys, torch.zeros(16, dtype=torch.long))
    t = method.temperature
    if objective == "simclr":
        expected = multi_positive_nt_xent(outputs, t)
    elif objective == "moco_v2":  # asymmetric: q1-k2, and each local query against the one key
        (k,) = keys
        bank = method.queue.keys
        expected = sum(info_nce(q, k, bank, t) for q in outputs) / 3
    else:
        pairs = [(outputs[0], keys[1]), (outputs[1], keys[0])] + [(q, k) for q in outputs[2:] for k in keys]
        expected = sum(_in_batch_info_nce(q, k, t) for q, k in pairs) / 6 * 4 * t
    torch.testing.assert_close(loss, expected)


def test_byol_loss_is_both_directions_of_negative_cosine_against_the_target() -> None:
    from twinview.pretrain.objectives.losses import negative_cosine

    model, method = _model_and_method("byol")
    views = _views(2)
    p_a, p_b = method.embed(model, views)
    t_a, t_b = method.keys(views)
    assert not t_a.requires_grad and p_a.shape == t_a.shape == (16, 8)
    loss = method.loss([p_a, p_b], [t_a, t_b], torch.zeros(16))
    torch.testing.assert_close(loss, negative_cosine(p_a, t_b) + negative_cosine(p_b, t_a))
    target = method.key(torch.cat(views))  # the target is a copy of backbone + head, without predictor
    torch.testing.assert_close(target, torch.nn.Sequential(model.backbone, model.head)(torch.cat(views)))


def test_byol_target_follows_the_cosine_schedule_from_0_996_to_1() -> None:
    model, method = _model_and_method("byol")
    assert method.momentum_at(0, 100) == pytest.approx(0.996) and method.momentum_at(100, 100) == pytest.approx(1.0)
    assert method.momentum_at(50, 100) == pytest.approx(0.998)
    before = [p.clone() for p in method.key.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    method.after_step(model, [], step=50, total_steps=100)
    online = list(torch.nn.Sequential(model.backbone, model.head).parameters())
    for b, k, q in zip(before, method.key.parameters(), online, strict=True):
        torch.testing.assert_close(k, 0.998 * b + 0.002 * q)


def test_simsiam_is_one_plus_the_papers_loss_with_no_gradient_through_the_projections() -> None:
    model, method = _model_and_method("simsiam")
    outputs = method.embed(model, _views(2))
    p_a, p_b, z_a, z_b = outputs
    loss = method.loss(outputs, [], torch.zeros(16))
    cos = torch.nn.functional.cosine_similarity
    paper = -(cos(p_a, z_b.detach()).mean() / 2 + cos(p_b, z_a.detach()).mean() / 2)
    torch.testing.assert_close(loss, 1 + paper)
    grads = torch.autograd.grad(loss, [z_a, z_b, p_a], retain_graph=True, allow_unused=True)
    assert grads[0] is None and grads[1] is None and grads[2] is not None  # z only through p


def test_dino_teacher_temperature_warms_up_and_the_centre_follows_the_teacher() -> None:
    model, method = _model_and_method(
        "dino",
        "objective.dino.warmup_teacher_temperature=0.04",
        "objective.dino.teacher_temperature=0.07",
        "objective.dino.warmup_teacher_epochs=2",
    )
    method.start_step(0, 10)
    assert method.teacher_temperature == pytest.approx(0.04)
    method.start_step(10, 10)  # one of two warm-up epochs
    assert method.teacher_temperature == pytest.approx(0.055)
    method.start_step(35, 10)
    assert method.teacher_temperature == pytest.approx(0.07)
    keys = [torch.randn(16, 12), torch.randn(16, 12)]
    mean = torch.cat(keys).mean(dim=0, keepdim=True)
    method.after_step(model, keys, 0, 10, apply=torch.tensor(False))
    assert torch.equal(method.center, torch.zeros(1, 12))  # a skipped step leaves the centre
    method.after_step(model, keys, 0, 10, apply=torch.tensor(True))
    torch.testing.assert_close(method.center, 0.1 * mean)
    method.after_step(model, keys, 1, 10)
    torch.testing.assert_close(method.center, 0.9 * 0.1 * mean + 0.1 * mean)


def test_dino_student_sees_local_views_and_the_teacher_only_global_ones() -> None:
    from twinview.pretrain.objectives.losses import dino

    model, method = _model_and_method("dino", "augment.local_crops=2")
    views = _views(4)
    outputs, keys = method.embed(model, views), method.keys(views)
    assert len(outputs) == 4 and len(keys) == 2 and outputs[0].shape == (16, 12)
    assert outputs[0].abs().max() <= 1.0 + 1e-6  # cosine logits: normalised bottleneck and prototypes
    loss = method.loss(outputs, keys, torch.zeros(16))
    torch.testing.assert_close(loss, dino(outputs, keys, method.center, 0.1, method.teacher_temperature))
