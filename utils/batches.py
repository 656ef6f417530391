"""Batches of CTC fine-tuning and the DataLoaders that serve them. Training batches group
utterances of similar length and are a pure function of (seed, epoch): a run resumed from a
checkpoint continues with exactly the batches the interrupted run would have had."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from utils.audio import conv_geometry
from utils.ctc import samples_for_frames
from utils.hf_datasets import is_stream
from utils.training import make_loader
from utils.utterance_stream import StreamPlan, UtteranceStream
from utils.utterances import Collator, UtteranceDataset

if TYPE_CHECKING:
    from utils.ctc_arguments import CTCTrainingArguments, DataArguments, ModelArguments
    from utils.ctc_corpus import Corpus


def plan_batches(
    durations,
    batch_size: int,
    seed: int,
    epoch: int,
    max_duration: float,
    group_by_length: bool = True,
    bucket_batches: int = 50,
) -> list[list[int]]:
    """The batches of one epoch, a pure function of (seed, epoch).

    Shuffled, then sorted by duration inside buckets of `bucket_batches` batches, so a batch holds
    utterances of similar length while the epoch order stays random. Utterances longer than
    `max_duration` get batches of their own. The batch with the longest utterance comes first: an
    out-of-memory error then shows in the first step, not hours in.
    """
    durations = np.asarray(durations, dtype=np.float64)
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(durations))
    long = order[durations[order] > max_duration]
    normal = order[durations[order] <= max_duration]
    batches = []
    bucket = batch_size * bucket_batches if group_by_length else batch_size
    for start in range(0, len(normal), bucket):
        chunk = normal[start : start + bucket]
        if group_by_length:
            chunk = chunk[np.argsort(-durations[chunk], kind="stable")]
        batches += [chunk[k : k + batch_size].tolist() for k in range(0, len(chunk), batch_size)]
    batches += [[int(i)] for i in long]
    batches = [batches[k] for k in rng.permutation(len(batches))]
    if batches:
        longest = max(range(len(batches)), key=lambda k: durations[batches[k]].max())
        batches.insert(0, batches.pop(longest))
    return batches


class BatchPlan:
    """This process's share of every epoch's batches (process r of R takes batches r, r+R, ...;
    the few batches that do not fill a round are left for the next epoch's shuffle)."""

    def __init__(self, durations, batch_size, seed, max_duration, group_by_length, rank=0, world_size=1):
        self.durations, self.batch_size, self.seed = durations, batch_size, seed
        self.max_duration, self.group_by_length = max_duration, group_by_length
        self.rank, self.world_size = rank, world_size
        self.batches_per_epoch = len(self.local_batches(0))
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"the training set makes fewer batches ({len(durations)} utterances, batch size {batch_size}) than there are processes ({world_size})"
            )

    def local_batches(self, epoch: int) -> list[list[int]]:
        batches = plan_batches(
            self.durations, self.batch_size, self.seed, epoch, self.max_duration, self.group_by_length
        )
        usable = len(batches) - len(batches) % self.world_size
        return batches[self.rank : usable : self.world_size]

    def iterate(self, epoch: int = 0, batch: int = 0):
        """(epoch, batch in epoch, utterance indices) forever, from the given position on."""
        while True:
            for k, indices in enumerate(self.local_batches(epoch)[batch:], start=batch):
                yield epoch, k, indices
            epoch, batch = epoch + 1, 0


class PlanSampler(torch.utils.data.Sampler):
    """The DataLoader's batch sampler: this process's batches from a position (epoch, batch) on."""

    def __init__(self, plan: BatchPlan, epoch: int, batch: int):
        self.plan, self.epoch, self.batch = plan, epoch, batch

    def __iter__(self):
        for _, _, indices in self.plan.iterate(self.epoch, self.batch):
            yield indices


def plan_dev_batches(durations, batch_size: int, max_duration: float, rank: int = 0, world_size: int = 1):
    """Dev: fixed batches of similar length (long utterances alone), shared out over the processes."""
    order = sorted(range(len(durations)), key=lambda i: -durations[i])
    long = [[i] for i in order if durations[i] > max_duration]
    rest = [i for i in order if durations[i] <= max_duration]
    batches = long + [rest[k : k + batch_size] for k in range(0, len(rest), batch_size)]
    return batches[rank::world_size]


@dataclass
class Loaders:
    """What feeds the model: the datasets and their collator, this process's share of the training
    batches (a plan over all epochs) and of the dev batches."""

    collate: Collator
    train_set: UtteranceDataset | UtteranceStream
    dev_set: UtteranceDataset
    plan: BatchPlan | StreamPlan
    dev_batches: list[list[int]]
    num_workers: int

    def train(self, epoch: int, batch: int):
        """Training batches forever, from the given position on."""
        if isinstance(self.plan, StreamPlan):  # a stream is read in order, by one worker
            self.train_set.start_at(batch)
            return make_loader(self.train_set, min(self.num_workers, 1), batch_size=None, collate_fn=self.collate)
        sampler = PlanSampler(self.plan, epoch, batch)
        return make_loader(self.train_set, self.num_workers, batch_sampler=sampler, collate_fn=self.collate)

    def dev(self):
        return make_loader(self.dev_set, self.num_workers, batch_sampler=self.dev_batches, collate_fn=self.collate)


def make_loaders(
    corpus: Corpus,
    model_config,
    model_args: ModelArguments,
    data_args: DataArguments,
    train_args: CTCTrainingArguments,
    accelerator,
) -> Loaders:
    """The datasets, collator and batch plans of a fine-tuning run, for this process."""
    use_attention_mask = bool(corpus.processor.feature_extractor.return_attention_mask)
    collate = Collator(
        use_attention_mask, min_samples=samples_for_frames(model_config, max(model_args.mask_time_length, 2) + 1)
    )
    normalize = bool(corpus.processor.feature_extractor.do_normalize)
    train_set = UtteranceDataset(corpus.train_rows, normalize, corpus.dataset_splits, data_args.audio_column_name)
    dev_set = UtteranceDataset(corpus.dev_rows, normalize, corpus.dataset_splits, data_args.audio_column_name)
    stream = (corpus.dataset_splits or {}).get(data_args.train_split_name)
    try:
        if is_stream(stream):
            train_set = UtteranceStream(
                stream,
                data_args,
                corpus.tokenizer,
                conv_geometry(model_config),
                normalize,
                train_args.per_device_train_batch_size,
                train_args.seed,
                accelerator.process_index,
                accelerator.num_processes,
            )
            utterances = corpus.train_rows[0]["streamed"]["utterances"]
            plan = StreamPlan(utterances, train_args.per_device_train_batch_size, accelerator.num_processes)
        else:
            plan = BatchPlan(
                [r["duration"] for r in corpus.train_rows],
                train_args.per_device_train_batch_size,
                train_args.seed,
                data_args.max_duration_seconds,
                data_args.group_by_length,
                accelerator.process_index,
                accelerator.num_processes,
            )
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None
    dev_batches = plan_dev_batches(
        [r["duration"] for r in corpus.dev_rows],
        train_args.per_device_eval_batch_size,
        data_args.max_duration_seconds,
        accelerator.process_index,
        accelerator.num_processes,
    )
    return Loaders(collate, train_set, dev_set, plan, dev_batches, train_args.num_workers)
