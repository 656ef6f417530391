"""Which region of which recording goes to which output file: input files, folders and manifests,
segment lists (RTTM or TSV), and the jobs made of them (one per output file)."""

from __future__ import annotations

import logging
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

from utils.audio import find_audio_files
from utils.manifests import escape_tsv, read_tsv, tsv_unsafe

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Job:
    """One output file: a region of a source recording (the whole recording when end is None)."""

    source: str
    output: str  # relative to the output folder
    start: float = 0.0
    end: float | None = None
    label: str = ""


def list_sources(inputs: list[str]) -> dict[str, str]:
    """{absolute audio path: output name}, the name being the path relative to its input folder, without extension."""
    sources: dict[str, str] = {}
    for item in inputs:
        path = Path(item)
        if path.suffix.lower() == ".tsv":
            sources.update(name_files([Path(row["path"]) for row in read_tsv(path, ["path"])]))
        elif path.is_dir():
            files = find_audio_files(path)
            if not files:
                logger.warning("no audio files in %s", item)
            sources.update(name_files(files, path))
        else:
            sources.update(name_files([path], path.parent))
    unsafe = [source for source in sources if tsv_unsafe(source)]
    if unsafe:  # found now, not when index.tsv is written at the end
        raise ValueError(
            f"{len(unsafe)} input path(s) hold a tab or line break, which index.tsv cannot list: "
            f"rename them, e.g. {escape_tsv(unsafe[0])}"
        )
    return sources


def name_files(files: list[Path], root: Path | None = None) -> dict[str, str]:
    """Output names mirror the files' paths below `root` (default: their deepest common folder)."""
    if not files:
        return {}
    paths = [os.path.abspath(f) for f in files]
    root = os.path.abspath(root) if root is not None else os.path.commonpath([os.path.dirname(p) for p in paths])
    return {p: Path(os.path.relpath(p, root)).with_suffix("").as_posix() for p in paths}


def is_rttm(path: str) -> bool:
    """An .rttm file, or one whose first line is an RTTM SPEAKER line (otherwise: a segments TSV)."""
    if path.lower().endswith(".rttm"):
        return True
    with open(path, encoding="utf-8-sig") as f:  # -sig: a BOM is not part of the first line
        return f.readline().startswith("SPEAKER ")


def read_segments(path: str) -> list[tuple[str, float, float, str]]:
    """(key, start, end, label) per segment; the key is the RTTM file id or the TSV's absolute path."""
    segments = []
    if is_rttm(path):
        with open(path, encoding="utf-8-sig") as f:
            lines = [(n, line.split()) for n, line in enumerate(f, 1)]
        for n, fields in lines:
            if not fields or fields[0] != "SPEAKER":
                continue
            try:
                start, duration = float(fields[3]), float(fields[4])
                label = fields[7]
            except (IndexError, ValueError):
                raise ValueError(
                    f"--segments {path} line {n}: not an RTTM SPEAKER line: {' '.join(fields)!r}"
                ) from None
            segments.append((fields[1], start, start + duration, label, n))
    else:
        for n, row in enumerate(read_tsv(path, ["path", "start", "end"]), 2):
            try:
                start, end = float(row["start"]), float(row["end"])
            except ValueError:
                raise ValueError(
                    f"--segments {path} line {n}: start/end {row['start']!r}, {row['end']!r} are not numbers"
                ) from None
            segments.append((os.path.abspath(row["path"]), start, end, row.get("label") or "", n))
    for _, start, end, _, n in segments:
        if not 0 <= start < end or not math.isfinite(end):
            raise ValueError(f"--segments {path} line {n}: needs 0 <= start < end, got start {start}, end {end}")
    return [s[:4] for s in segments]


def file_ids(sources) -> dict[str, str | None]:
    """{RTTM file id (file name without extension): its source}; None for an id that names several
    files, since an RTTM file id must name one."""
    ids: dict[str, str | None] = {}
    for source in sources:
        stem = Path(source).stem
        ids[stem] = None if stem in ids else source
    return ids


def make_jobs(sources: dict[str, str], segments: list | None, extension: str) -> list[Job]:
    """One job per source file, or per segment (from read_segments) of a source; ValueError when two
    jobs would write the same output file or a segment's file id matches several sources."""
    if segments is None:
        jobs = [Job(source, f"{name}.{extension}") for source, name in sources.items()]
    else:
        by_key = {source: (source, name) for source, name in sources.items()}
        for file_id, source in file_ids(sources).items():
            by_key[file_id] = None if source is None else (source, sources[source])
        jobs, unmatched, ambiguous = [], set(), set()
        for key, start, end, label in segments:
            if key not in by_key:
                unmatched.add(key)
            elif by_key[key] is None:
                ambiguous.add(key)
            else:
                source, name = by_key[key]
                suffix = "_" + re.sub(r"[^A-Za-z0-9.-]", "_", label) if label else ""
                jobs.append(
                    Job(
                        source,
                        f"{name}/{round(start * 1000):09d}-{round(end * 1000):09d}{suffix}.{extension}",
                        start,
                        end,
                        label,
                    )
                )
        if ambiguous:
            raise ValueError(
                f"--segments file id(s) {sorted(ambiguous)[:5]} match several input files; give the inputs in separate runs"
            )
        if unmatched:
            logger.warning(
                "%d segment file id(s)/path(s) match no input, e.g. %s", len(unmatched), sorted(unmatched)[:3]
            )
        if segments and not jobs:
            raise ValueError(
                "no --segments entry matches an input file (RTTM file ids are matched to file names without extension)"
            )
        jobs = list(dict.fromkeys(jobs))  # the same segment listed twice is extracted once
    by_output: dict[str, Job] = {}
    for job in jobs:
        other = by_output.setdefault(job.output, job)
        if other.source != job.source:
            raise ValueError(
                f"{other.source} and {job.source} would both be written to {job.output}; extract them into separate output folders"
            )
        if other != job:  # times equal to the millisecond, or labels equal once made file-name safe
            raise ValueError(
                f"--segments: two segments of {job.source} ({other.start}-{other.end} {other.label!r} and "
                f"{job.start}-{job.end} {job.label!r}) would both be written to {job.output}"
            )
    return jobs
