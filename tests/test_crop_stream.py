"""utils/crops.py: the CropStream of silence-filtered random crops."""

import itertools
import os
import tracemalloc
import warnings
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from helpers import TOLERANCE, chirp, decode_whole, write_signal

import utils.crops
from utils.audio import TARGET_SAMPLE_RATE, normalize_waveform
from utils.crops import CropStream, stream_totals
from utils.manifests import probe_audio_file

CROP = 0.5  # seconds; short crops keep the tests fast, the code path is the same as for 8 s
CROP_LEN = int(CROP * TARGET_SAMPLE_RATE)


def row(path, participant="P01") -> dict:
    found, reason = probe_audio_file(Path(path))
    assert reason is None, reason
    return {**found, "participant": participant}


def locate_all(crop_array: np.ndarray, ref: np.ndarray) -> list[int]:
    """Start of the region of `ref` each crop was cut from (cross-correlation peak), checked to
    match within TOLERANCE so a wrong guess fails rather than passes."""
    length = crop_array.shape[-1]
    n = 1 << int(np.ceil(np.log2(len(ref) + length)))
    ref_spectrum = np.fft.rfft(ref, n)
    starts = []
    for crop in crop_array:
        corr = np.fft.irfft(ref_spectrum * np.conj(np.fft.rfft(crop, n)), n)[: len(ref) - length + 1]
        start = int(np.argmax(corr))
        assert np.abs(crop - ref[start : start + length]).max() <= TOLERANCE, (
            f"crop not found in the file (best guess {start})"
        )
        starts.append(start)
    return starts


def batches(stream, n=None, num_workers=0) -> list[dict]:
    """The first n batches (default: one epoch); a fixed stream ends by itself, so all of them."""
    # batch_size=None: CropStream yields ready batches.
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=num_workers)
    if n is None and stream.fixed:
        return list(loader)
    return list(itertools.islice(loader, len(stream) if n is None else n))


def keys(batch_list) -> list[tuple]:
    return [tuple(k) for b in batch_list for k in b["crop_keys"].tolist()]


def crops(batch_list) -> np.ndarray:
    return np.concatenate([b["input_values"].numpy() for b in batch_list])


# Files told apart by level: file i is a 500 Hz sine of amplitude LEVEL * (i + 1), so every crop
# (a whole number of periods) says which file it came from through its RMS.
LEVEL = 0.08


def level_file(root, i, seconds, sr=16000, ext="wav") -> Path:
    t = np.arange(int(seconds * sr)) / sr
    return write_signal(
        Path(root) / f"P{i:02d}_lvl.{ext}", (LEVEL * (i + 1) * np.sin(2 * np.pi * 500 * t)).astype(np.float32), sr
    )


def source_ids(crop_array) -> list[int]:
    rms = np.sqrt(np.mean(np.square(crop_array, dtype=np.float64), axis=-1))
    ids = np.rint(rms * np.sqrt(2) / LEVEL).astype(int) - 1
    assert np.allclose(rms * np.sqrt(2) / LEVEL, ids + 1, atol=0.05), "a crop is not a clean level-coded region"
    return ids.tolist()


@pytest.fixture(scope="module")
def mixed_rows(tmp_path_factory):
    """Four 3 s files in the formats and rates users bring, each with a distinct chirp."""
    root = tmp_path_factory.mktemp("mixed")
    specs = [("wav", 16000, 1), ("flac", 44100, 2), ("ogg", 48000, 1), ("wav", 22050, 2)]
    return [
        row(write_signal(root / f"P0{i}_x.{e}", chirp(3.0, sr, ch, seed=10 + i), sr), f"P0{i}")
        for i, (e, sr, ch) in enumerate(specs)
    ]


FORMATS = [
    (ext, sr, channels)
    for ext in ("wav", "flac", "ogg")
    for sr in (8000, 16000, 22050, 44100, 48000)
    for channels in (1, 2)
]


@pytest.fixture(scope="module")
def format_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("formats")
    out = {}
    for i, (ext, sr, channels) in enumerate(FORMATS):
        path = write_signal(root / f"P{i:02d}_f.{ext}", chirp(3.0, sr, channels, seed=100 + i), sr)
        out[ext, sr, channels] = (path, decode_whole(path))
    return out


