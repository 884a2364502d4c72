"""Weight decay says what it does (review U4); the CLI's option tables come from the library (review D8)."""

import ast
import pathlib

import pytest

from iterconv_keras import compiling
from iterconv_keras.config import ADAMW_WEIGHT_DECAY, BLOCK_INITS, LR_SCHEDULES, OPTIMIZERS, TrainConfig


def _decay(**settings):
    return compiling.make_optimizer(TrainConfig(**settings).validate(), 10).weight_decay


def test_zero_weight_decay_switches_adamw_decay_off():
    # Before: 0 with adamw silently meant 1e-4, and AdamW's decay could not be switched off.
    assert _decay(optimizer="adamw", weight_decay=0) == 0.0
    assert _decay(optimizer="adamw", weight_decay=3e-3) == pytest.approx(3e-3)


@pytest.mark.parametrize("optimizer, expected", [("adamw", ADAMW_WEIGHT_DECAY), ("adam", None), ("sgd", None),
                                                 ("momentum", None)])
def test_default_weight_decay_is_resolved_and_recorded(optimizer, expected):
    config = TrainConfig(optimizer=optimizer).validate()
    assert config.weight_decay == (expected or 0.0)  # config.json records the decay applied
    assert _decay(optimizer=optimizer) == (pytest.approx(expected) if expected else None)


def test_an_unvalidated_adamw_config_gets_the_default_decay():
    # The benchmarks build optimizers from configs they never validate.
    optimizer = compiling.make_optimizer(TrainConfig(optimizer="adamw"), 10)
    assert optimizer.weight_decay == pytest.approx(ADAMW_WEIGHT_DECAY)


def test_old_adamw_configs_keep_their_1e4():
    old = TrainConfig(optimizer="adamw", weight_decay=0.0).to_dict()
    old["schedule"] = old.pop("lr_schedule")  # written before the rename: 0 meant 1e-4
    assert TrainConfig.from_dict(old).validate().weight_decay == ADAMW_WEIGHT_DECAY
    new = TrainConfig(optimizer="adamw", weight_decay=0.0).validate().to_dict()
    assert TrainConfig.from_dict(new).validate().weight_decay == 0.0


@pytest.mark.parametrize("bad", [-1e-3, float("nan"), True, "0.1"])
def test_bad_weight_decay_echoes_the_value(bad):
    with pytest.raises(ValueError, match="weight_decay must be a number >= 0, got"):
        TrainConfig(weight_decay=bad).validate()


def _choices(command):
    return {p.name: tuple(p.type.choices) for p in command.params if hasattr(p.type, "choices")}


def test_train_and_eval_options_take_their_choices_from_the_library():
    from iterconv_cli import eval_cmd, train_cmd
    from iterconv_keras.data import sources
    from iterconv_keras.models import variants

    choices = _choices(train_cmd.COMMAND)
    assert choices["optimizer"] == OPTIMIZERS
    assert choices["lr_schedule"] == LR_SCHEDULES
    assert choices["block_init"] == BLOCK_INITS
    assert choices["dataset"] == sources.DATASET_NAMES == _choices(eval_cmd.COMMAND)["dataset"]
    assert choices["variant"] == tuple(variants.list_variants())


def test_the_command_line_keeps_no_copy_of_the_dataset_or_variant_names():
    # A literal naming two or more datasets or variants in cli/ is a copy that drifts
    # when the library grows one (review D8); take the library's table instead.
    from iterconv_keras.data import sources
    from iterconv_keras.models import variants

    names = set(sources.DATASET_NAMES) | set(variants.list_variants())
    copies = []
    for path in sorted((pathlib.Path(__file__).resolve().parent.parent / "cli").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
                literal = {e.value for e in node.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)}
                if len(literal & names) >= 2:
                    copies.append(f"cli/{path.name}:{node.lineno}")
    assert not copies
