"""What the scripts share, one concern per module. Scripts import from here; nothing here imports a script.

Every script
  audio              seeking reads at 16 kHz mono, resampling, downmix; the conv encoder's frame geometry
  manifests          scan, validate and split recordings by participant; strict TSV manifests and their columns
  training           shared training flags and YAML recipes, the Accelerator, loaders, logs
  processes          SIGTERM polled between updates, loader workers that ignore it, a clean exit
  recipes            reading a YAML recipe safely (plain values only), errors that name the line
  checkpoints        atomic checkpoints of plain data (save, list; a failed write leaves nothing), model folders
  checkpoint_loading resume: every file checked, read as plain data, then applied; 'latest' skips corrupt ones
  cards              model-card figures and YAML header, base-model lineage; the Hub push (private, allowlisted)
  run_folder         whose output folder it is: another run refused, resumed, or replaced (--overwrite_output_dir)
  numerics           NaN/Inf guards: audio samples, skipped updates and their count, weights, null metrics
  hf_datasets        Hugging Face datasets without torchcodec: load (hub, folders, save_to_disk, streams), undecoded audio
  progress           a progress bar on a terminal, a line every --progress_interval seconds in a log file
  hourglass          the Hourglass encoder (config field hourglass); which config and model class a folder needs
pretrain.py
  pretrain_arguments its flags
  crops              CropStream: silence-filtered random crops of long recordings
  dataset_recordings the recordings of a Hugging Face dataset as manifest rows, read in place
  objective          masks and negatives per crop, the contrastive and diversity losses, feature penalty, Gumbel schedule
  step_memory        the pretraining step in less memory, numbers unchanged: a lean quantizer, the first conv layer recomputed
  pretrain_log       the train-log rows
  training_health    warnings (or a stop) when a run is not learning: loss at chance, collapsed features or codes
  pretrain_card      the loss curve and the model card
finetune_ctc.py, transcribe.py
  ctc_arguments      its flags
  vocabulary         transcript normalisation, the character vocabulary and tokenizer
  utterances         labelled utterances from manifests; dataset and collator
  dataset_utterances labelled utterances from a Hugging Face dataset; the dev split
  utterance_stream   training batches from a streamed dataset (--dataset_streaming)
  ctc_corpus         what is left out of training and why; the data figures
  batches            length-grouped batches, a pure function of (seed, epoch); the loaders
  ctc                CTC loss, SpecAugment on real frames, greedy decoding, WER/CER evaluation, long-file transcription
  ctc_run            the run's fixed context and its progress (what a checkpoint stores)
  ctc_card           eval_results.json and the model card
extract_features.py
  segments           which region of which file goes to which output file (inputs, RTTM/TSV segments)
  windows            the frame grid: the windows the model runs on, which frames are kept, batching
  features           the output files (frame features written window by window, pooled sums), index.tsv
  extraction_folder  the lock on the features folder; outputs of other flags refused or removed
probe.py (and pretrain.py --probe_segments)
  probe_data         labelled segments (TSV, RTTM), participants, the participant split, frame labels
  probe_features     every layer's features pooled per segment (or per frame) in memory; dev loss on fixed crops
  probes             logistic-regression probes per layer; accuracy, macro-F1, UAR, bootstrap intervals, chance
  probe_report       probe_results.json, probe_report.md, probe_layers.png
experiments/adaptation.py
  adaptation         S / S+ / T scores over seeds, paired gains with a bootstrap over seeds and segments; report, plot
"""