@pytest.mark.parametrize("ext, sr, channels", FORMATS)
def test_crops_have_exact_length_and_equal_the_whole_file_resample(format_files, ext, sr, channels):
    path, ref = format_files[ext, sr, channels]
    stream = CropStream([([row(path)], 1.0)], batch_size=4, crop_seconds=CROP, epoch_multiplier=8, min_rms=0.0)
    got = batches(stream)
    assert len(got) == 2
    for b in got:
        assert b["input_values"].dtype == torch.float32 and tuple(b["input_values"].shape) == (4, CROP_LEN)
    starts = locate_all(crops(got), ref)
    assert len(set(starts)) == 8  # eight random positions, not one


def test_silence_rejection_keeps_only_crops_from_the_loud_region(tmp_path, monkeypatch):
    sr = 16000
    signal = np.zeros(30 * sr, dtype=np.float32)
    signal[12 * sr : 14 * sr] = chirp(2.0, sr, seed=3)
    # WAV: FLAC seeks in a file of digital zeros cost ~4 ms each (libFLAC's seek search copes badly
    # with wildly varying frame sizes), and this test makes hundreds of tries.
    path = write_signal(tmp_path / "P01_quiet.wav", signal, sr)
    reads = []
    real_read_mono = utils.crops.read_mono
    monkeypatch.setattr(utils.crops, "read_mono", lambda *a: reads.append(1) or real_read_mono(*a))
    # A try overlaps the loud 2 s with probability ~8 %: 200 redraws make an all-silent crop a
    # 1e-7 event, and the stream is seeded, so this is a fixed outcome, not a flaky one.
    stream = CropStream(
        [([row(path)], 1.0)], batch_size=8, crop_seconds=CROP, epoch_multiplier=24, min_rms=0.001, max_crop_retries=200
    )
    got = batches(stream)
    stats = got[-1]["stream_stats"]
    assert (stats["crops"], stats["all_silent"]) == (24, 0)
    assert stats["retries"] > 24 * 5  # the silence was really drawn, and rejected
    assert len(reads) == stats["crops"] + stats["retries"]
    for crop, start in zip(crops(got), locate_all(crops(got), decode_whole(path))):
        assert 12 * sr - CROP_LEN < start < 14 * sr, start
        assert np.sqrt(np.mean(crop**2)) >= 0.001


def test_all_silent_file_uses_the_loudest_try_and_counts_it(tmp_path, monkeypatch):
    """First half digital zero, second half noise at RMS 2e-4, both under min_rms: every crop is
    all-silent, and it must be the loudest of its tries, not the last one."""
    sr = 16000
    signal = np.zeros(20 * sr, dtype=np.float32)
    signal[10 * sr :] = 2e-4 * np.random.default_rng(0).standard_normal(10 * sr)
    path = write_signal(tmp_path / "P01_hush.wav", signal, sr, subtype="FLOAT")
    tries = []
    real_read_mono = utils.crops.read_mono

    def recording_read(*args):
        source = real_read_mono(*args)
        tries.append(float(np.sqrt(np.mean(np.square(source, dtype=np.float64)))))
        return source

    monkeypatch.setattr(utils.crops, "read_mono", recording_read)
    retries = 6
    stream = CropStream(
        [([row(path)], 1.0)],
        batch_size=4,
        crop_seconds=CROP,
        epoch_multiplier=12,
        min_rms=0.001,
        max_crop_retries=retries,
    )
    got = batches(stream)
    stats = got[-1]["stream_stats"]
    assert stats == {"crops": 12, "retries": 12 * retries, "all_silent": 12, "unreadable_files": 0}
    assert len(tries) == 12 * (retries + 1)
    crop_rms = np.sqrt(np.mean(np.square(crops(got), dtype=np.float64), axis=1))
    loudest = np.array(tries).reshape(12, retries + 1).max(axis=1)
    np.testing.assert_allclose(crop_rms, loudest, rtol=1e-5)
    assert (crop_rms > 0).all()


def test_same_crops_whatever_the_number_of_workers(mixed_rows):
    # 4 files x 4 crops = 16 per epoch, batches of 3: 5 batches per epoch, an odd count, so two
    # workers alternate differently in every epoch; 12 batches cross two epoch boundaries.
    make = lambda: CropStream([(mixed_rows, 1.0)], batch_size=3, crop_seconds=CROP, epoch_multiplier=4, seed=7)
    serial, parallel = batches(make(), 12, num_workers=0), batches(make(), 12, num_workers=2)
    expected = [(7, e, 3 * b + j) for e in range(3) for b in range(5) for j in range(3)][: 12 * 3]
    assert keys(serial) == keys(parallel) == expected
    assert np.array_equal(crops(serial), crops(parallel))
    assert {b["worker"] for b in parallel} == {0, 1}
    assert [(b["epoch"], b["batch_in_epoch"]) for b in parallel] == [(e, b) for e in range(3) for b in range(5)][:12]


