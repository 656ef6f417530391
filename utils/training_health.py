"""Training health: pretrain.py's train-log rows watched for a run that is not learning. A run whose
contrastive loss sat at chance for 600 updates while its CNN features collapsed exited 0 with a model
worse than its random start (issue 13); now, over a window of --health_window updates, each of these
is a loud warning naming the likely cause and the flag to change, once per kind per run, in the log,
the row that fires it (`health`) and the model card; --stop_on_collapse makes the collapses a stop.
Pure functions of the rows, so a resumed run, fed the rows already logged, judges the same window."""

from __future__ import annotations

import logging
import math

from utils.checkpoints import list_checkpoints

logger = logging.getLogger(__name__)

CHANCE_SHARE = 0.97  # "at chance": every row's contrastive loss at least this share of ln(negatives + 1)
FEATURE_DROP = 100.0  # "collapsed": the CNN features' mean square this many times below its largest
PERPLEXITY_LOW = 0.05  # share of the way from the fewest codes (one per group) to all of them
PERPLEXITY_HIGH = 0.9  # share of all codes (groups x codes per group)
GRAD_DROP = 1e-3  # "vanished": the gradient norm this share of its largest
# The kinds --stop_on_collapse stops on; a loss at chance alone may still be a slow start.
STOP_KINDS = ("feature_collapse", "perplexity_collapse", "perplexity_saturation", "vanishing_gradient")
LOUD = "!" * 80


