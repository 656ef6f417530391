"""probe.py's features: a model's hidden states of every layer, pooled over each labelled segment (or
kept per frame for --frame_level), computed in memory with extract_features.py's windows (chunked on
the grid of a whole-file pass, any length, any format or rate); and the model's self-supervised dev
figures on fixed crops, for models that have pretraining heads."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from transformers import Wav2Vec2ForPreTraining, Wav2Vec2Model

from utils.crops import CropStream, exit_on_unreadable
from utils.hourglass import model_class, read_config
from utils.objective import MaskAndNegatives, code_logits_of, crop_frames, pretraining_forward, to_device
from utils.pretrain_log import DevSums
from utils.probe_data import Segment, even_subset, frame_labels
from utils.probes import Bootstrap, best_layer, probe_layers
from utils.segments import Job
from utils.step_memory import reduce_step_memory
from utils.training import load_feature_extractor, make_loader
from utils.windows import WindowReader, as_is, batches, run_model, window_geometry

logger = logging.getLogger(__name__)
DEV_MASK_PROB, DEV_MASK_LENGTH, DEV_NEGATIVES = 0.65, 10, 100
# probe.py's defaults, which pretrain.py --probe_segments uses too.
PROBE_DEFAULTS = {
    "chunk_seconds": 30.0,
    "context_seconds": 5.0,
    "batch_size": 8,
    "max_frames_per_file": 3000,
    "bootstrap": 1000,
    "regularization": 1.0,
}


def load_probe_model(path: str, device):
    """(model in eval mode, its encoder, feature extractor): the pretraining model when the checkpoint
    has pretraining heads (then the dev figures can be computed), else the bare encoder."""
    try:
        config = read_config(path)
    except (OSError, ValueError) as error:
        raise ValueError(f"--models {path}: {error}") from None
    has_heads = any(name.endswith("ForPreTraining") for name in (config.architectures or []))
    standard = Wav2Vec2ForPreTraining if has_heads else Wav2Vec2Model
    try:
        model = model_class(config, standard).from_pretrained(path)
    except OSError as error:
        raise ValueError(f"--models {path}: {error}") from None
    return prepared(model, device), load_feature_extractor(path)


def prepared(model, device):
    model.to(device).eval()
    return model


def encoder_of(model):
    """The wav2vec2 encoder (the part whose hidden states are probed) of a pretraining or bare model."""
    return getattr(model, "wav2vec2", model)


def model_features(
    model,
    feature_extractor,
    segments: list[Segment],
    labels: list[str],
    frame_level: bool,
    options: dict,
) -> tuple[np.ndarray, np.ndarray, list[str], list[dict]]:
    """(features (items, layers, dim) float32, label index per item, participant per item, failures).

    Segment level: one item per segment, its frames' mean and standard deviation per layer. Frame
    level: the frames of each recording holding segments (at most options["max_frames_per_file"],
    evenly spread), labelled by utils.probe_data.frame_labels. options: chunk_seconds,
    context_seconds, batch_size, device, max_frames_per_file."""
    encoder, config = encoder_of(model), model.config
    geometry = window_geometry(config, options["chunk_seconds"], options["context_seconds"])
    if frame_level:
        by_file: dict[str, list[Segment]] = {}
        for s in segments:
            by_file.setdefault(s.source, []).append(s)
        jobs = [Job(source, "") for source in by_file]
    else:
        jobs = [Job(s.source, "", s.start, s.end) for s in segments]
    files: dict[str, list] = {}
    for job_id, job in enumerate(jobs):
        files.setdefault(job.source, []).append((job_id, job))
    reader = WindowReader(list(files.items()), Path("."), geometry, feature_extractor.do_normalize, False)
    pad_with_mask = geometry.pad_with_mask
    loader = torch.utils.data.DataLoader(reader, batch_size=None, num_workers=0, collate_fn=as_is)
    layers = list(range(config.num_hidden_layers + 1))
    sums, frames, failures, failed = {}, {}, [], set()
    for kind, payload in batches(loader, options["batch_size"], geometry.full_window, pad_with_mask):
        if kind == "note":  # an unreadable file, or a segment that cannot be read (then none of it counts)
            failures.append({"source": payload["source"], "reason": payload["reason"]})
            failed |= (
                {i for i, j in enumerate(jobs) if j.source == payload["source"]}
                if payload["job"] is None
                else {payload["job"][0]}
            )
            continue
        outputs = run_model(encoder, payload, layers, options["device"], torch.float32, pad_with_mask)
        for item, features in zip(payload, outputs):
            job_id, job = item["job"]
            if job_id in failed:
                continue
            if frame_level:
                if job_id not in frames:
                    frame_label = frame_labels(
                        by_file[job.source], labels, item["num_frames"], geometry.stride, geometry.receptive_field
                    )
                    chosen = even_subset(item["num_frames"], options["max_frames_per_file"])
                    chosen = chosen[frame_label[chosen] >= 0]
                    frames[job_id] = (chosen, frame_label[chosen], [], [])
                chosen, _, parts, positions = frames[job_id]
                window = item["window"]
                here = chosen[(chosen >= window.dest) & (chosen < window.dest + window.count)]
                parts.append(features[:, here - window.dest])
                positions.append(here)
            else:
                wide = features.astype(np.float64)
                total = sums.setdefault(job_id, [0, 0.0, 0.0])
                total[0] += wide.shape[1]
                total[1] = total[1] + wide.sum(axis=1)
                total[2] = total[2] + np.square(wide).sum(axis=1)
    if frame_level:
        participant_of_job = [by_file[job.source][0].participant for job in jobs]
        return collect_frames(participant_of_job, {i: f for i, f in frames.items() if i not in failed}, failures)
    index = {label: i for i, label in enumerate(labels)}
    kept = [i for i in range(len(jobs)) if i in sums and i not in failed]
    pooled = []
    for i in kept:
        count, total, total_sq = sums[i]
        mean = total / count
        pooled.append(np.concatenate([mean, np.sqrt(np.maximum(total_sq / count - mean**2, 0))], axis=-1))
    return (
        np.asarray(pooled, dtype=np.float32).reshape(len(kept), len(layers), -1),
        np.array([index[segments[i].label] for i in kept], dtype=np.int64),
        [segments[i].participant for i in kept],
        failures,
    )


def collect_frames(participant_of_job: list[str], frames: dict, failures: list[dict]):
    features, targets, participants = [], [], []
    for job_id, (_, frame_label, parts, positions) in sorted(frames.items()):
        order = np.argsort(np.concatenate(positions))
        stacked = np.concatenate(parts, axis=1)[:, order]
        features.append(stacked.transpose(1, 0, 2))
        targets.append(frame_label)
        participants += [participant_of_job[job_id]] * len(frame_label)
    return (
        np.concatenate(features).astype(np.float32),
        np.concatenate(targets),
        participants,
        failures,
    )


class _OneProcess:
    """DevSums sums over processes; here there is one."""

    @staticmethod
    def reduce(tensor, reduction):
        return tensor


def dev_figures(model, feature_extractor, dev_rows: list[dict], options: dict) -> dict | None:
    """Contrastive loss and accuracy per masked frame on the same fixed crops, masks and negatives for
    every model (pretrain.py's defaults: 65 % span starts of 10 frames, 100 negatives), so that
    models compare; None for a model without pretraining heads. options: dev_crop_seconds,
    dev_crops_per_file, seed."""
    if not hasattr(model, "quantizer"):
        return None
    reduce_step_memory(model)  # the same values; no (frames x codes x dim) product in the quantizer
    config = model.config
    num_frames = crop_frames(options["dev_crop_seconds"], config, DEV_MASK_LENGTH)
    transform = MaskAndNegatives(num_frames, DEV_MASK_PROB, DEV_MASK_LENGTH, DEV_NEGATIVES)
    stream = CropStream(
        [(dev_rows, 1.0)], 8, crop_seconds=options["dev_crop_seconds"], normalize=feature_extractor.do_normalize,
        transform=transform, epoch_multiplier=options["dev_crops_per_file"], seed=options["seed"], fixed=True,
        names=["--dev_manifest"],
    )  # fmt: skip
    sums = DevSums(config, model.device)
    with torch.no_grad(), code_logits_of(model) as code_logits:
        for batch in exit_on_unreadable(make_loader(stream, 0, batch_size=None)):
            inputs = to_device(batch, model.device)
            sums.add(pretraining_forward(model, inputs, config), inputs, code_logits.pop())
    row = sums.row(_OneProcess, 0)
    return {key: row[key] for key in ("dev_contrastive_loss", "dev_accuracy", "dev_crops")}


def probe_model(model, feature_extractor, data, options: dict) -> dict:
    """One model's probes on `data` (utils.probe_data.ProbeData): its per-layer results, the train
    and test labels, and the items that could not be read. options: as model_features's, and
    frame_level, bootstrap (resamples), regularization, seed."""
    features, targets, participants, failures = model_features(
        model, feature_extractor, data.segments, data.labels, options["frame_level"], options
    )
    train_index, test_index = data.split(participants)
    if len(train_index) == 0 or len(test_index) == 0:
        raise ValueError(
            f"no readable {'train' if len(train_index) == 0 else 'test'} item is left ({len(failures)} failure(s))"
        )
    layer_ids = options.get("layers") or list(range(features.shape[1]))
    if max(layer_ids) >= features.shape[1]:
        raise ValueError(
            f"--layers {','.join(map(str, layer_ids))}: the model has hidden states 0..{features.shape[1] - 1}"
        )
    resamples = Bootstrap(len(test_index), options["bootstrap"], options["seed"])
    layers = probe_layers(
        features, targets, train_index, test_index, len(data.labels), resamples, options["regularization"],
        options["seed"], layer_ids,
    )  # fmt: skip
    return {
        "layers": layers,
        "best_layer": best_layer(layers),
        "train_targets": targets[train_index],
        "test_targets": targets[test_index],
        "failures": failures,
    }
