"""CTC training batches from a streamed Hugging Face dataset (--dataset_streaming), for corpora larger
than the disk. Examples come in stream order, shuffled in a buffer afresh on every pass; each process
reads its own share (datasets.distributed.split_dataset_by_node); batches group similar lengths
within a bucket of a few batches. The stream never ends (a finished pass starts the next), so every
process always has a next batch. Batches are a pure function of the seed and the stream: a resumed
run reads the stream again up to its position, reading audio headers only, and goes on exactly.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from utils.audio import TARGET_SAMPLE_RATE, conv_frames, normalize_waveform, read_resampled, target_length
from utils.ctc import min_frames_for
from utils.hf_datasets import allow_undecoded_audio, examples, open_audio_value, resident_audio, value_label
from utils.vocabulary import normalize_text

BUCKET_BATCHES = 16  # batches sorted by length together: the audio of one bucket is held (encoded) in memory


class StreamPlan:
    """The position of a stream, as the training loop keeps it: a stream has no epochs known in
    advance, so the position is (0, batches served); `batches_per_epoch` (for the log's `epoch`)
    is estimated from the number of utterances."""

    def __init__(self, utterances: int, batch_size: int, world_size: int = 1):
        self.batches_per_epoch = max(1, utterances // (batch_size * world_size))

    def iterate(self, epoch: int = 0, batch: int = 0):
        while True:
            yield epoch, batch, None
            batch += 1


class UtteranceStream(torch.utils.data.IterableDataset):
    """Lists of utterances ({'index', 'input_values', 'labels'}, or {'error': (name, reason)} for one
    that could not be read) from a streamed split, read by one DataLoader worker. Utterances too
    short for their transcript, and with `--long_utterances skip` those above the maximum duration,
    are left out and counted (warned about at the 1st, 10th, 100th, ...); longer ones otherwise
    get batches of their own."""

    def __init__(self, dataset, data_args, tokenizer, geometry, normalize, batch_size, seed, rank=0, world_size=1):
        self.dataset, self.tokenizer, self.geometry, self.normalize = dataset, tokenizer, geometry, normalize
        self.audio_column, self.text_column = data_args.audio_column_name, data_args.text_column_name
        self.chars_to_ignore, self.lowercase = data_args.chars_to_ignore, data_args.do_lower_case
        self.word_separators = data_args.word_separators
        self.max_duration, self.skip_long = data_args.max_duration_seconds, data_args.long_utterances == "skip"
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.buffer_size = data_args.stream_shuffle_buffer
        self.start_batch = 0

    def start_at(self, batch: int) -> None:
        """Resume: the next list yielded is batch `batch` of the stream."""
        self.start_batch = batch

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        if info is not None and info.num_workers > 1:
            raise RuntimeError("a streamed split is read by one DataLoader worker")
        for number, batch in enumerate(self.planned_batches()):
            if number >= self.start_batch:  # the batches before the position are planned, never decoded
                yield [self.read(item) for item in batch]

    def passes(self):
        """(pass, position, example) of this process's share of the stream, pass after pass."""
        from datasets.distributed import split_dataset_by_node

        allow_undecoded_audio()  # a DataLoader worker started by spawn imports datasets afresh
        epoch = 0
        while True:
            dataset = self.dataset.shuffle(seed=self.seed, buffer_size=self.buffer_size)
            if self.world_size > 1:
                dataset = split_dataset_by_node(dataset, self.rank, self.world_size)
            dataset.set_epoch(epoch)  # the shuffle's seed is seed + epoch, the same on every process
            served = 0
            for position, example in examples(dataset, [self.audio_column, self.text_column]):
                served += 1
                yield epoch, position, example
            if not served:
                raise RuntimeError(f"the streamed train split has no example for process {self.rank}")
            epoch += 1

    def planned_batches(self):
        """Batches of planned items (audio not decoded yet), bucket by bucket."""
        bucket, errors, left_out, buckets = [], [], {"long": 0, "too short": 0}, 0
        for epoch, position, example in self.passes():
            item = self.plan_item(epoch, position, example, left_out)
            if item is not None:
                (errors if "error" in item else bucket).append(item)
            if len(errors) == self.batch_size:  # unreadable ones are reported (and counted) in a batch of their own
                yield errors
                errors = []
            if len(bucket) == self.batch_size * BUCKET_BATCHES:
                yield from self.bucket_batches(bucket, buckets)
                bucket, buckets = [], buckets + 1

    def plan_item(self, epoch: int, position: int, example: dict, left_out: dict) -> dict | None:
        """What a batch needs of an example before reading it: its audio (kept encoded), duration
        from the header, and labels; an error if it cannot be read; None if it is left out."""
        label = value_label(example[self.audio_column], f"pass {epoch} example {position}")
        text = normalize_text(
            example[self.text_column] or "", self.chars_to_ignore, self.lowercase, self.word_separators
        )
        try:
            if not text:
                raise ValueError("empty transcript")
            audio = resident_audio(example[self.audio_column])
            with open_audio_value(audio) as f:
                duration = f.frames / f.samplerate
        except Exception as error:
            return {"error": (label, str(error).strip() or type(error).__name__)}
        labels = self.tokenizer(text).input_ids
        kind = "long" if duration > self.max_duration and self.skip_long else None
        if conv_frames(round(duration * TARGET_SAMPLE_RATE), *self.geometry) < min_frames_for(labels):
            kind = "too short"
        if kind:
            left_out[kind] += 1
            if np.log10(left_out[kind]).is_integer():
                what = "longer than --max_duration_seconds" if kind == "long" else "too short for their transcript"
                warnings.warn(
                    f"{left_out[kind]} streamed training utterance(s) {what} left out so far, e.g. {label}",
                    stacklevel=2,
                )
            return None
        return {"index": position, "audio": audio, "duration": duration, "labels": labels, "name": label}

    def bucket_batches(self, bucket: list[dict], key: int) -> list[list[dict]]:
        """Similar lengths together, long ones alone; the batch order shuffled."""
        rng = np.random.default_rng([self.seed, self.rank, key])
        long = [[item] for item in bucket if item["duration"] > self.max_duration]
        rest = sorted((item for item in bucket if item["duration"] <= self.max_duration), key=lambda i: -i["duration"])
        batches = long + [rest[k : k + self.batch_size] for k in range(0, len(rest), self.batch_size)]
        return [batches[k] for k in rng.permutation(len(batches))]

    def read(self, item: dict) -> dict:
        if "error" in item:
            return item
        try:
            with open_audio_value(item["audio"]) as f:
                audio = read_resampled(f, 0, target_length(f.frames, f.samplerate))
        except Exception as error:
            return {"error": (item["name"], str(error).strip() or type(error).__name__)}
        if self.normalize:
            audio = normalize_waveform(audio)
        return {"index": item["index"], "input_values": audio, "labels": item["labels"]}
