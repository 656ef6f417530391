"""utils/training.py: recipes and flags, and the deprecated flag names that still work."""

import warnings
from dataclasses import dataclass, field

import pytest

from utils.training import TrainingArguments, parse_args_with_recipe


@dataclass
class DevArguments:
    dev_manifest: str | None = field(default=None)
    dev_fraction: float = field(default=0.1)


def parse(argv):
    dev, training = parse_args_with_recipe([DevArguments, TrainingArguments], argv)
    return dev, training


def test_old_dev_flag_names_parse_as_the_new_ones_with_a_warning(tmp_path):
    expected = parse(["--dev_manifest", "dev.tsv", "--dev_fraction", "0.2"])
    with pytest.warns(FutureWarning, match="--eval_manifest is deprecated: use --dev_manifest"):
        with pytest.warns(FutureWarning, match="--eval_fraction is deprecated: use --dev_fraction"):
            assert parse(["--eval_manifest=dev.tsv", "--eval_fraction", "0.2"]) == expected
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("eval_manifest: dev.tsv\neval_fraction: 0.2\n")
    with pytest.warns(FutureWarning, match="eval_manifest is deprecated: use dev_manifest"):
        with pytest.warns(FutureWarning, match="eval_fraction is deprecated: use dev_fraction"):
            assert parse([str(recipe)]) == expected


@pytest.mark.parametrize("spelling", [["--eval-manifest", "dev.tsv"], ["--eval_man=dev.tsv"], ["--eval-m", "dev.tsv"]])
def test_old_dev_flag_names_work_in_every_spelling_argparse_takes(spelling):
    """HfArgumentParser takes '-' for '_' and argparse any unambiguous prefix: so did the old flags."""
    with pytest.warns(FutureWarning, match="--eval_manifest is deprecated: use --dev_manifest"):
        dev, _ = parse(spelling)
    assert dev.dev_manifest == "dev.tsv"


def test_prefixes_shared_with_current_flags_are_left_to_argparse(capsys):
    with pytest.raises(SystemExit):
        parse(["--eval", "x"])  # eval_manifest, eval_fraction, eval_steps: ambiguous, as it always was
    assert "ambiguous option: --eval" in capsys.readouterr().err


def test_current_flag_names_do_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dev, training = parse(["--dev_manifest", "d.tsv", "--max_train_steps", "7"])
    assert (dev.dev_manifest, training.max_train_steps) == ("d.tsv", 7)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--max_train_steps", "0"], "--max_train_steps must be at least 1, not 0"),
        (["--no_such_flag", "1"], "unrecognized arguments: --no_such_flag 1"),
    ],
)
def test_bad_flags_are_named(argv, message, capsys):
    with pytest.raises(SystemExit):
        parse(argv)
    assert message in capsys.readouterr().err


def test_a_recipe_with_an_unknown_key_is_named(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("max_train_steps: 5\nlearning_rat: 0.1\n")
    with pytest.raises(SystemExit):
        parse([str(recipe)])
    assert f"recipe {recipe} sets unknown option(s): learning_rat" in capsys.readouterr().err
