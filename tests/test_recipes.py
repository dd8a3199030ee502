"""The shipped recipes state only what they change: a key whose value equals the default that
applies is either left out or pinned, on purpose, with a comment on its line saying why.

The default of a key is the value the key resolves to when the recipe does not set it: the recipe
is loaded once as shipped and once without that key, and the two values are compared. That takes
``augment.recipe`` into account (it fills other augment keys) and any other interplay of keys.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from omegaconf import OmegaConf

from twinview.pretrain.config import Config, DataConfig, load_config, recipe_path, shipped_recipes

# recipe -> the keys that restate their default on purpose: a paper's value the recipe reproduces,
# or a value its figures and comments depend on, which must not move with the default (each key's
# line says why in a comment)
PINNED: dict[str, set[str]] = {
    "demo": {"model.backbone", "objective.name"},
    "byol-cifar10": {"model.backbone", "train.batch_size"},
    "byol-photos": {"model.backbone", "train.batch_size"},
    "simsiam-cifar10": {
        "model.backbone",
        "model.predictor_hidden_dim",
        "optim.name",
        "optim.weight_decay",
        "train.batch_size",
    },
    "simsiam-photos": {
        "model.backbone",
        "model.predictor_hidden_dim",
        "optim.name",
        "optim.weight_decay",
        "train.batch_size",
    },
    "barlow-twins-cifar10": {"model.backbone", "objective.barlow_twins.lambd", "train.batch_size"},
    "barlow-twins-photos": {"model.backbone", "objective.barlow_twins.lambd", "train.batch_size"},
    "vicreg-cifar10": {
        "model.backbone",
        "objective.vicreg.sim_weight",
        "objective.vicreg.var_weight",
        "objective.vicreg.cov_weight",
        "train.batch_size",
    },
    "vicreg-photos": {
        "model.backbone",
        "objective.vicreg.sim_weight",
        "objective.vicreg.var_weight",
        "objective.vicreg.cov_weight",
        "train.batch_size",
    },
    "dino-cifar10": {"model.backbone", "train.batch_size"},
    "dino-photos": {"model.backbone", "train.batch_size"},
    "moco-v2-cifar10": {
        "model.backbone",
        "objective.moco_v2.momentum",
        "objective.moco_v2.queue_size",
        "objective.moco_v2.bn_splits",
        "train.batch_size",
    },
    "moco-v2-imagenet": {
        "model.proj_dim",
        "objective.moco_v2.temperature",
        "objective.moco_v2.symmetric",
        "optim.name",
        "optim.base_batch_size",
        "optim.momentum",
        "train.batch_size",
    },
    "moco-v2-photos": {
        "model.backbone",
        "objective.moco_v2.momentum",
        "objective.moco_v2.queue_size",
        "objective.moco_v2.bn_splits",
        "train.batch_size",
    },
    "moco-v3-vit-small": {"objective.moco_v3.temperature", "objective.moco_v3.momentum", "optim.base_batch_size"},
    "simclr-cifar10": {"model.backbone", "objective.name", "train.batch_size"},
    "simclr-imagenet": {"augment.recipe", "model.proj_dim", "objective.name", "optim.base_batch_size"},
    "simclr-photos": {
        "augment.recipe",
        "model.backbone",
        "objective.name",
        "objective.simclr.temperature",
        "train.batch_size",
    },
    "supcon-cifar10": {"train.batch_size"},
}

DATA_PATH = "/x"  # the recipes leave data.path to the command line; loading needs one


def _leaves(tree: Any, prefix: str = "") -> list[str]:
    """The dotted keys of the values (not sections) of a nested mapping; a list is a value."""
    if not isinstance(tree, dict):
        return [prefix[:-1]]
    return [leaf for key, value in tree.items() for leaf in _leaves(value, f"{prefix}{key}.")]


def _value(cfg: Config, dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        node = node[part] if isinstance(node, dict) else getattr(node, part)
    return node


def _without(tree: dict[str, Any], dotted: str) -> dict[str, Any]:
    """A copy of ``tree`` without the key ``dotted`` (and without sections it leaves empty)."""
    out = copy.deepcopy(tree)
    *parents, last = dotted.split(".")
    chain = [out]
    for part in parents:
        chain.append(chain[-1][part])
    del chain[-1][last]
    for parent, part in zip(reversed(chain[:-1]), reversed(parents), strict=True):
        if parent[part]:
            break
        del parent[part]
    return out


def _lines(path: Path) -> dict[str, str]:
    """The text of the line each dotted key's value is on."""
    text = path.read_text()
    rows = text.splitlines()
    out: dict[str, str] = {}

    def walk(node: yaml.Node, prefix: str) -> None:
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                walk(value, f"{prefix}{key.value}.")
        else:
            out[prefix[:-1]] = rows[node.start_mark.line]

    walk(yaml.compose(text), "")
    return out


