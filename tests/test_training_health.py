"""Training health (utils/training_health.py): the monitor on a real demo log and on synthetic rows, and
a real tiny run under today's defaults that sits at chance while its CNN features collapse."""

import json
import logging
import math
from pathlib import Path

import pytest
from helpers import REPO, flags, log_rows, run_script
from test_pretrain import learnable_corpus
from transformers import Wav2Vec2Config

from utils.pretrain_arguments import (
    Arguments,
    DataArguments,
    ModelArguments,
    ObjectiveArguments,
    resolve_objective_defaults,
)
from utils.training import TrainingArguments, parse_args_with_recipe
from utils.training_health import STOP_KINDS, HealthMonitor, health_section

# The log of configs/recipes/demo-tiny.yaml (400 updates, 20 negatives): at chance (ln 21 = 3.045) from
# about step 20 to 230 while the quantizer is hot, then down to 2.74; a healthy run.
DEMO_LOG = Path(__file__).parent / "data" / "demo_pretrain_log.jsonl"
TINY = REPO / "configs" / "tiny-wav2vec2-base"  # 2 groups x 32 codes: perplexity 2 to 64


def arguments(*argv: str, recipe: str | None = "configs/recipes/demo-tiny.yaml") -> Arguments:
    """pretrain.py's flag groups from the recipe and flags, with the 'auto' values resolved."""
    groups = [ModelArguments, DataArguments, ObjectiveArguments, TrainingArguments]
    args = Arguments(*parse_args_with_recipe(groups, ([str(REPO / recipe)] if recipe else []) + list(argv)))
    resolve_objective_defaults(args.model, args.objective, Wav2Vec2Config.from_pretrained(TINY))
    return args


def feed(monitor: HealthMonitor, rows) -> dict[int, dict[str, str]]:
    """{step: warnings} for the rows that fire any."""
    fired = {}
    for row in rows:
        found = monitor.observe(dict(row))
        if found:
            fired[row["step"]] = found
    return fired


def demo_rows() -> list[dict]:
    return [json.loads(line) for line in DEMO_LOG.read_text().splitlines()]


def test_the_demo_log_gives_no_warning(caplog):
    config = Wav2Vec2Config.from_pretrained(TINY)
    rows = [r for r in demo_rows() if "loss" in r]
    assert (config.num_codevector_groups, config.num_codevectors_per_group) == (2, 32)
    with caplog.at_level(logging.WARNING):
        assert feed(HealthMonitor(arguments(), config), rows) == {}  # the default window: 500 updates
        # A window that fits in the run after its 30 warmup updates is judged at steps 330-400: no warning either.
        assert feed(HealthMonitor(arguments("--health_window", "300"), config), rows) == {}
    assert "training health" not in caplog.text
    # Why 500: the demo sits at chance, its codes near-uniform (perplexity ~60 of 64, hot quantizer), for
    # about 220 updates before it learns; a window shorter than that plateau calls it stuck.
    fired = feed(HealthMonitor(arguments("--health_window", "150", "--stop_on_collapse"), config), rows)
    assert {kind for found in fired.values() for kind in found} == {"chance", "perplexity_saturation"}
    card = health_section(demo_rows(), arguments().objective, arguments().training)
    assert "## Training health" in card and "Not judged" in card and "(500)" in card


def synthetic(steps=range(10, 210, 10), loss=2.0, features=0.3, perplexity=40.0, grad=0.5) -> list[dict]:
    """Train rows every 10 updates; each figure a number or a function of the step."""
    value = lambda x, step: x(step) if callable(x) else x  # noqa: E731
    return [
        {
            "step": step,
            "loss": value(loss, step),
            "contrastive_loss": value(loss, step),
            "feature_penalty": value(features, step),
            "codevector_perplexity": value(perplexity, step),
            "grad_norm": value(grad, step),
            "gumbel_temperature": 1.5,
        }
        for step in steps
    ]


CHANCE = math.log(21)  # the demo recipe's 20 negatives


