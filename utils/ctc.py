"""CTC pieces of fine-tuning and transcription: the summed loss over real frames, the blank's
starting bias, frame counts, SpecAugment spans on real frames, greedy decoding and its scores, the
vocabulary check of an existing head, and the chunked transcription of files of any length."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import jiwer
import numpy as np
import soundfile as sf
import torch
import torch.nn.functional as F
from accelerate.utils import gather_object
from transformers import Wav2Vec2CTCTokenizer
from transformers.models.wav2vec2.modeling_wav2vec2 import _compute_mask_indices

from utils.audio import TARGET_SAMPLE_RATE, conv_frames, conv_geometry, load_audio, normalize_waveform

if TYPE_CHECKING:
    from utils.batches import Loaders


def samples_for_frames(config, frames: int) -> int:
    """Fewest input samples for which the CNN feature encoder yields `frames` frames."""
    receptive_field, stride = conv_geometry(config)
    return receptive_field + stride * (max(frames, 1) - 1)


def ctc_loss_sum(logits, frame_lengths, labels, blank: int, zero_infinity: bool) -> torch.Tensor:
    """The CTC loss summed over the batch, over the real frames of each utterance only."""
    log_probs = F.log_softmax(logits, dim=-1, dtype=torch.float32).transpose(0, 1)
    target_mask = labels >= 0
    # cuDNN's CTC kernel only takes int32 targets on the CPU and short labels; the native one takes anything.
    with torch.backends.cudnn.flags(enabled=False):
        return F.ctc_loss(
            log_probs,
            labels.masked_select(target_mask),
            frame_lengths,
            target_mask.sum(-1),
            blank=blank,
            reduction="sum",
            zero_infinity=zero_infinity,
        )


def blank_bias(probability: float, vocab_size: int) -> float:
    """The blank's output bias (all others 0) that gives it `probability` when the rest of the
    logits are equal, as they are for a freshly initialised head."""
    return math.log(probability * (vocab_size - 1) / (1 - probability))


def min_frames_for(label_ids: list[int]) -> int:
    """CTC needs a frame per label plus a blank between two equal labels."""
    return len(label_ids) + sum(1 for a, b in zip(label_ids, label_ids[1:]) if a == b)


def time_mask_indices(input_width: int, frame_lengths, geometry, mask_prob: float, mask_length: int, min_masks: int):
    """SpecAugment spans drawn over each utterance's real frames only (transformers would put them
    in the padding too when the model takes no attention mask). Draws from numpy's global RNG."""
    num_frames = conv_frames(input_width, *geometry)
    real = torch.arange(num_frames)[None] < frame_lengths[:, None]
    return _compute_mask_indices(
        (len(frame_lengths), num_frames), mask_prob, mask_length, attention_mask=real.long(), min_masks=min_masks
    )


def greedy_decode(tokenizer, logits: torch.Tensor, frame_lengths) -> list[str]:
    """Argmax per frame, repeats merged, blanks removed, '|' as the space: the text the Hugging Face
    ASR pipeline gives for the same frames. Spaces are not folded, as the pipeline does not fold them
    ('| [PAD] |' is two spaces), so the scores and transcripts here are those of the pipeline too."""
    ids = logits.argmax(-1).cpu()
    return [tokenizer.decode(ids[row, : int(frame_lengths[row])].tolist()) for row in range(ids.shape[0])]


# The scores that come from the model's outputs (the rest count the dev set), null when those are not finite.
NONFINITE_NULLED = ["eval_wer", "eval_cer", "eval_word_substitutions", "eval_word_deletions", "eval_word_insertions"]


def score_transcripts(refs: list[str], hyps: list[str]) -> dict:
    """WER and CER over all pairs at once (jiwer), with the counts behind them."""
    words, chars = jiwer.process_words(refs, hyps), jiwer.process_characters(refs, hyps)
    return {
        "eval_wer": words.wer,
        "eval_cer": chars.cer,
        "eval_utterances": len(refs),
        "eval_words": sum(len(r.split()) for r in refs),
        "eval_chars": sum(len(r) for r in refs),
        "eval_word_substitutions": words.substitutions,
        "eval_word_deletions": words.deletions,
        "eval_word_insertions": words.insertions,
    }