def restated_defaults(path: Path, tmp_dir: Path) -> set[str]:
    """The dotted keys of the recipe at ``path`` whose value equals the one they resolve to when
    the recipe leaves them out."""
    tree = OmegaConf.to_container(OmegaConf.load(path))
    assert isinstance(tree, dict)
    shipped = load_config(path, [f"data.path={DATA_PATH}"])
    out = set()
    for key in _leaves(tree):
        if key == "data.path":  # the override would hide the recipe's value; its default is fixed
            if tree["data"]["path"] == DataConfig().path:
                out.add(key)
            continue
        reduced = tmp_dir / f"{path.stem}-without-{key}.yaml"
        reduced.write_text(OmegaConf.to_yaml(OmegaConf.create(_without(tree, key))))
        default = load_config(reduced, [f"data.path={DATA_PATH}"])
        if _value(default, key) == _value(shipped, key):
            out.add(key)
    return out


def unexplained_defaults(path: Path, pinned: set[str], tmp_dir: Path) -> list[str]:
    """What is wrong with the recipe at ``path`` given its pinned keys, one line per problem: a
    restated default that is not pinned, a pinned key without a comment on its line, a pinned key
    that is no longer in the recipe or no longer equal to its default."""
    restated = restated_defaults(path, tmp_dir)
    lines = _lines(path)
    problems = [f"{key}: restates the default; remove it or pin it" for key in sorted(restated - pinned)]
    for key in sorted(pinned):
        if key not in lines:
            problems.append(f"{key}: pinned but not in the recipe")
        elif key not in restated:
            problems.append(f"{key}: pinned but no longer equal to the default")
        elif not re.search(r"\s#\s*\S", lines[key]):
            problems.append(f"{key}: pinned without a comment on its line saying why")
    return problems


@pytest.mark.parametrize("name", shipped_recipes())
def test_a_recipe_states_only_what_it_changes(name: str, tmp_path: Path) -> None:
    problems = unexplained_defaults(recipe_path(name), PINNED.get(name, set()), tmp_path)
    assert not problems, f"configs/{name}.yaml:\n" + "\n".join(problems)


def test_pinned_names_only_shipped_recipes() -> None:
    assert set(PINNED) <= set(shipped_recipes())


def test_the_check_reports_an_unpinned_or_stale_default(tmp_path: Path) -> None:
    recipe = tmp_path / "fake.yaml"
    recipe.write_text(
        "data:\n"
        '  path: ""\n'  # the default, though loading needs a path
        "augment:\n"
        "  recipe: moco_v2\n"
        "  crop_scale: [0.2, 1.0]\n"  # what moco_v2 sets, though not the dataclass's default
        "  flip_p: 0.5  # pinned: a reason\n"
        "  jitter_strength: 0.5\n"
        "optim:\n"
        "  momentum: 0.9\n"
        "  lr: 0.3  # pinned: but not the default\n"
        "train:\n"
        "  mixed_precision: no\n"  # read as a boolean, meant as the word: the default
    )
    assert unexplained_defaults(recipe, {"augment.flip_p", "optim.lr", "model.backbone"}, tmp_path) == [
        "augment.crop_scale: restates the default; remove it or pin it",
        "data.path: restates the default; remove it or pin it",
        "optim.momentum: restates the default; remove it or pin it",
        "train.mixed_precision: restates the default; remove it or pin it",
        "model.backbone: pinned but not in the recipe",
        "optim.lr: pinned but no longer equal to the default",
    ]
    recipe.write_text("optim:\n  momentum: 0.9\n")
    assert unexplained_defaults(recipe, {"optim.momentum"}, tmp_path) == [
        "optim.momentum: pinned without a comment on its line saying why"
    ]
    assert unexplained_defaults(recipe, set(), tmp_path) == [
        "optim.momentum: restates the default; remove it or pin it"
    ]