@pytest.mark.parametrize(
    "rows, argv, kinds, flag",
    [
        (synthetic(loss=CHANCE * 0.98), [], {"chance"}, "--feature_penalty_weight"),
        (
            synthetic(loss=CHANCE, features=lambda s: 0.3 * 0.9**s),
            [],
            {"chance", "feature_collapse"},
            "--feature_grad_mult",
        ),
        (synthetic(perplexity=2.5), [], {"perplexity_collapse"}, "--diversity_loss_weight"),
        (
            synthetic(perplexity=2.5),
            ["--gumbel_start_step", "400000"],
            {"perplexity_collapse"},
            "--gumbel_start_step 0",
        ),
        (
            synthetic(loss=CHANCE * 1.01, perplexity=62),
            [],
            {"chance", "perplexity_saturation"},
            "--gumbel_temperature_decay",
        ),
        (synthetic(grad=lambda s: 1.0 if s < 50 else 5e-4), [], {"vanishing_gradient"}, "--learning_rate"),
    ],
    ids=["chance", "feature_collapse", "perplexity_collapse", "cold_quantizer", "perplexity_saturation", "gradient"],
)
def test_each_kind_fires_once_and_names_the_flag(rows, argv, kinds, flag, caplog):
    monitor = HealthMonitor(arguments("--health_window", "50", *argv), Wav2Vec2Config.from_pretrained(TINY))
    with caplog.at_level(logging.WARNING):
        fired = feed(monitor, rows)
    assert {kind for found in fired.values() for kind in found} == kinds
    assert sum(len(found) for found in fired.values()) == len(kinds)  # once per kind per run
    assert all(step >= 30 + 50 for step in fired)  # a whole window after the 30 warmup updates
    text = " ".join(t for found in fired.values() for t in found.values())
    assert flag in text and caplog.text.count("training health, step") == len(kinds)
    assert not monitor.stop  # --stop_on_collapse not given


def test_stop_on_collapse_stops_on_collapses_only_and_names_the_checkpoint(tmp_path):
    config = Wav2Vec2Config.from_pretrained(TINY)
    at_chance = HealthMonitor(arguments("--health_window", "50", "--stop_on_collapse"), config, log=False)
    feed(at_chance, synthetic(loss=CHANCE))
    assert "chance" in at_chance.warned and not at_chance.stop  # a slow start may still learn
    collapsed = HealthMonitor(arguments("--health_window", "50", "--stop_on_collapse"), config, log=False)
    fired = feed(collapsed, synthetic(loss=CHANCE, features=lambda s: 0.3 * 0.9**s))
    (tmp_path / "checkpoints" / "checkpoint-100").mkdir(parents=True)
    error = collapsed.error(tmp_path)
    assert collapsed.stop and collapsed.stopping[0] == "feature_collapse" in STOP_KINDS
    assert error.startswith("error: training health, step 100 (--stop_on_collapse)") and "\n" not in error
    assert str(tmp_path / "checkpoints" / "checkpoint-100") in error and "--feature_penalty_weight" in error
    # Chance once a whole window follows the warmup (30 + 50); the features are 100x below their largest
    # (0.3 x 0.9^10, step 10) from step 60 on, so over a whole window at step 100.
    assert {step: list(found) for step, found in fired.items()} == {80: ["chance"], 100: ["feature_collapse"]}


