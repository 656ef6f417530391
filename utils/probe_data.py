"""probe.py's data: labelled segments (a TSV or RTTM files), their participants, the split of the
participants into probe-train and probe-test (never one participant in both), and, for frame-level
probes, the label of every 50 Hz frame of a recording."""

from __future__ import annotations

import logging
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soundfile as sf

from utils.audio import TARGET_SAMPLE_RATE
from utils.manifests import read_tsv
from utils.segments import file_ids, is_rttm, list_sources, read_segments

logger = logging.getLogger(__name__)

# Frames outside every segment, in --frame_level probes.
BACKGROUND = "background"
# A segment may end this far past its file's end (rounding, a labeller's tool) and is then cut there.
END_TOLERANCE_SECONDS = 0.5


@dataclass(frozen=True)
class Segment:
    source: str  # absolute audio path
    start: float
    end: float
    label: str
    participant: str


@dataclass
class ProbeData:
    """The usable segments, their label names (sorted) and the participants of each split."""

    segments: list[Segment]
    labels: list[str]
    train_participants: list[str]
    test_participants: list[str]
    skipped: list[dict] = field(default_factory=list)  # {"source", "start", "end", "reason"}
    seed: int = 0  # of the split; the bootstrap and the probes use it too

    def split(self, participants_of_items: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Indices of the items in the train and in the test split."""
        test = set(self.test_participants)
        in_test = np.array([p in test for p in participants_of_items], dtype=bool)
        return np.flatnonzero(~in_test), np.flatnonzero(in_test)


def read_labelled_segments(paths: list[str], audio_dir: str | None, participant_regex: str) -> list[Segment]:
    """Segments from one TSV (path, start, end, label[, participant]) or RTTM files matched to the audio
    files under `audio_dir` by file name without extension."""
    try:
        pattern = re.compile(participant_regex)
    except re.error as error:
        raise ValueError(f"--participant_regex {participant_regex!r}: {error}") from None
    rttm = [is_rttm(p) for p in paths]
    if any(rttm) and not all(rttm):
        raise ValueError("--segments: give one TSV, or RTTM files only")
    if not all(rttm) and len(paths) > 1:
        raise ValueError("--segments: give one TSV (or several RTTM files)")
    by_stem: dict[str, str | None] = {}
    if all(rttm):
        if not audio_dir:
            raise ValueError("--segments RTTM files name file ids, not paths: give --audio_dir")
        by_stem = file_ids(list_sources([audio_dir]))
    participants = {}
    parsed = {path: read_segments(path) for path in paths}  # checks the times first, naming file and line
    if not all(rttm):  # the TSV's own participant column, when it has one
        for row in read_tsv(paths[0], ["path", "start", "end", "label"]):
            if row.get("participant"):
                key = (os.path.abspath(row["path"]), float(row["start"]), float(row["end"]))
                participants[key] = row["participant"]
    segments = []
    for path in paths:
        for key, start, end, label in parsed[path]:
            if not label:
                raise ValueError(f"--segments {path}: a segment of {key} at {start:g} s has no label")
            source = key
            if all(rttm):
                source = by_stem.get(key, "")
                if source is None:
                    raise ValueError(f"--segments {path}: file id {key!r} names several files under --audio_dir")
                if not source:
                    raise ValueError(f"--segments {path}: file id {key!r} matches no audio file under --audio_dir")
            participant = participants.get((source, start, end))
            if participant is None:
                match = pattern.search(Path(source).name)
                if not match:
                    raise ValueError(
                        f"--segments {path}: no participant for {source}: the TSV has no participant column "
                        f"and --participant_regex {participant_regex!r} does not match the file name"
                    )
                participant = match.group(1) if match.groups() else match.group(0)
            segments.append(Segment(source, start, end, label, participant))
    if not segments:
        raise ValueError(f"--segments {', '.join(paths)}: no segments")
    return segments


def check_files(segments: list[Segment]) -> tuple[list[Segment], list[dict], dict[str, float]]:
    """Drop (and list) the segments of unreadable files and those outside their file; a segment
    ending up to END_TOLERANCE_SECONDS past the end is cut there. Returns the file durations too."""
    durations, kept, skipped = {}, [], []
    for source in sorted({s.source for s in segments}):
        try:
            durations[source] = sf.info(source).duration
        except Exception as error:  # libsndfile raises several types; any of them means unreadable
            durations[source] = None
            logger.warning("skipping %s: unreadable: %s", source, str(error).strip() or type(error).__name__)
    for s in segments:
        duration = durations[s.source]
        reason = None
        if duration is None:
            reason = "unreadable file"
        elif s.start >= duration or s.end > duration + END_TOLERANCE_SECONDS:
            reason = f"outside the file ({duration:.3f} s long)"
        if reason:
            skipped.append({"source": s.source, "start": s.start, "end": s.end, "reason": reason})
            continue
        kept.append(Segment(s.source, s.start, min(s.end, duration), s.label, s.participant))
    if skipped:
        logger.warning("skipping %d segment(s), e.g. %s", len(skipped), describe(skipped[0]))
    return kept, skipped, {k: v for k, v in durations.items() if v is not None}


def describe(skip: dict) -> str:
    return f"{skip['source']} {skip['start']:g}-{skip['end']:g} s: {skip['reason']}"


def split_participants(
    participants: list[str], test_participants: list[str] | None, test_fraction: float, seed: int
) -> tuple[list[str], list[str]]:
    """(train, test) participant ids: those named, or a seeded share of them (at least one on each side)."""
    known = sorted(set(participants))
    if len(known) < 2:
        raise ValueError(
            f"the segments have one participant ({known[0]}): probes are scored on participants they were not "
            "trained on; give segments of several participants (or a --participant_regex that tells them apart)"
        )
    if test_participants:
        unknown = sorted(set(test_participants) - set(known))
        if unknown:
            raise ValueError(f"--test_participants {','.join(unknown)}: not among the segments' participants {known}")
        test = sorted(set(test_participants))
    else:
        count = min(len(known) - 1, max(1, round(test_fraction * len(known))))
        test = sorted(random.Random(seed).sample(known, count))
    train = [p for p in known if p not in test]
    if not train:
        raise ValueError("--test_participants names every participant: none is left to train the probes on")
    return train, test


def prepare(
    segments: list[Segment], test_participants: list[str] | None, test_fraction: float, seed: int, frame_level: bool
) -> ProbeData:
    """Split by participant and check the labels: every label scored in test must occur in train."""
    kept, skipped, _ = check_files(segments)
    if not kept:
        raise ValueError("no usable segment: every one is in an unreadable file or outside its file")
    train, test = split_participants([s.participant for s in kept], test_participants, test_fraction, seed)
    labels = sorted({s.label for s in kept} | ({BACKGROUND} if frame_level else set()))
    train_labels = {s.label for s in kept if s.participant in train}
    test_labels = {s.label for s in kept if s.participant in test}
    if frame_level:
        train_labels.add(BACKGROUND)
    unseen = sorted(test_labels - train_labels)
    if unseen:
        raise ValueError(
            f"label(s) {unseen} occur in the test participants' segments ({','.join(test)}) but in no train "
            "participant's: a probe cannot predict a class it never saw; choose other --test_participants"
        )
    missing = sorted(train_labels - test_labels - {BACKGROUND})
    if missing:
        logger.warning("label(s) %s have no test segment: they are trained on but not scored", missing)
    return ProbeData(kept, labels, train, test, skipped, seed)


def frame_labels(segments: list[Segment], labels: list[str], num_frames: int, stride: int, receptive_field: int):
    """The label index of each frame of one recording by the frame's centre (BACKGROUND outside every
    segment), and -1 where segments of different labels overlap (left out: no single truth)."""
    index = {label: i for i, label in enumerate(labels)}
    centres = (np.arange(num_frames) * stride + receptive_field / 2) / TARGET_SAMPLE_RATE
    out = np.full(num_frames, index[BACKGROUND], dtype=np.int64)
    covered = np.zeros(num_frames, dtype=bool)
    for s in segments:
        inside = (centres >= s.start) & (centres < s.end)
        clash = inside & covered & (out != index[s.label])
        out[inside & ~covered] = index[s.label]
        out[clash] = -1
        covered |= inside
    return out


def even_subset(count: int, limit: int) -> np.ndarray:
    """At most `limit` indices out of range(count), evenly spread."""
    if count <= limit:
        return np.arange(count)
    return np.unique(np.floor(np.arange(limit) * count / limit).astype(np.int64))
