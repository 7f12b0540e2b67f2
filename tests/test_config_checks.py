"""Every key of the configuration is checked when it is set: numbers against a range, choices against the
values the code accepts (each list tied here to the registry it mirrors)."""
from __future__ import annotations

import pytest

from muva_core.config import CHOICES, RANGES, ConfigError, RunConfig, check_value


def test_every_numeric_key_has_a_range():
    flat = RunConfig().to_flat()
    numeric = {k for k, v in flat.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    assert numeric - set(RANGES) == set(), f"numeric keys without a range in config.RANGES: {numeric - set(RANGES)}"
    for key in numeric:
        check_value(key, flat[key], "defaults")     # every default is inside its own range


def test_choices_mirror_the_registries():
    from muva_core.data.synthetic import SCALES
    from muva_core.eval.distance import METRICS
    from muva_core.grounding import available_backends
    from muva_core.model.backbone import NAMED_CONFIGS
    from muva_core.model.muva import MASK_MODES

    assert set(CHOICES["synth_scale"]) == set(SCALES) - {"pretrain", "pretrain-wide"}  # the CLIP pretraining sets
    assert set(CHOICES["backend"]) == set(available_backends())
    assert set(CHOICES["backbone"]) == set(NAMED_CONFIGS)
    assert set(CHOICES["metric"]) == set(METRICS)
    from muva_core.eval import RERANK_METHODS

    assert set(CHOICES["rerank"]) == set(RERANK_METHODS)
    assert set(CHOICES["mask_mode"]) <= set(MASK_MODES)
    flat = RunConfig().to_flat()
    for key, values in CHOICES.items():
        if key in flat:
            assert flat[key] in values, f"default of {key} is not one of its choices"


@pytest.mark.parametrize("key, value, message", [
    ("seed", -1, "key 'seed' must be >= 0"),
    ("stage1_lr", 0.0, "key 'stage1_lr' must be > 0.0"),
    ("memory_momentum", 1.5, "key 'memory_momentum' must be in [0.0, 1.0]"),
    ("id_epsilon", 1.0, "key 'id_epsilon' must be in [0.0, 1.0)"),
    ("stage2_lr", float("nan"), "key 'stage2_lr' must be > 0.0, got nan"),
    ("device", "gpu", "key 'device' must be auto, cpu, cuda or cuda:N"),
    ("granularity", "G+L+H", "key 'granularity' must be G followed by any of +H, +U, +L in that order"),
    ("lr_milestones", [0, 10], "key 'lr_milestones' must be a list of epochs >= 1"),
    ("augment", "flip+crop", "key 'augment' must be one of flip, flip+crop+erase, flip+color, flip+crop+erase+color, got 'flip+crop'"),
])
def test_out_of_range_values_name_the_key(key, value, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")
                       .replace("]", r"\]").replace("+", r"\+")):
        RunConfig().update({key: value})


def test_cross_key_checks():
    with pytest.raises(ConfigError, match="must be a multiple of patch_size"):
        RunConfig().update({"height": 250}).validate()
    with pytest.raises(ConfigError, match="lr_milestones must be increasing"):
        RunConfig().update({"lr_milestones": [50, 30]}).validate()


def test_reference_recipe_resizes_test_images_bilinearly():
    from torchvision.transforms import InterpolationMode

    from muva_core.eval.features import test_transform

    assert test_transform(RunConfig()).interpolation == InterpolationMode.BICUBIC
    ref = RunConfig().update({"recipe": "reference"})
    assert ref.data.test_resize == "bilinear" and test_transform(ref).interpolation == InterpolationMode.BILINEAR
    assert ref.train.amp_dtype == "float16"


def test_a_yes_or_no_for_a_key_of_named_values_names_the_values():
    """`-p cache_images=false` (a bool to YAML) for a key that takes words: the message lists the words."""
    from muva_core.config import ConfigError, resolve_config

    with pytest.raises(ConfigError, match=r"key 'cache_images' expects str \(one of auto, always, never\), got False"):
        resolve_config("synth:A2B", overrides={"cache_images": False})