def test_two_ranks_with_two_workers_each_share_an_epoch_without_duplicates(tmp_path):
    rows = [row(level_file(tmp_path, i, 2.0), f"P{i:02d}") for i in range(5)]
    served = {}
    for rank in range(2):
        stream = CropStream(
            [(rows, 1.0)], batch_size=2, crop_seconds=CROP, epoch_multiplier=4, seed=3, rank=rank, world_size=2
        )
        assert len(stream) == 5  # 20 crops per epoch / (2 per batch x 2 ranks)
        got = batches(stream, len(stream), num_workers=2)
        assert {b["worker"] for b in got} == {0, 1}
        served[rank] = (keys(got), crops(got))
    k0, k1 = set(served[0][0]), set(served[1][0])
    assert len(k0) == len(served[0][0]) == 10 and len(k1) == 10
    assert not k0 & k1
    assert k0 | k1 == {(3, 0, i) for i in range(20)}
    # The union is the planned epoch: every file exactly epoch_multiplier times.
    ids = source_ids(np.concatenate([served[0][1], served[1][1]]))
    assert np.bincount(ids, minlength=5).tolist() == [4] * 5


def test_resume_yields_exactly_the_uninterrupted_stream(mixed_rows):
    make = lambda: CropStream([(mixed_rows, 1.0)], batch_size=3, crop_seconds=CROP, epoch_multiplier=4, seed=11)
    full = batches(make(), 13, num_workers=2)  # epochs of 5 batches
    for epoch, batch in [(0, 3), (0, 4), (1, 1), (1, 2)]:  # odd and even offsets; (0, 3) and (0, 4) cross into epoch 1
        resumed = make()
        resumed.start_at(epoch, batch)
        skip = epoch * 5 + batch
        got = batches(resumed, 13 - skip, num_workers=2)
        assert keys(got) == keys(full[skip:]), (epoch, batch)
        assert np.array_equal(crops(got), crops(full[skip:])), (epoch, batch)


