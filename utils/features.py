"""The output files: one per region, filled window by window (frame features straight to disk at
their offset, pooled features as running sums), written under a temporary name and renamed when
complete; this process's index rows and failures, and the merge of every process's tables."""

from __future__ import annotations

import io
import json
import logging
import math
import os
import struct
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import save_file

from utils.manifests import read_tsv, write_tsv

logger = logging.getLogger(__name__)

INDEX_COLUMNS = ["source", "output", "start", "end", "label", "num_frames", "shape", "frame_rate", "layers", "pooling"]
FAILURE_COLUMNS = ["source", "start", "end", "label", "reason"]


class FeatureWriter:
    """One output file, filled window by window, in any order.

    Frame features go straight to disk at their frame offset, so memory holds one batch whatever
    the length of the recording; pooled features are running sums (float64). The file is written
    under a temporary name and appears under its own only when complete.
    """

    def __init__(
        self,
        path: Path,
        fmt: str,
        pooling: str,
        layers_frames_dim: tuple[int, int, int],
        shape: tuple[int, ...],
        metadata: dict[str, str],
    ):
        self.path, self.tmp, self.fmt, self.pooling, self.shape, self.metadata = (
            path,
            path.with_name(path.name + ".partial"),
            fmt,
            pooling,
            shape,
            metadata,
        )
        self.num_layers, self.num_frames, self.dim = layers_frames_dim
        path.parent.mkdir(parents=True, exist_ok=True)
        if pooling == "none":
            header = self._header()
            self.data_offset = len(header)
            self.file = open(self.tmp, "wb")
            self.file.write(header)
            self.file.truncate(self.data_offset + 4 * math.prod(shape))
        else:
            self.sum = np.zeros((self.num_layers, self.dim), dtype=np.float64)
            self.sum_sq = np.zeros((self.num_layers, self.dim), dtype=np.float64)

    def _header(self) -> bytes:
        if self.fmt == "npy":
            buffer = io.BytesIO()
            np.lib.format.write_array_header_1_0(buffer, {"descr": "<f4", "fortran_order": False, "shape": self.shape})
            return buffer.getvalue()
        if self.fmt == "safetensors":
            header = {
                "features": {
                    "dtype": "F32",
                    "shape": list(self.shape),
                    "data_offsets": [0, 4 * math.prod(self.shape)],
                },
                "__metadata__": self.metadata,
            }
            text = json.dumps(header, separators=(",", ":")).encode()
            text += b" " * (-len(text) % 8)
            return struct.pack("<Q", len(text)) + text
        return b""  # pt: raw float32 until complete, then torch.save

    def add(self, features: np.ndarray, dest: int) -> None:
        """features: (layers, frames, dim) float32 for output frames [dest, dest + frames)."""
        if self.pooling == "none":
            for layer in range(self.num_layers):
                self.file.seek(self.data_offset + 4 * (layer * self.num_frames + dest) * self.dim)
                self.file.write(np.ascontiguousarray(features[layer], dtype="<f4").tobytes())
        else:
            wide = features.astype(np.float64)
            self.sum += wide.sum(axis=1)
            self.sum_sq += np.square(wide).sum(axis=1)

    def close(self) -> None:
        if self.pooling == "none":
            self.file.close()
            if self.fmt == "pt":
                raw = self.tmp.with_name(self.tmp.name + ".raw")
                os.replace(self.tmp, raw)
                torch.save(
                    torch.from_file(str(raw), shared=True, size=math.prod(self.shape), dtype=torch.float32).view(
                        self.shape
                    ),
                    self.tmp,
                )
                raw.unlink()
        else:
            mean = self.sum / self.num_frames
            pooled = mean
            if self.pooling == "meanstd":
                pooled = np.concatenate(
                    [mean, np.sqrt(np.maximum(self.sum_sq / self.num_frames - mean**2, 0))], axis=-1
                )
            pooled = pooled.astype(np.float32).reshape(self.shape)
            if self.fmt == "npy":
                with open(self.tmp, "wb") as f:
                    np.save(f, pooled)
            elif self.fmt == "pt":
                torch.save(torch.from_numpy(pooled), self.tmp)
            else:
                save_file({"features": pooled}, str(self.tmp), metadata=self.metadata)
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        if self.pooling == "none":
            self.file.close()
        self.tmp.unlink(missing_ok=True)


