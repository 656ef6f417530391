"""Transcript normalisation and the character vocabulary of CTC fine-tuning: [PAD] (the CTC blank),
[UNK], '|' for the space, and every character of the training transcripts."""

from __future__ import annotations

import json
import tempfile
import unicodedata
from pathlib import Path

from transformers import Wav2Vec2CTCTokenizer

PAD, UNK, WORD_DELIMITER = "[PAD]", "[UNK]", "|"
# Punctuation that carries no sound. '|' is the tokenizer's word delimiter (and a common stand-in
# for the Devanagari danda), so it must not stay in a transcript.
DEFAULT_CHARS_TO_IGNORE = ',?.!-;:"“”«»%…¿¡()[]{}|।॥�'
# Characters that stand between words: each becomes a space. Deleted, a dash would join the words on
# either side ("well—maybe" -> "wellmaybe") and so would '|' (the tokenizer's word delimiter, a common
# stand-in for the danda), the danda '।' and the double danda '॥'. Figure dash to horizontal bar, U+2012-2015.
DEFAULT_WORD_SEPARATORS = "\u2012\u2013\u2014\u2015|।॥"
# Typographic apostrophes are the same letter as the typed one: "don’t" and "don't" must not differ.
APOSTROPHES = str.maketrans({"’": "'", "‘": "'", "ʼ": "'"})


def normalize_text(
    text: str,
    chars_to_ignore: str = DEFAULT_CHARS_TO_IGNORE,
    lowercase: bool = True,
    word_separators: str = DEFAULT_WORD_SEPARATORS,
) -> str:
    """NFC, lowercase, word separators made spaces, ignored characters deleted, whitespace folded to
    single spaces. `word_separators=""` keeps the separators as characters (or, if they are in
    `chars_to_ignore`, deletes them).

    NFC keeps Devanagari intact: vowel signs, virama and nukta stay as they are in composed text
    (precomposed nukta letters such as U+0958 become letter + nukta, their canonical NFC form).
    """
    text = unicodedata.normalize("NFC", text.lower() if lowercase else text).translate(APOSTROPHES)
    text = text.translate({ord(c): " " for c in unicodedata.normalize("NFC", word_separators)})
    ignore = set(unicodedata.normalize("NFC", chars_to_ignore))
    if ignore:
        text = "".join(c for c in text if c not in ignore)
    return " ".join(text.split())


def build_vocabulary(texts) -> dict[str, int]:
    """Every character of the training transcripts, '|' for the space, plus [UNK] and [PAD].
    [PAD] is id 0 and doubles as the CTC blank."""
    characters = sorted(set("".join(texts)) - {" "})
    vocab = {PAD: 0, UNK: 1, WORD_DELIMITER: 2}
    for char in characters:
        vocab.setdefault(char, len(vocab))
    return vocab


def make_tokenizer(vocab: dict[str, int]) -> Wav2Vec2CTCTokenizer:
    with tempfile.TemporaryDirectory() as folder:
        vocab_file = Path(folder) / "vocab.json"
        vocab_file.write_text(json.dumps(vocab, ensure_ascii=False, indent=1), encoding="utf-8")
        return Wav2Vec2CTCTokenizer(
            str(vocab_file),
            unk_token=UNK,
            pad_token=PAD,
            word_delimiter_token=WORD_DELIMITER,
            bos_token=None,
            eos_token=None,
            do_lower_case=False,
        )


def uncovered_characters(tokenizer, texts) -> dict[str, int]:
    """Characters of `texts` the tokenizer would turn into [UNK], with their counts."""
    vocab = tokenizer.get_vocab()
    missing: dict[str, int] = {}
    for text in texts:
        for char in text:
            if char != " " and char not in vocab:
                missing[char] = missing.get(char, 0) + 1
    return missing


def describe_characters(counts: dict[str, int], limit: int = 20) -> str:
    items = sorted(counts.items(), key=lambda kv: -kv[1])[:limit]
    return ", ".join(f"{c!r} (U+{ord(c):04X}, {n}x)" for c, n in items)


def load_tokenizer(tokenizer_name_or_path: str | None, train_rows: list[dict], dev_rows: list[dict]):
    """A tokenizer built from the training transcripts, or --tokenizer_name_or_path's, which must
    cover every transcript."""
    if not tokenizer_name_or_path:
        return make_tokenizer(build_vocabulary(r["text"] for r in train_rows))
    try:
        tokenizer = Wav2Vec2CTCTokenizer.from_pretrained(tokenizer_name_or_path)
    except OSError as error:
        raise ValueError(
            f"--tokenizer_name_or_path {tokenizer_name_or_path}: no CTC tokenizer there ({str(error).strip().splitlines()[0]})"
        ) from None
    missing = uncovered_characters(tokenizer, (r["text"] for r in train_rows + dev_rows))
    if missing:
        raise ValueError(
            f"vocabulary mismatch: --tokenizer_name_or_path {tokenizer_name_or_path} lacks characters of the "
            f"transcripts: {describe_characters(missing)}. Add them to --chars_to_ignore, or build a new vocabulary "
            f"(leave out --tokenizer_name_or_path) and train with --new_ctc_head"
        )
    return tokenizer
