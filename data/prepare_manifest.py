"""Scan a folder of recordings, validate them and write participant-disjoint train/dev manifests.

    python data/prepare_manifest.py AUDIO_DIR --output_dir OUT [--participant_regex REGEX]
        [--dev_fraction 0.1] [--min_seconds S] [--seed N]

Writes OUT/train.tsv and OUT/dev.tsv (path, participant, duration, sample_rate, num_channels,
num_frames), OUT/invalid.tsv (path, reason) and OUT/summary.json. Only headers and a few short
probe reads per file are used, so hours of audio scan in seconds. A file that cannot be read, is
empty, too short, digitally silent or whose name the regex does not match is listed in invalid.tsv
with the reason (so are unlistable folders, links to a file already listed, and paths with a tab or
line break, shown escaped); it never stops the scan. No valid file at all, or a single participant
id while --dev_fraction asks for a dev set, is an error that leaves OUT untouched.

The participant id is the first group of --participant_regex, searched in the file name. The
default takes the leading letters and digits up to the first '_', '-' or '.' ("P017_day2.flac" ->
"P017"); for names like "2023-05-01_family12.wav" pass e.g. --participant_regex '_(family\\d+)'.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from utils.manifests import DEFAULT_PARTICIPANT_REGEX, prepare_manifests  # noqa: E402


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("audio_dir", help="folder scanned recursively for audio files")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--participant_regex", default=DEFAULT_PARTICIPANT_REGEX)
    parser.add_argument("--dev_fraction", type=float, default=0.1, help="share of audio hours for dev")
    parser.add_argument("--min_seconds", type=float, default=0.0, help="shorter files are invalid")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not Path(args.audio_dir).is_dir():
        parser.error(f"AUDIO_DIR {args.audio_dir} is not a folder")
    if not 0 <= args.dev_fraction < 1:
        parser.error(f"--dev_fraction must be in [0, 1), got {args.dev_fraction}")
    try:
        summary = prepare_manifests(
            args.audio_dir, args.output_dir, args.participant_regex, args.dev_fraction, args.min_seconds, args.seed
        )
    except ValueError as error:
        parser.error(str(error))
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