class OutputFiles:
    """This process's open output files, index rows and failures."""

    def __init__(
        self,
        output_dir: Path,
        fmt: str,
        pooling: str,
        layers_column: str,
        layer_axis: bool,
        dim: int,
        frame_rate: float,
    ):
        self.output_dir, self.fmt, self.pooling, self.layers_column = output_dir, fmt, pooling, layers_column
        self.num_layers, self.layer_axis, self.dim, self.frame_rate = (
            len(layers_column.split(",")),
            layer_axis,
            dim,
            frame_rate,
        )
        self.writers: dict[int, FeatureWriter] = {}
        self.windows_left: dict[int, int] = {}
        self.failed_sources: set[str] = set()
        self.failed_jobs: set[int] = set()
        self.rows: list[dict] = []
        self.failures: list[dict] = []
        self.finishing: set[int] | None = None  # after SIGTERM: the outputs still to complete

    def stop_when_open_files_complete(self, signalled: bool) -> bool:
        """After SIGTERM no output file is begun; True once those open at the signal are complete."""
        if signalled and self.finishing is None:
            self.finishing = set(self.writers)
        return self.finishing is not None and not self.finishing & self.writers.keys()

    def shape(self, num_frames: int) -> tuple[int, ...]:
        per_layer = (
            (num_frames, self.dim) if self.pooling == "none" else ((2 if self.pooling == "meanstd" else 1) * self.dim,)
        )
        return (self.num_layers, *per_layer) if self.layer_axis else per_layer

    def add(self, item: dict, features: np.ndarray) -> None:
        job_id, job = item["job"]
        if job.source in self.failed_sources or job_id in self.failed_jobs:
            return  # the file (or this output) failed after this window was read
        if self.finishing is not None and job_id not in self.writers:
            return  # begun after SIGTERM: left for the next run
        if not np.isfinite(features).all():  # an fp16 overflow, or a model with NaN weights
            reason = "non-finite features (NaN or Inf) from the model: an fp16 overflow (--dtype), or NaN weights"
            self.fail({"source": job.source, "job": item["job"], "reason": reason})
            return
        if job_id not in self.writers:
            metadata = {
                "source": job.source,
                "start": f"{job.start:.3f}",
                "end": f"{item['end']:.3f}",
                "frame_rate": f"{self.frame_rate:g}",
                "layers": self.layers_column,
                "pooling": self.pooling,
            }
            dims = (self.num_layers, item["num_frames"], self.dim)
            self.writers[job_id] = FeatureWriter(
                self.output_dir / job.output, self.fmt, self.pooling, dims, self.shape(item["num_frames"]), metadata
            )
            self.windows_left[job_id] = item["num_windows"]
        self.writers[job_id].add(features, item["window"].dest)
        self.windows_left[job_id] -= 1
        if self.windows_left[job_id] == 0:
            self.writers.pop(job_id).close()
            self.done(item)

    def done(self, item: dict) -> None:
        job = item["job"][1]
        self.rows.append(
            {
                "source": job.source,
                "output": job.output,
                "start": f"{job.start:.3f}",
                "end": f"{item['end']:.3f}",
                "label": job.label,
                "num_frames": item["num_frames"],
                "shape": "x".join(map(str, self.shape(item["num_frames"]))),
                "frame_rate": f"{self.frame_rate:g}",
                "layers": self.layers_column,
                "pooling": self.pooling,
            }
        )

    def fail(self, item: dict) -> None:
        logger.warning("skipping %s: %s", item["source"], item["reason"])
        if item["job"] is not None:  # one output: a segment, or a whole file's audio or features
            job_id, job = item["job"]
            self.failed_jobs.add(job_id)
            if job_id in self.writers:
                self.writers.pop(job_id).abort()
            self.failures.append(
                {
                    "source": job.source,
                    "start": job.start,
                    "end": job.end,
                    "label": job.label,
                    "reason": item["reason"],
                }
            )
            return
        self.failures.append({"source": item["source"], "reason": item["reason"]})
        self.failed_sources.add(item["source"])  # outputs of it not complete yet are dropped
        for job_id in [j for j, writer in self.writers.items() if writer.metadata["source"] == item["source"]]:
            self.writers.pop(job_id).abort()

    def abort_all(self) -> None:
        for writer in self.writers.values():
            writer.abort()
        self.writers.clear()


def merge_tables(output_dir: Path, name: str, columns: list[str], num_parts: int) -> int:
    """Join the per-process parts of a table into OUT/<name>.tsv, sorted by source and time."""
    rows = []
    for rank in range(num_parts):
        part = output_dir / f"{name}.rank{rank}.tsv"
        rows.extend(read_tsv(part, []))
        part.unlink()
    rows.sort(key=lambda r: (r["source"], float(r["start"] or 0), r.get("output", "")))
    write_tsv(output_dir / f"{name}.tsv", rows, columns)
    return len(rows)
