"""The flags of finetune_ctc.py: model (encoder, CTC head, regularisation), data (manifests or a
Hugging Face dataset, text normalisation, long utterances) and training (the shared training-loop
flags with fine-tuning's defaults). A YAML recipe may set any of them (utils.training)."""

from __future__ import annotations

from dataclasses import dataclass, field

from utils.training import TrainingArguments
from utils.vocabulary import DEFAULT_CHARS_TO_IGNORE, DEFAULT_WORD_SEPARATORS


@dataclass
class ModelArguments:
    model_name_or_path: str = field(
        default="facebook/wav2vec2-base",
        metadata={
            "help": "Encoder to fine-tune: a pretrain.py output folder, a hub id or any local wav2vec2 checkpoint."
        },
    )
    config_name: str | None = field(
        default=None,
        metadata={
            "help": "Random init from this config folder instead (tests, benchmarks); model_name_or_path is then not read."
        },
    )
    tokenizer_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Reuse this Wav2Vec2CTCTokenizer (e.g. an earlier fine-tuning output) instead of building the vocabulary from the training transcripts."
        },
    )
    new_ctc_head: bool = field(
        default=False,
        metadata={
            "help": "Start a fresh CTC head even if the model already has one (for a model fine-tuned with another vocabulary)."
        },
    )
    freeze_feature_encoder: bool = field(
        default=True,
        metadata={"help": "Keep the CNN feature encoder fixed (the usual choice for a pretrained encoder)."},
    )
    attention_dropout: float = field(default=0.1)
    activation_dropout: float = field(default=0.0)
    hidden_dropout: float = field(default=0.1)
    feat_proj_dropout: float = field(default=0.0)
    final_dropout: float = field(default=0.0, metadata={"help": "Dropout before the CTC head."})
    layerdrop: float = field(
        default=0.05, metadata={"help": "Probability of skipping a whole transformer layer in a training step."}
    )
    mask_time_prob: float = field(
        default=0.05,
        metadata={"help": "SpecAugment: share of frames that start a masked span (only real frames, never padding)."},
    )
    mask_time_length: int = field(default=10)
    mask_feature_prob: float = field(default=0.0)
    mask_feature_length: int = field(default=10)
    initial_blank_probability: float = field(
        default=0.8,
        metadata={
            "help": "A new CTC head starts out giving the blank this probability (through its bias). "
            "Starting uniform, the encoder first collapses to all-blank output and can stay there for hundreds of steps. 0 keeps a zero bias."
        },
    )
    ctc_zero_infinity: bool = field(
        default=True,
        metadata={
            "help": "Zero the loss of utterances too short for their transcript instead of letting inf/nan into the gradients."
        },
    )
    attn_implementation: str = field(
        default="sdpa", metadata={"help": "sdpa, eager, flash_attention_2 or flex_attention."}
    )


@dataclass
class DataArguments:
    train_manifest: str | None = field(
        default=None, metadata={"help": "TSV with path and text (optional start, end, participant)."}
    )
    dev_manifest: str | None = field(
        default=None, metadata={"help": "Dev TSV; without it, whole participants of the train manifest are split off."}
    )
    dev_fraction: float = field(
        default=0.1,
        metadata={
            "help": "Without --dev_manifest (or a dataset's eval split): share of the train audio hours (whole participants) used for dev; 0 for no dev set."
        },
    )
    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "Instead of manifests: a Hugging Face dataset (hub id, local folder such as an audiofolder, or a save_to_disk folder)."
        },
    )
    dataset_config_name: str | None = field(default=None)
    train_split_name: str = field(default="train")
    eval_split_name: str = field(
        default="validation",
        metadata={
            "help": "Dev split; a dataset without it (or naming the train split here) has whole participants split off by --dev_fraction."
        },
    )
    audio_column_name: str = field(default="audio")
    text_column_name: str = field(default="text")
    participant_column_name: str | None = field(
        default=None,
        metadata={"help": "Speaker/participant column: a dev set split off the train split never shares one."},
    )
    dataset_streaming: bool = field(
        default=False,
        metadata={
            "help": "Read the train split as a stream while training (corpora larger than the disk); the eval split is read once."
        },
    )
    stream_shuffle_buffer: int = field(
        default=1000, metadata={"help": "With --dataset_streaming: examples shuffled together as the stream is read."}
    )
    chars_to_ignore: str = field(
        default=DEFAULT_CHARS_TO_IGNORE,
        metadata={"help": "Characters deleted from transcripts (all of the string's characters)."},
    )
    word_separators: str = field(
        default=DEFAULT_WORD_SEPARATORS,
        metadata={
            "help": "Characters that stand between words, each made a space before --chars_to_ignore applies (dashes U+2012-2015, '|', the dandas '।' and '॥'). '' keeps them as they were: dashes stay characters, --chars_to_ignore deletes the rest."
        },
    )
    do_lower_case: bool = field(
        default=True,
        metadata={"help": "Lowercase transcripts (scripts without case, such as Devanagari, are unaffected)."},
    )
    max_duration_seconds: float = field(
        default=20.0,
        metadata={
            "help": "Training utterances longer than this are counted, reported and handled by --long_utterances."
        },
    )
    long_utterances: str = field(
        default="alone",
        metadata={
            "help": "'alone': train on them in batches of their own (memory of one long utterance); 'skip': leave them out of training. Dev keeps them either way."
        },
    )
    group_by_length: bool = field(
        default=True,
        metadata={"help": "Batch utterances of similar length (less padding); off gives plain shuffled batches."},
    )
    eval_examples_to_log: int = field(
        default=3, metadata={"help": "Reference/hypothesis pairs printed at each evaluation."}
    )


@dataclass
class CTCTrainingArguments(TrainingArguments):
    output_dir: str = field(
        default="runs/wav2vec2-ctc", metadata={"help": "Model, processor, checkpoints, logs and model card go here."}
    )
    max_train_steps: int = field(default=10000, metadata={"help": "Optimizer updates to run."})
    learning_rate: float = field(default=1e-4)
    warmup_steps: int = field(default=500)


def config_overrides(model_args: ModelArguments, vocab_size: int, pad_token_id: int) -> dict:
    """The model config values the flags set: the CTC head's size and loss, dropout, SpecAugment."""
    return dict(
        vocab_size=vocab_size,
        pad_token_id=pad_token_id,
        ctc_loss_reduction="mean",
        ctc_zero_infinity=model_args.ctc_zero_infinity,
        attention_dropout=model_args.attention_dropout,
        activation_dropout=model_args.activation_dropout,
        hidden_dropout=model_args.hidden_dropout,
        feat_proj_dropout=model_args.feat_proj_dropout,
        final_dropout=model_args.final_dropout,
        layerdrop=model_args.layerdrop,
        mask_time_prob=model_args.mask_time_prob,
        mask_time_length=model_args.mask_time_length,
        mask_feature_prob=model_args.mask_feature_prob,
        mask_feature_length=model_args.mask_feature_length,
    )
