"""utils/audio.py: seeking reads return exactly what decoding and resampling the whole file gives."""

import numpy as np
import pytest
import soundfile as sf
from helpers import TOLERANCE, chirp, decode_whole, write_signal

from utils.audio import TARGET_SAMPLE_RATE, load_audio, read_mono, read_resampled, target_length

EXTENSIONS = ["wav", "flac", "ogg"]
RATES = [8000, 16000, 22050, 44100, 48000]
CHANNELS = [1, 2]
SECONDS = 3.0


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("audio")
    out = {}
    for i, (ext, sr, ch) in enumerate((e, r, c) for e in EXTENSIONS for r in RATES for c in CHANNELS):
        path = write_signal(root / f"x{sr}_{ch}.{ext}", chirp(SECONDS, sr, ch, seed=i), sr)
        out[ext, sr, ch] = (path, decode_whole(path))
    return out


def region_starts(total: int, length: int, seed: int) -> list[int]:
    """Edges, odd offsets and random points, shuffled so the handle seeks backwards and forwards."""
    rng = np.random.default_rng(seed)
    starts = [0, 1, 7, 319, 321, total // 2, total - length, total - length - 1] + rng.integers(
        0, total - length, 12
    ).tolist()
    return [int(s) for s in rng.permutation(starts)]


@pytest.mark.parametrize("channels", CHANNELS)
@pytest.mark.parametrize("sr", RATES)
@pytest.mark.parametrize("ext", EXTENSIONS)
def test_seeking_read_equals_region_of_whole_file_resample(files, ext, sr, channels):
    path, reference = files[ext, sr, channels]
    assert len(reference) == round(SECONDS * TARGET_SAMPLE_RATE)
    length = 8000
    with sf.SoundFile(str(path)) as audio:  # one handle for all reads, as the stream's cache does
        for start in region_starts(len(reference), length, seed=sr + channels):
            out = read_resampled(audio, start, length)
            assert out.dtype == np.float32 and out.shape == (length,)
            expected = reference[start : start + length]
            assert np.abs(out - expected).max() <= TOLERANCE, f"{path.name}: region at {start} differs"
            if start + length + 1 <= len(reference):
                assert np.abs(out - reference[start + 1 : start + 1 + length]).max() > 100 * TOLERANCE
        for length in (1, 2, 777):  # lengths that do not fall on the resampling grid
            for start in (3, 12345):
                out = read_resampled(audio, start, length)
                assert out.shape == (length,)
                assert np.abs(out - reference[start : start + length]).max() <= TOLERANCE


@pytest.mark.parametrize("ext", EXTENSIONS)
def test_read_past_the_end_is_zero_padded_to_the_exact_length(files, ext):
    path, reference = files[ext, 44100, 2]
    with sf.SoundFile(str(path)) as audio:
        out = read_resampled(audio, len(reference) - 300, 1000)
        assert out.shape == (1000,)
        assert np.abs(out[:300] - reference[-300:]).max() <= TOLERANCE
        assert not out[300:].any()
        beyond = read_resampled(audio, len(reference) + 5000, 640)
        assert beyond.shape == (640,) and not beyond.any()


@pytest.mark.parametrize("ext", EXTENSIONS)
def test_source_rate_reads_are_sample_exact_in_any_seek_order(files, ext):
    """No tolerance at the source rate: the same decoder gives the same samples. For Vorbis this
    holds only with utils/audio.py's workaround for libsndfile's inexact seeks (forward seeks on a used
    handle and seeks into the last Ogg page land hundreds of frames off)."""
    for sr, channels in [(48000, 1), (22050, 2), (8000, 1)]:
        path, _ = files[ext, sr, channels]
        full, _ = sf.read(str(path), dtype="float32", always_2d=True)
        full = full.mean(axis=1, dtype=np.float32)
        rng = np.random.default_rng(sr)
        with sf.SoundFile(str(path)) as audio:
            for i in range(60):
                length = int(rng.integers(1, 3000))
                # Every third read starts in the last 0.4 s, which holds the last Ogg page.
                low = len(full) - int(0.4 * sr) if i % 3 == 0 else 0
                start = int(rng.integers(low, len(full) - length + 1))
                out = read_mono(audio, start, length)
                assert out.dtype == np.float32
                assert np.array_equal(out, full[start : start + length]), f"{path.name}: {length} frames at {start}"


@pytest.mark.parametrize("ext", EXTENSIONS)
def test_load_audio_whole_file_and_region(files, ext):
    path, reference = files[ext, 22050, 2]
    whole = load_audio(path)
    assert whole.dtype == np.float32 and whole.shape == reference.shape
    assert np.abs(whole - reference).max() <= TOLERANCE
    region = load_audio(path, 1.25, 2.5)
    assert region.shape == (20000,)
    assert np.abs(region - reference[20000:40000]).max() <= TOLERANCE
    clipped = load_audio(path, 2.5, 99.0)  # an end past the file stops at the file's end
    assert clipped.shape == (8000,)
    assert np.abs(clipped - reference[40000:]).max() <= TOLERANCE


def test_a_tone_keeps_its_frequency_after_resampling(tmp_path):
    """Rate check independent of the soxr reference: a 1 kHz tone at 44.1 kHz read as 16 kHz
    has its spectral peak at 1 kHz."""
    sr = 44100
    t = np.arange(sr * 2) / sr
    path = write_signal(tmp_path / "tone.flac", (0.5 * np.sin(2 * np.pi * 1000 * t)).astype(np.float32), sr)
    with sf.SoundFile(str(path)) as audio:
        out = read_resampled(audio, 4000, 16000)
    spectrum = np.abs(np.fft.rfft(out * np.hanning(len(out))))
    assert np.argmax(spectrum) * TARGET_SAMPLE_RATE / len(out) == pytest.approx(1000, abs=1)
    assert np.sqrt(np.mean(out**2)) == pytest.approx(0.5 / np.sqrt(2), rel=0.01)


def test_target_length_counts_whole_output_samples():
    assert target_length(48000, 48000) == 16000
    assert target_length(44100 * 3, 44100) == 48000
    assert target_length(44099, 44100) == 15999
    assert target_length(22050 * 7200, 22050) == 7200 * 16000
