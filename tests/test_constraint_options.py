"""The constraint and residual-form settings of a run: resolved, recorded, never silently ignored.

Review M1: ``--lipschitz C`` without ``--spectral-norm`` used to be ignored while
config.json recorded C. Now a given bound switches the constraint on (so does the
contractive residual form, or a variant that carries a bound); an explicit
``--no-spectral-norm`` beside any of them is a usage error (exit 2); an
unconstrained run records ``lipschitz: null``.
"""

import json

import pytest
from click.testing import CliRunner

from iterconv_cli.main import cli
from iterconv_keras.config import TrainConfig

FAST = ["--variant", "tiny", "--epochs", "1", "--batch-size", "32", "--train-size", "64",
        "--validation-size", "0", "--test-size", "32"]


def _resolved(**settings):
    config = TrainConfig(**settings).validate()
    return config.spectral_norm, config.lipschitz, config.residual_form, config.alpha


@pytest.mark.parametrize(
    "settings, expected",
    [
        ({}, (False, None, "plain", None)),  # nothing recorded that was not applied
        ({"spectral_norm": True}, (True, 0.9, "plain", None)),
        ({"lipschitz": 0.5}, (True, 0.5, "plain", None)),  # a bound switches the constraint on
        ({"spectral_norm": False, "lipschitz": 0.7}, (True, 0.7, "plain", None)),
        ({"residual_form": "contractive"}, (True, 0.5, "contractive", 0.5)),
        ({"residual_form": "contractive", "lipschitz": 0.8, "alpha": 0.25}, (True, 0.8, "contractive", 0.25)),
        ({"variant": "small_contractive"}, (True, 0.5, "contractive", 0.5)),
        ({"variant": "small_contractive", "lipschitz": 0.3, "alpha": 1.0}, (True, 0.3, "contractive", 1.0)),
    ],
)
def test_settings_resolve_to_what_the_model_gets(settings, expected):
    assert _resolved(**settings) == expected


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"alpha": 0.3}, "alpha applies to residual_form 'contractive' only, got alpha=0.3"),
        ({"spectral_norm": True, "alpha": 0.3}, "alpha applies to residual_form='contractive' only"),
        ({"residual_form": "contractive", "lipschitz": 1.2}, "got lipschitz=1.2"),
        ({"residual_form": "contractive", "alpha": 2.0}, r"alpha must be a number in \(0, 1\], got 2.0"),
        ({"residual_form": "relaxed"}, "residual_form must be one of .*'relaxed'"),
        ({"lipschitz": -1.0}, "lipschitz must be a number > 0, got -1.0"),
    ],
)
def test_contradictory_settings_are_refused_with_the_value(settings, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**settings).validate()


def test_configs_written_before_the_fix_keep_their_meaning():
    # 0.1 recorded lipschitz 0.9 (or an ignored --lipschitz) for unconstrained runs.
    old = TrainConfig.from_dict({"variant": "tiny", "spectral_norm": False, "lipschitz": 0.5}).validate()
    assert (old.spectral_norm, old.lipschitz, old.residual_form) == (False, None, "plain")
    constrained = TrainConfig.from_dict({"variant": "tiny", "spectral_norm": True, "lipschitz": 0.7}).validate()
    assert (constrained.spectral_norm, constrained.lipschitz) == (True, 0.7)
    # A resolved config round-trips unchanged.
    config = TrainConfig(residual_form="contractive").validate()
    assert TrainConfig.from_dict(config.to_dict()).validate() == config


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--no-spectral-norm", "--lipschitz", "0.5"], "--lipschitz 0.5 needs the constraint"),
        (["--no-spectral-norm", "--residual-form", "contractive"], "--residual-form contractive needs the constraint"),
        (["--no-spectral-norm", "--variant", "small_contractive"],
         "--variant small_contractive carries the constraint"),
        (["--alpha", "0.5"], "--alpha applies to --residual-form 'contractive' only, got --alpha 0.5"),
    ],
)
def test_cli_refuses_an_explicit_contradiction(args, needle, tmp_path):
    result = CliRunner().invoke(cli, ["train", *args, "--out", str(tmp_path / "run")])
    assert result.exit_code == 2, (result.output, result.stderr)
    assert needle in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


def test_cli_lipschitz_switches_the_constraint_on_and_records_it(tmp_path):
    import keras

    out = tmp_path / "run"
    result = CliRunner().invoke(cli, ["train", *FAST, "--lipschitz", "0.6", "--residual-form", "contractive",
                                      "--alpha", "0.4", "--out", str(out), "--json"])
    assert result.exit_code == 0, result.stderr
    config = json.loads((out / "config.json").read_text())
    assert (config["spectral_norm"], config["lipschitz"], config["residual_form"], config["alpha"]) == (
        True, 0.6, "contractive", 0.4)
    model = keras.saving.load_model(out / "model.keras", compile=False)
    assert (model.lipschitz, model.residual_form, model.alpha) == (0.6, "contractive", 0.4)
    assert [b.contraction_bound for bs in model.stages for b in bs] == pytest.approx([1 - 0.4 * 0.4] * 4)
