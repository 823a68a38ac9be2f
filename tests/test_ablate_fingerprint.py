"""A suite folder started before an option existed still continues: a setting absent from the
stored fingerprint that now holds its default is not a change; anything else still is."""

from __future__ import annotations

import json

import pytest

from denoiselab.ablate.runner import check_fingerprint
from denoiselab.ablate.suite import load_suite
from denoiselab.config import ConfigError


def _stored(tmp_path, fingerprint) -> None:
    """A finished variant started with ``fingerprint`` (settings bind once results exist)."""
    (tmp_path / "variant.json").write_text(json.dumps(fingerprint))
    (tmp_path / "done.json").write_text("{}")


def test_a_new_option_at_its_default_is_not_a_change(tmp_path):
    suite = load_suite("prediction_targets")
    name = suite.names[0]
    old = suite.fingerprint(name)
    del old["train"]["sample"]["eta"]  # as written before sample.eta existed
    _stored(tmp_path, old)
    check_fingerprint(suite, name, tmp_path)  # continues


def test_a_new_option_off_its_default_or_a_changed_value_is_refused(tmp_path):
    base = load_suite("prediction_targets")
    name = base.names[0]
    old = base.fingerprint(name)
    del old["train"]["sample"]["eta"]
    _stored(tmp_path, old)
    changed = load_suite("prediction_targets", sets=["sample.eta=2.0"])
    with pytest.raises(ConfigError, match=r"sample\.eta: None → 2\.0"):
        check_fingerprint(changed, name, tmp_path)
    old["train"]["optim"]["lr"] = 123.0
    _stored(tmp_path, old)
    with pytest.raises(ConfigError, match=r"optim\.lr: 123\.0 →"):
        check_fingerprint(base, name, tmp_path)