class HealthMonitor:
    """Judges every train row against the window of rows before it. `args`: pretrain.py's flag groups
    (utils.pretrain_arguments.Arguments, 'auto' values resolved); `config`: the model's; `history`: the
    log rows already written (a resumed run), whose `health` fields say which kinds have fired."""

    def __init__(self, args, config, history=(), log: bool = True):
        self.objective, self.model, self.training = args.objective, args.model, args.training
        self.window, self.log = self.objective.health_window, log
        self.chance = math.log(self.objective.num_negatives + 1)
        self.fewest = config.num_codevector_groups
        self.most = config.num_codevector_groups * config.num_codevectors_per_group
        self.rows: list[dict] = []
        self.largest: dict[str, tuple[float, int]] = {}  # feature_penalty, grad_norm: (value, step) so far
        self.first_step: int | None = None
        self.warned: dict[str, int] = {}  # kind -> the step it fired at
        self.stopping: tuple[str, int, str] | None = None  # (kind, step, message) under --stop_on_collapse
        for row in history:
            if "loss" in row:
                self._remember(row)
                self.warned.update(dict.fromkeys(row.get("health", {}), row["step"]))

    def _remember(self, row: dict) -> None:
        step = row["step"]
        self.first_step = step if self.first_step is None else self.first_step
        self.rows = [r for r in self.rows if r["step"] > step - self.window] + [row]
        for key in ("feature_penalty", "grad_norm"):
            value = row.get(key)
            if value is not None and math.isfinite(value) and value > self.largest.get(key, (-math.inf, 0))[0]:
                self.largest[key] = (value, step)

    def judged(self, step: int) -> bool:
        """Whether the window ending at `step` is whole and after the warmup (where a loss at chance is
        expected); a row at step s covers the --logging_steps updates up to s."""
        start = max(self.training.warmup_steps, self.first_step - self.training.logging_steps)
        return self.window > 0 and step - self.window >= start

    def observe(self, row: dict) -> dict[str, str]:
        """Takes the next train row; returns the warnings it fires ({kind: message}, each kind once per
        run), which are also logged (if `log`) and put in the row as `health`."""
        self._remember(row)
        if not self.judged(row["step"]):
            return {}
        found = {kind: text for kind, text in self.findings().items() if kind not in self.warned}
        for kind, text in found.items():
            self.warned[kind] = row["step"]
            if self.log:
                logger.warning("\n%s\ntraining health, step %d: %s\n%s", LOUD, row["step"], text, LOUD)
            if self.objective.stop_on_collapse and kind in STOP_KINDS and self.stopping is None:
                self.stopping = (kind, row["step"], text)
        if found:
            row["health"] = found
        return found

    def findings(self) -> dict[str, str]:
        """Every kind the current window shows, with its message."""
        rows, objective, model = self.rows, self.objective, self.model
        span = f"the last {self.window} updates (steps {rows[0]['step']}-{rows[-1]['step']})"
        losses = [r.get("contrastive_loss") for r in rows]
        at_chance = all(x is not None and x >= CHANCE_SHARE * self.chance for x in losses)
        penalty = f"--feature_penalty_weight {objective.feature_penalty_weight:g}"
        found = {}
        if at_chance:
            found["chance"] = (
                f"the contrastive loss has stayed at chance for {span}: {min(losses):.3f}-{max(losses):.3f}, chance "
                f"ln({objective.num_negatives} + 1) = {self.chance:.3f}; the model is not learning. Likely causes: a "
                f"feature penalty holding the CNN features down ({penalty}; try 0.001, or 0 with --feature_grad_mult "
                f"1), or a learning rate that does not suit the model (--learning_rate {self.training.learning_rate:g})"
            )
        peak, peak_step = self.largest.get("feature_penalty", (0.0, 0))
        features = [r.get("feature_penalty") for r in rows]
        if at_chance and peak > 0 and all(x is not None and x * FEATURE_DROP <= peak for x in features):
            found["feature_collapse"] = (
                f"the CNN features have collapsed while the loss is at chance: their mean square (feature_penalty) is "
                f"{features[-1]:.2g}, {peak / max(features[-1], 1e-30):.0f}x below its largest ({peak:.2g} at step "
                f"{peak_step}); the feature penalty ({penalty}, --feature_grad_mult {model.feature_grad_mult:g}) "
                "shrinks them faster than the model learns: lower it (--feature_penalty_weight 0.001), or set "
                "--feature_penalty_weight 0 --feature_grad_mult 1"
            )
        found.update(self._code_findings(span, at_chance))
        peak, peak_step = self.largest.get("grad_norm", (0.0, 0))
        norms = [r.get("grad_norm") for r in rows if r.get("grad_norm") is not None]
        if peak > 0 and norms and all(x <= GRAD_DROP * peak for x in norms):
            found["vanishing_gradient"] = (
                f"the gradient norm has stayed below {GRAD_DROP:g} x its largest for {span} ({max(norms):.2g}; "
                f"largest {peak:.2g} at step {peak_step}): the weights have almost stopped changing. Likely causes: "
                f"units killed by too high a learning rate (--learning_rate {self.training.learning_rate:g}), or CNN "
                f"features held at zero ({penalty}, --feature_grad_mult {model.feature_grad_mult:g})"
            )
        return found

    def _code_findings(self, span: str, at_chance: bool) -> dict[str, str]:
        """The quantizer's code perplexity (transformers': summed over groups, from `fewest` to `most`)."""
        objective, found = self.objective, {}
        values = [r.get("codevector_perplexity") for r in self.rows]
        if any(x is None for x in values):
            return found
        temperature = self.rows[-1].get("gumbel_temperature", math.nan)
        if all(x <= self.fewest + PERPLEXITY_LOW * (self.most - self.fewest) for x in values):
            cold = (
                f"the Gumbel schedule starts at step {objective.gumbel_start_step:,} (temperature {temperature:.2g}), "
                "at its floor, so a quantizer that never had a hot phase (fresh heads) gets none: --gumbel_start_step "
                "0, or "
                if objective.gumbel_start_step
                else "a hotter, longer Gumbel phase (--max_gumbel_temperature, --gumbel_temperature_decay), or "
            )
            found["perplexity_collapse"] = (
                f"the code perplexity has stayed near its minimum for {span}: at most {max(values):.1f}, of "
                f"{self.fewest} (one code per group) to {self.most} (all codes); the quantizer uses almost none of its "
                f"codebook, so the targets say little. Try {cold}a higher --diversity_loss_weight "
                f"({objective.diversity_loss_weight:g})"
            )
        if at_chance and all(x >= PERPLEXITY_HIGH * self.most for x in values):
            found["perplexity_saturation"] = (
                f"the code perplexity has stayed near its maximum while the loss is at chance for {span}: at least "
                f"{min(values):.1f} of {self.most}; the codes are close to uniform noise (Gumbel temperature "
                f"{temperature:.2g}), so there is nothing to predict. Cool the quantizer sooner: a lower "
                f"--max_gumbel_temperature ({objective.max_gumbel_temperature:g}) or --gumbel_temperature_decay "
                f"({objective.gumbel_temperature_decay:g}), or a lower --diversity_loss_weight "
                f"({objective.diversity_loss_weight:g})"
            )
        return found

    @property
    def stop(self) -> bool:
        return self.stopping is not None

    def error(self, output_dir) -> str:
        """The one-line error of a --stop_on_collapse stop; call after the checkpoint is saved."""
        kind, step, text = self.stopping
        found = list_checkpoints(output_dir)
        kept = f"checkpoint {found[-1]} holds the run" if found else "no checkpoint could be saved"
        return (
            f"error: training health, step {step} (--stop_on_collapse): {text}. The run stops without a final "
            f"model; {kept} (--resume_from_checkpoint latest continues it, e.g. without --stop_on_collapse)"
        )


def health_section(log: list[dict], objective, training) -> str:
    """The model card's "Training health" section: the warnings the run's log holds."""
    rows = [r for r in log if "loss" in r]
    fired = [(r["step"], kind, text) for r in rows for kind, text in r.get("health", {}).items()]
    window = objective.health_window
    if fired:
        lines = [f"- **step {step}, {kind.replace('_', ' ')}**: {text}" for step, kind, text in fired]
        verdict = "**This run showed signs of not learning:**\n\n" + "\n".join(lines)
    elif not window:
        verdict = "Not checked (`--health_window 0`)."
    elif not rows or rows[-1]["step"] - window < training.warmup_steps:
        verdict = f"Not judged: the run was shorter than `--health_window` ({window}) updates after the warmup."
    else:
        verdict = "No warning: the loss left chance, and no collapse of the CNN features, codes or gradients showed."
    return f"""
## Training health

Checked over every window of {window} updates after the warmup (`utils/training_health.py`): a contrastive
loss at chance (ln({objective.num_negatives} + 1) = {math.log(objective.num_negatives + 1):.3f}), collapsing CNN
features, a code perplexity at its minimum or (at chance) its maximum, a vanishing gradient norm.

{verdict}
"""
