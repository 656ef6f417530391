"""What the scripts share, one concern per module. Scripts import from here; nothing here imports a script.

Every script
  audio              seeking reads at 16 kHz mono, resampling, downmix; the conv encoder's frame geometry
  manifests          scan, validate and split recordings by participant; TSV manifests and their columns
  training           shared training flags and YAML recipes, the Accelerator, loaders, logs, SIGTERM, clean exit
  checkpoints        atomic checkpoints (save, list, resolve 'latest', load) and atomic model folders
  cards              model-card figures, software versions, hardware; the Hub push
  hourglass          the Hourglass encoder (config field hourglass); which config and model class a folder needs
pretrain.py
  pretrain_arguments its flags
  crops              CropStream: silence-filtered random crops of long recordings
  objective          masks and negatives per crop, feature penalty, contrastive accuracy, Gumbel schedule
  pretrain_log       the train-log rows
  pretrain_card      the loss curve and the model card
finetune_ctc.py, transcribe.py
  ctc_arguments      its flags
  vocabulary         transcript normalisation, the character vocabulary and tokenizer
  utterances         labelled utterances from manifests or a Hugging Face dataset; dataset and collator
  ctc_corpus         what is left out of training and why; the data figures
  batches            length-grouped batches, a pure function of (seed, epoch); the loaders
  ctc                CTC loss, SpecAugment on real frames, greedy decoding, WER/CER evaluation, long-file transcription
  ctc_run            the run's fixed context and its progress (what a checkpoint stores)
  ctc_card           eval_results.json and the model card
extract_features.py
  segments           which region of which file goes to which output file (inputs, RTTM/TSV segments)
  windows            the frame grid: the windows the model runs on, which frames are kept, batching
  features           the output files (frame features written window by window, pooled sums), index.tsv
"""
