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


def _method(objective: str) -> torch.nn.Module:
    cfg = load_config(
        None,
        [
            "data.path=x",
            f"objective.name={objective}",
            "model.proj_hidden_dim=16",
            "model.proj_dim=8",
            "model.predictor_hidden_dim=16",
            "objective.moco_v2.queue_size=32",
        ],
    )
    torch.manual_seed(0)
    return create_method(cfg, create_run_model(cfg))


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