def test_files_broken_after_the_manifest_are_skipped_counted_and_warned(tmp_path):
    paths = [level_file(tmp_path, i, 2.0) for i in range(4)]
    rows = [row(p, f"P{i:02d}") for i, p in enumerate(paths)]
    paths[1].write_bytes(np.random.default_rng(1).bytes(5000))  # overwritten with garbage
    with open(paths[2], "r+b") as f:  # truncated to 0.1 s: the header opens, every read comes up short
        f.truncate(44 + 2 * 1600)
    paths[3].unlink()
    stream = CropStream([(rows, 1.0)], batch_size=4, crop_seconds=CROP, epoch_multiplier=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = batches(stream, 8)  # two epochs
    assert all(tuple(b["input_values"].shape) == (4, CROP_LEN) for b in got)
    reported = [p for b in got for p in b["new_unreadable"]]
    assert sorted(reported) == sorted(str(p) for p in paths[1:])  # each once, when first met
    assert got[-1]["stream_stats"]["unreadable_files"] == 3
    assert got[-1]["stream_stats"]["crops"] == 32
    skipped = [str(w.message) for w in caught if "skipping unreadable file" in str(w.message)]
    assert len(skipped) == 3 and all(any(str(p) in m for m in skipped) for p in paths[1:])
    assert set(source_ids(crops(got))) == {0}  # replacements come from the good file


def test_stream_totals_sums_the_latest_counters_of_each_worker():
    assert stream_totals({0: {"crops": 8, "retries": 2}, 1: {"crops": 6, "retries": 1, "all_silent": 1}}) == {
        "crops": 14,
        "retries": 3,
        "all_silent": 1,
    }


def test_manifest_weights_set_the_share_of_crops(tmp_path):
    home = [row(level_file(tmp_path, i, 1.0), f"P{i:02d}") for i in range(3)]
    read = [row(level_file(tmp_path, i, 1.0, sr=44100, ext="flac"), f"P{i:02d}") for i in (3, 4)]
    stream = CropStream([(home, 0.7), (read, 0.3)], batch_size=5, crop_seconds=CROP, epoch_multiplier=10, seed=2)
    got = batches(stream, len(stream))
    assert len(got) == 10
    ids = source_ids(crops(got))
    assert sum(i < 3 for i in ids) == 35 and sum(i >= 3 for i in ids) == 15
    assert set(ids) == {0, 1, 2, 3, 4}
    # Every file of the heavier manifest is used about equally: it cycles through its files.
    assert all(10 <= ids.count(i) <= 12 for i in range(3))


def test_crops_by_duration_shares_crops_in_proportion_to_length(tmp_path):
    rows = [row(level_file(tmp_path, i, seconds), f"P{i:02d}") for i, seconds in enumerate([2.0, 4.0, 6.0])]
    by_duration = CropStream(
        [(rows, 1.0)], batch_size=4, crop_seconds=CROP, epoch_multiplier=4, crops_by_duration=True
    )
    per_file = CropStream([(rows, 1.0)], batch_size=4, crop_seconds=CROP, epoch_multiplier=4)
    assert np.bincount(source_ids(crops(batches(by_duration, 3))), minlength=3).tolist() == [2, 4, 6]
    assert np.bincount(source_ids(crops(batches(per_file, 3))), minlength=3).tolist() == [4, 4, 4]


def test_epoch_multiplier_crops_per_file_in_every_epoch(tmp_path):
    rows = [row(level_file(tmp_path, i, 1.5), f"P{i:02d}") for i in range(3)]
    stream = CropStream([(rows, 1.0)], batch_size=5, crop_seconds=CROP, epoch_multiplier=5)
    assert stream.crops_per_epoch == 15 and len(stream) == 3
    got = batches(stream, 9)
    for epoch in range(3):
        in_epoch = [b for b in got if b["epoch"] == epoch]
        assert len(in_epoch) == 3
        assert np.bincount(source_ids(crops(in_epoch)), minlength=3).tolist() == [5, 5, 5]


def test_fixed_mode_yields_identical_crops_on_every_pass(mixed_rows):
    stream = CropStream([(mixed_rows, 1.0)], batch_size=4, crop_seconds=CROP, epoch_multiplier=2, fixed=True, seed=5)
    first, second = batches(stream), batches(stream, num_workers=2)
    assert len(first) == len(second) == 2  # one pass, then the stream ends
    assert keys(first) == keys(second) == [(5, 0, i) for i in range(8)]
    assert np.array_equal(crops(first), crops(second))


@pytest.mark.parametrize("batch_size, world_size", [(2, 1), (4, 1), (16, 1), (4, 2), (8, 2), (16, 2)])
def test_fixed_mode_yields_every_crop_whatever_the_batch_and_processes(mixed_rows, batch_size, world_size):
    """A dev set is never cut to a multiple of batch x processes (15 crops here): the last batch is
    short, a process may have one batch fewer, and each crop is the same whoever reads it."""
    rows = mixed_rows + mixed_rows[:1]
    reference = CropStream([(rows, 1.0)], batch_size=1, crop_seconds=CROP, epoch_multiplier=3, fixed=True)
    assert reference.crops_per_epoch == 15
    expected = dict(zip(keys(batches(reference)), crops(batches(reference))))
    seen = {}
    for rank in range(world_size):
        stream = CropStream(
            [(rows, 1.0)],
            batch_size=batch_size,
            crop_seconds=CROP,
            epoch_multiplier=3,
            fixed=True,
            rank=rank,
            world_size=world_size,
        )
        got = batches(stream, num_workers=2)
        assert len(got) == len(stream) and all(len(b["crop_keys"]) <= batch_size for b in got)
        for key, crop in zip(keys(got), crops(got) if got else []):  # batch 16 x 2: rank 1 has none
            assert key not in seen
            seen[key] = crop
    assert sorted(seen) == sorted(expected)
    assert all(np.array_equal(seen[key], expected[key]) for key in expected)


def test_new_epochs_draw_fresh_crop_positions(tmp_path):
    """REFERENCE defect: the same crop every epoch. Here each epoch's positions are new."""
    path = write_signal(tmp_path / "P01_one.wav", chirp(5.0, 16000, seed=9), 16000)
    ref = decode_whole(path)
    stream = CropStream([([row(path)], 1.0)], batch_size=4, crop_seconds=CROP, epoch_multiplier=4, min_rms=0.0)
    got = batches(stream, 3)
    positions = [set(locate_all(b["input_values"].numpy(), ref)) for b in got]
    assert [b["epoch"] for b in got] == [0, 1, 2]
    assert all(len(p) == 4 for p in positions)
    assert not positions[0] & positions[1] and not positions[1] & positions[2] and not positions[0] & positions[2]


def test_normalize_gives_zero_mean_unit_variance_of_the_same_crops(mixed_rows):
    make = lambda normalize: CropStream(
        [(mixed_rows, 1.0)], batch_size=4, crop_seconds=CROP, epoch_multiplier=2, seed=1, normalize=normalize
    )
    raw, normalized = crops(batches(make(False), 2)), crops(batches(make(True), 2))
    assert np.abs(normalized.mean(axis=1)).max() < 1e-5
    np.testing.assert_allclose(normalized.std(axis=1), 1.0, atol=1e-3)
    np.testing.assert_allclose(normalized, normalize_waveform(raw), atol=1e-6)
    assert np.abs(raw.std(axis=1) - 1).min() > 0.5  # the raw crops were not already normalised


def test_files_shorter_than_a_crop_are_left_out_and_counted(tmp_path):
    long_rows = [row(level_file(tmp_path, i, 1.0), f"P{i:02d}") for i in range(2)]
    short_rows = [row(level_file(tmp_path, i, 0.4, sr=44100, ext="flac"), f"P{i:02d}") for i in (2, 3, 4)]
    stream = CropStream([(long_rows + short_rows, 1.0)], batch_size=2, crop_seconds=CROP, epoch_multiplier=3)
    assert stream.short_files == 3 and stream.crops_per_epoch == 6
    assert set(source_ids(crops(batches(stream, 3)))) == {0, 1}
    with pytest.raises(ValueError, match=r"read\.tsv: no file is at least one crop long \(0.5 s\); 3 file\(s\)"):
        CropStream(
            [(long_rows, 0.5), (short_rows, 0.5)], batch_size=2, crop_seconds=CROP, names=["home.tsv", "read.tsv"]
        )
    with pytest.raises(ValueError, match="fewer than one batch"):
        CropStream([(long_rows, 1.0)], batch_size=4, crop_seconds=CROP, epoch_multiplier=1)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_a_two_hour_file_streams_with_bounded_memory(tmp_path):
    """7200 s at 16 kHz would be 460 MB as float32 if decoded whole; seeking reads keep memory at a
    few crops. FLAC stores the silent stretches in a few bytes, so the file writes in ~2 s."""
    sr, minutes = 16000, 120
    path = tmp_path / "P01_day.flac"
    silence = np.zeros(sr * 60, dtype=np.int16)
    t = np.arange(sr * 20) / sr
    loud = (8000 * np.sin(2 * np.pi * 300 * t)).astype(np.int16)
    loud_minutes = {5, 31, 59, 83, 107, 119}  # the last one is the file's final minute
    with sf.SoundFile(str(path), "w", sr, 1, subtype="PCM_16") as f:
        for minute in range(minutes):
            if minute in loud_minutes:  # 20 s of tone at the end of the minute
                f.write(silence[: sr * 40])
                f.write(loud)
            else:
                f.write(silence)
    assert os.path.getsize(path) < 5_000_000
    rss_before = rss_bytes()
    tracemalloc.start()
    try:
        manifest_row = row(path)
        stream = CropStream(
            [([manifest_row], 1.0)],
            batch_size=4,
            crop_seconds=8.0,
            epoch_multiplier=16,
            min_rms=0.01,
            max_crop_retries=60,
        )
        got = batches(stream, 4)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert manifest_row["duration"] == 7200.0 and manifest_row["num_frames"] == 7200 * sr
    assert all(tuple(b["input_values"].shape) == (4, 8 * sr) for b in got)
    stats = got[-1]["stream_stats"]
    assert stats["crops"] == 16 and stats["retries"] > 16  # mostly silence: redraws were needed
    loud_crops = crops(got)[np.sqrt(np.mean(crops(got) ** 2, axis=1)) >= 0.01]
    assert len(loud_crops) == 16 - stats["all_silent"] > 0
    assert peak < 40_000_000, f"traced peak {peak / 1e6:.0f} MB"
    assert rss_bytes() - rss_before < 150_000_000
