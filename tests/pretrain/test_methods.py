"""Methods: their state round-trips through a checkpoint, including checkpoints of earlier versions."""

from __future__ import annotations

import pytest
import torch

from twinview.pretrain.config import load_config
from twinview.pretrain.models import create_model
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
    return create_method(cfg, create_model(cfg.model, predictor=registry.get(objective).predictor))


@pytest.mark.parametrize("objective", list(registry.OBJECTIVES))
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
