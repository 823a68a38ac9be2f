"""Bad values that used to pass config validation and failed later (or never): each must be a
``ConfigError`` at config time that names the key and the value."""

from __future__ import annotations

import pytest

from denoiselab.config import ConfigError
from denoiselab.train.build import load_train_config

# (overrides of the quickstart config, fragments the message must hold)
BAD = [
    # the batch order and flip streams are numpy seeds: a negative one failed at the first
    # batch, after the run folder was written, with "expected non-negative integer"
    (["seed=-1"], ["seed=-1", ">= 0"]),
    # AdamW refused it when the optimizer was built, without naming the key
    (["optim.weight_decay=-0.1"], ["optim.weight_decay=-0.1", ">= 0"]),
    # an unknown texture passed the config and failed when the dataset was built
    (["data.difficulty=hard", "data.textures=[wood]"], ["data.textures", "'wood'", "stripes"]),
    # an empty list silently meant "all textures"
    (["data.difficulty=hard", "data.textures=[]"], ["data.textures=[]", "null for all"]),
    # 'prepared' was told it needs a "latent cache" directory
    (["data.name=prepared", "data.difficulty=hard"], ["data.root=None", "prepare-data"]),
    # and a root on built-in data was said to be used by 'imagefolder' and 'latents' only
    (["data.root=/data"], ["data.root='/data'", "'prepared'"]),
]


@pytest.mark.parametrize("overrides, fragments", BAD, ids=[" ".join(o) for o, _ in BAD])
def test_bad_value_is_a_config_error_naming_it(overrides, fragments):
    with pytest.raises(ConfigError) as err:
        load_train_config("quickstart", overrides)
    for fragment in fragments:
        assert fragment in str(err.value)