def test_a_resumed_monitor_judges_the_same_windows(caplog):
    config = Wav2Vec2Config.from_pretrained(TINY)
    rows = synthetic(steps=range(10, 410, 10), loss=lambda s: CHANCE, features=lambda s: 0.3 * 0.95**s)
    args = arguments("--health_window", "100", "--warmup_steps", "0")
    whole = HealthMonitor(args, config, log=False)
    expected = feed(whole, rows)
    # Chance once the window is whole; the features are 100x below their largest (step 10) from step 100
    # on, so over a whole window at step 190.
    assert {step: list(found) for step, found in expected.items()} == {100: ["chance"], 190: ["feature_collapse"]}
    written = [dict(r, health=expected[r["step"]]) if r["step"] in expected else r for r in rows]
    for cut in (60, 120, 200):  # before either warning, between them, after both
        resumed = HealthMonitor(args, config, history=written[: cut // 10], log=False)
        assert {step: found for step, found in expected.items() if step > cut} == feed(resumed, rows[cut // 10 :])
        assert resumed.warned == whole.warned


def test_warmup_and_window_zero_are_not_judged():
    config = Wav2Vec2Config.from_pretrained(TINY)
    rows = synthetic(loss=CHANCE)  # steps 10-200
    assert min(feed(HealthMonitor(arguments("--health_window", "50", "--warmup_steps", "100"), config), rows)) == 150
    assert feed(HealthMonitor(arguments("--health_window", "0"), config), rows) == {}
    assert "Not checked" in health_section(rows, arguments("--health_window", "0").objective, arguments().training)


# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return learnable_corpus(tmp_path_factory.mktemp("health"))


def collapsing_run(corpus: Path, output_dir: Path, *extra: str):
    """Today's defaults for the tiny group-norm model (feature penalty 10 and feature_grad_mult 0.1 as
    fairseq, 100 negatives): at 1e-2 the CNN features' mean square falls from 0.16 to ~1e-3 in 15
    updates while the loss stays at chance (at the default 5e-5 it took 600 updates: 0.16 -> 1.7e-3)."""
    options = dict(
        config_name=TINY,
        train_manifest=corpus / "train.tsv",
        output_dir=output_dir,
        crop_seconds=1.0,
        epoch_multiplier=8,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        max_train_steps=40,
        logging_steps=1,
        health_window=10,
        eval_steps=0,
        save_steps=0,
        num_workers=0,
        report_to="none",
    )
    # One thread: the tests share two cores, where torch's thread pool under contention ran 4-6x slower.
    return run_script("pretrain.py", *flags(**options), *extra, env_extra={"OMP_NUM_THREADS": "1"}, check=False)


@pytest.mark.slow
def test_a_run_at_chance_with_collapsing_features_is_warned_about(corpus, tmp_path):
    result = collapsing_run(corpus, tmp_path / "run")
    assert result.returncode == 0, result.stderr[-3000:]
    log = result.stderr
    assert "training health, step 10: the contrastive loss has stayed at chance" in log
    assert "--feature_penalty_weight 10" in log and "ln(100 + 1) = 4.615" in log
    assert "the CNN features have collapsed while the loss is at chance" in log
    rows = [r for r in log_rows(tmp_path / "run") if "loss" in r]
    fired = {kind: r["step"] for r in rows for kind in r.get("health", {})}
    assert fired["chance"] == 10 and 10 < fired["feature_collapse"] < 40
    collapse = rows[fired["feature_collapse"] - 1]
    assert rows[0]["feature_penalty"] >= 100 * collapse["feature_penalty"]
    assert collapse["contrastive_loss"] >= 0.97 * math.log(101)
    card = (tmp_path / "run" / "README.md").read_text()
    section = card[card.index("## Training health") : card.index("## How to use")]
    assert "step 10, chance" in section and "feature collapse" in section and "--feature_grad_mult" in section
    assert (tmp_path / "run" / "model.safetensors").is_file()


@pytest.mark.slow
def test_stop_on_collapse_keeps_a_checkpoint_and_saves_no_model_then_resumes(corpus, tmp_path):
    output_dir = tmp_path / "run"
    result = collapsing_run(corpus, output_dir, "--stop_on_collapse")
    assert result.returncode != 0
    error = result.stderr.strip().splitlines()[-1]
    step = max(r["step"] for r in log_rows(output_dir))
    checkpoint = output_dir / "checkpoints" / f"checkpoint-{step}"
    assert error.startswith(
        f"error: training health, step {step} (--stop_on_collapse): the CNN features have collapsed"
    )
    assert str(checkpoint) in error and checkpoint.is_dir() and step < 40
    assert not (output_dir / "model.safetensors").exists() and not (output_dir / "README.md").exists()
    # Resumed without the flag: the warnings are not repeated (the history comes from the log), the card keeps them.
    resumed = collapsing_run(corpus, output_dir, "--resume_from_checkpoint", "latest")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "training health, step" not in resumed.stderr and "health=chance,feature_collapse" in resumed.stderr
    card = (output_dir / "README.md").read_text()
    assert "step 10, chance" in card and f"step {step}, feature collapse" in card