def evaluate_ctc(
    model, loaders: Loaders, texts: list[str], tokenizer, accelerator, unreadable: set, examples: int
) -> dict | None:
    """Greedy decoding of the dev set of `loaders` (shared out over the processes); the loss per
    target character, and WER and CER over all of it, with the first `examples` reference/hypothesis
    pairs. Files that cannot be read join `unreadable` and are not scored; None if none could be read."""
    use_attention_mask = loaders.collate.use_attention_mask
    model.eval()
    # loss, target characters, batches whose logits hold NaN or Inf
    local, sums = [], torch.zeros(3, dtype=torch.float64, device=accelerator.device)
    with torch.no_grad(), accelerator.autocast():
        for batch in loaders.dev():
            unreadable.update(path for path, _ in batch["failed"])
            if not batch["indices"]:
                continue
            inputs = batch["input_values"].to(accelerator.device)
            mask = batch["attention_mask"].to(accelerator.device) if use_attention_mask else None
            logits = model(inputs, attention_mask=mask).logits
            frames = model._get_feat_extract_output_lengths(batch["input_lengths"]).to(accelerator.device)
            labels = batch["labels"].to(accelerator.device)
            sums += torch.stack(
                [
                    ctc_loss_sum(logits, frames, labels, tokenizer.pad_token_id, True).double(),
                    (labels >= 0).sum().double(),
                    (~torch.isfinite(logits)).any().double(),
                ]
            )
            local += list(zip(batch["indices"], greedy_decode(tokenizer, logits, frames)))
    model.train()
    sums = accelerator.reduce(sums, reduction="sum")
    decoded = dict(gather_object(local))
    scored = [i for i in range(len(texts)) if i in decoded]  # unreadable dev files are not scored
    if not scored:
        return None
    refs, hyps = [texts[i] for i in scored], [decoded[i] for i in scored]
    scores = {"eval_loss": (sums[0] / sums[1].clamp(min=1)).item(), **score_transcripts(refs, hyps)}
    if sums[2] > 0:  # NaN logits still decode to some text, whose WER would look like a real (bad) one
        scores.update(dict.fromkeys(["eval_loss", *NONFINITE_NULLED]))
    return {**scores, "examples": [{"ref": r, "hyp": h} for r, h in zip(refs[:examples], hyps[:examples])]}


def check_ctc_head(source: str, config, tokenizer, new_ctc_head: bool) -> None:
    """A model that already has a CTC head must be trained on with the vocabulary of that head."""
    if new_ctc_head or not any("ForCTC" in a for a in (config.architectures or [])):
        return
    try:
        head_tokenizer = Wav2Vec2CTCTokenizer.from_pretrained(source)
    except Exception:
        head_tokenizer = None
    ours = tokenizer.get_vocab()
    if head_tokenizer is not None and head_tokenizer.get_vocab() != ours:
        theirs = head_tokenizer.get_vocab()
        only_ours = sorted(set(ours) - set(theirs))
        only_theirs = sorted(set(theirs) - set(ours))
        raise ValueError(
            f"vocabulary mismatch: {source} has a CTC head trained with its own vocabulary ({len(theirs)} tokens) and the "
            f"vocabulary of this run differs ({len(ours)} tokens; only here: {only_ours[:20]}, only there: {only_theirs[:20]}"
            f"{', same tokens in another order' if not only_ours and not only_theirs else ''}). Reuse its vocabulary with "
            f"--tokenizer_name_or_path {source}, or train a new head with --new_ctc_head"
        )
    if head_tokenizer is None and config.vocab_size != len(ours):
        raise ValueError(
            f"vocabulary mismatch: {source} has a CTC head with {config.vocab_size} outputs and no tokenizer to say which "
            f"characters they are; this run's vocabulary has {len(ours)} tokens. Give its tokenizer with "
            f"--tokenizer_name_or_path, or train a new head with --new_ctc_head"
        )


def transcribe(
    paths, model, processor, chunk_seconds: float = 30.0, context_seconds: float = 2.0, device="cpu"
) -> list[str]:
    """Greedy CTC transcripts of audio files of any length, format, rate and channel count.

    Long files are read by seeking, `chunk_seconds` at a time, each chunk with `context_seconds` of
    audio on both sides so that words at a chunk edge are heard whole; only the frames of the chunk
    itself are kept, and the frame sequence of the whole file is decoded at once.
    """
    model = model.to(device).eval()
    tokenizer, feature_extractor = processor.tokenizer, processor.feature_extractor
    # receptive field: the fewest samples that make a frame
    min_samples, samples_per_frame = conv_geometry(model.config)
    texts = []
    for path in paths:
        seconds = sf.info(str(path)).duration
        frame_ids = []
        for chunk_start in np.arange(0.0, max(seconds, 1e-9), chunk_seconds):
            chunk_end = min(seconds, chunk_start + chunk_seconds)
            read_start = max(0.0, chunk_start - context_seconds)
            audio = load_audio(path, read_start, min(seconds, chunk_end + context_seconds))
            if feature_extractor.do_normalize:
                audio = normalize_waveform(audio)
            if len(audio) < min_samples:
                audio = np.pad(audio, (0, min_samples - len(audio)))
            with torch.no_grad():
                logits = model(torch.from_numpy(audio)[None].to(device)).logits[0]
            first = int(round((chunk_start - read_start) * TARGET_SAMPLE_RATE / samples_per_frame))
            last = int(round((chunk_end - read_start) * TARGET_SAMPLE_RATE / samples_per_frame))
            frame_ids.append(logits[first:last].argmax(-1).cpu())
        ids = torch.cat(frame_ids).tolist() if frame_ids else []
        texts.append(tokenizer.decode(ids))  # as greedy_decode: the pipeline's text, spaces unfolded
    return texts
