"""Transcribe audio files with a CTC model (a finetune_ctc.py output folder or a hub CTC model).

    python transcribe.py --model_name_or_path runs/home-ctc recording.flac other.wav

Prints `path<TAB>transcript` for each file, greedy CTC decoding without a language model. Files of
any length, format soundfile reads, sample rate and channel count: long files are read by seeking
and decoded `--chunk_seconds` at a time, with `--context_seconds` of audio on each side of a chunk
so that words at its edges are heard whole (utils.ctc.transcribe does the same from Python). A
file that fails is reported on stderr and the others are still transcribed; the exit status is
then 1.
"""

from __future__ import annotations

import argparse
import sys

import torch
from transformers import Wav2Vec2ForCTC, Wav2Vec2Processor

from utils.ctc import transcribe
from utils.hourglass import model_class, read_config
from utils.manifests import escape_tsv


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="transcribe.py",
        description="Print 'path<TAB>transcript' for each audio file (greedy CTC decoding).",
    )
    parser.add_argument(
        "files", nargs="+", help="audio files of any format soundfile reads, any rate and channel count"
    )
    parser.add_argument(
        "--model_name_or_path", required=True, help="a finetune_ctc.py output folder or a hub CTC model"
    )
    parser.add_argument(
        "--chunk_seconds", type=float, default=30.0, help="long files are decoded this many seconds at a time"
    )
    parser.add_argument("--context_seconds", type=float, default=2.0, help="extra audio on each side of a chunk")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    ctc_class = model_class(read_config(args.model_name_or_path), Wav2Vec2ForCTC)  # an Hourglass model needs its own
    model = ctc_class.from_pretrained(args.model_name_or_path)
    processor = Wav2Vec2Processor.from_pretrained(args.model_name_or_path)
    failures = 0
    for path in args.files:
        try:
            (text,) = transcribe([path], model, processor, args.chunk_seconds, args.context_seconds, args.device)
        except Exception as error:  # one bad file must not stop a batch of transcriptions
            print("error: " + escape_tsv(f"{path}: {str(error).strip() or type(error).__name__}"), file=sys.stderr)
            failures += 1
            continue
        # A tab or line break in a path (or text) would break the path<TAB>text line: those are shown escaped.
        print(f"{escape_tsv(path)}\t{escape_tsv(text)}", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
