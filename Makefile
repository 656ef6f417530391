# `make demo` sets up .venv and runs the whole pipeline on a synthetic corpus; `make test` runs the lint
# checks and every test (CI runs exactly that); `make test-fast` leaves out the tests marked slow.
PYTHON ?= python3
VENV ?= .venv
# Override for another build, e.g. `make setup TORCH=torch==2.14.1` (CUDA wheels from PyPI on Linux).
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
DEMO := demo_data

.PHONY: setup demo adaptation lint test test-fast clean-demo

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

demo: setup
	$(PY) data/make_demo_corpus.py $(DEMO)/audio --labelled_dir $(DEMO)/labelled
	$(PY) data/prepare_manifest.py $(DEMO)/audio --output_dir $(DEMO)/manifests
	$(PY) bench/loader_throughput.py --manifest $(DEMO)/manifests/train.tsv --num_crops 200
	$(VENV)/bin/accelerate launch --config_file accelerate_configs/cpu.yaml pretrain.py configs/recipes/demo-tiny.yaml --overwrite_output_dir
	$(PY) finetune_ctc.py configs/recipes/demo-ctc-tiny.yaml --overwrite_output_dir
	$(PY) transcribe.py --model_name_or_path $(DEMO)/ctc $(DEMO)/labelled/audio/S06_utt001.flac $(DEMO)/labelled/audio/S06_session.flac
	$(PY) extract_features.py --model_name_or_path $(DEMO)/pretrained --layers all --pooling meanstd --output_dir $(DEMO)/features --overwrite_output_dir $(DEMO)/manifests/dev.tsv
	@echo "demo outputs in $(DEMO)/: pretrained/ (model, README.md model card, loss_curve.png), ctc/ (eval_results.json), features/ (index.tsv)"

# Does continued pretraining help? S, S+ and T on a synthetic domain shift, 3 seeds: ~20 min on 2 idle CPU cores.
# `make adaptation ADAPTATION_ARGS="--scale 10"` on a GPU; the script's --help lists the flags.
ADAPTATION_DIR ?= experiments/runs/adaptation
adaptation: setup
	HF_HUB_OFFLINE=1 $(PY) experiments/adaptation.py --work_dir $(ADAPTATION_DIR) $(ADAPTATION_ARGS)
	@echo "adaptation report: $(ADAPTATION_DIR)/adaptation_report.md (plot adaptation_layers.png, figures adaptation_results.json)"

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# pytest exits 5 when it collects no tests: reported, not failed.
test: lint
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q tests || { rc=$$?; [ $$rc -eq 5 ] && echo "pytest collected no tests" || exit $$rc; }

test-fast: setup
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m "not slow" tests || { rc=$$?; [ $$rc -eq 5 ] && echo "pytest collected no tests" || exit $$rc; }

clean-demo:
	rm -rf $(DEMO)
