# Two commands do everything on a fresh clone:  make demo  and  make test.
# Both create .venv from uv.lock with uv (installing uv first when it is not on PATH).

SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.synced
UV     := $(shell command -v uv 2>/dev/null)
ifeq ($(UV),)
UV     := .tools/bin/uv
endif
PYTEST_ARGS ?=
DEMO_DIR ?= demo_output

.PHONY: help venv demo test test-all lint clean

help:
	@echo "make demo      create the environment, then run the end-to-end demo on CPU (writes $(DEMO_DIR)/)"
	@echo "make test      create the environment, then run the default test suite (not slow)"
	@echo "make test-all  every test, slow ones included (gpu tests skip without CUDA)"
	@echo "make lint      ruff"

# uv itself, when it is not on PATH: a private tools venv, so that no system Python is touched
.tools/bin/uv:
	python3 -m venv .tools
	.tools/bin/python -m pip install --quiet --disable-pip-version-check uv

# the environment is (re)built whenever the lock or the project metadata changes; bytecode is compiled
# at install time (~35 s once) because imports of torch/open_clip are twice as slow without .pyc files
# and many environments (CI included) set PYTHONDONTWRITEBYTECODE
$(STAMP): uv.lock pyproject.toml | $(UV)
	$(UV) sync --frozen --extra dev --compile-bytecode
	@touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	rm -rf $(DEMO_DIR)
	$(PY) scripts/fetch_samples.py
	$(PY) scripts/ctclip_make_synthetic.py --config configs/ctclip/synthetic_small.yaml \
		--out_dir $(DEMO_DIR)/ct_rate --overwrite --montage $(DEMO_DIR)/chest_montage.png
	$(PY) scripts/ctclip_preprocess.py --config configs/ctclip/preprocess_small.yaml --overwrite \
		--ct_data_path $(DEMO_DIR)/ct_rate/volumes/train --ct_out_path $(DEMO_DIR)/ct_rate/train_volumes.h5 \
		--metadata_path $(DEMO_DIR)/ct_rate/train_metadata.csv
	$(PY) scripts/ctclip_preprocess.py --config configs/ctclip/preprocess_small.yaml --overwrite \
		--ct_data_path $(DEMO_DIR)/ct_rate/volumes/valid --ct_out_path $(DEMO_DIR)/ct_rate/valid_volumes.h5 \
		--metadata_path $(DEMO_DIR)/ct_rate/validation_metadata.csv
	$(PY) scripts/ctclip_split.py --data_dir $(DEMO_DIR)/ct_rate --target_val_size 6 --seed 42
	$(PY) scripts/ctclip_train.py --config configs/ctclip/train_tiny.yaml --max_steps 120 \
		--ct_filepath $(DEMO_DIR)/ct_rate/train_volumes.h5 --txt_filepath $(DEMO_DIR)/ct_rate/train_reports.csv \
		--do_validate --valid_interval 40 --val_ct_filepath $(DEMO_DIR)/ct_rate/valid_volumes.h5 \
		--val_label_path $(DEMO_DIR)/ct_rate/valid_predicted_labels.csv --output_dir $(DEMO_DIR)/ctclip_tiny
	$(PY) scripts/ctclip_eval.py --model_path $(DEMO_DIR)/ctclip_tiny/best.pt \
		--test_data $(DEMO_DIR)/ct_rate/valid_volumes.h5 --test_labels $(DEMO_DIR)/ct_rate/test_predicted_labels.csv \
		--reports $(DEMO_DIR)/ct_rate/test_reports.csv --output_dir $(DEMO_DIR)/ctclip_eval --num_workers 0
	$(PY) scripts/hemorrhage_make_synthetic.py --config configs/hemorrhage/synthetic_small.yaml \
		--out_dir $(DEMO_DIR)/rsna --overwrite --montage $(DEMO_DIR)/head_montage.png
	$(PY) scripts/hemorrhage_make_synthetic.py --config configs/hemorrhage/synthetic_small.yaml \
		--out_dir $(DEMO_DIR)/rsna_train --overwrite --n_studies 48 --size 64 --seed 3 --broken 0
	# the tiny CNN on both folds of a 2-fold split (so every training study has out-of-fold features)
	for f in 0 1; do $(PY) scripts/hemorrhage_train.py --config configs/hemorrhage/train_tiny.yaml --no_progress \
		--labels $(DEMO_DIR)/rsna_train/labels.csv --data_dir $(DEMO_DIR)/rsna_train/dicom \
		--output_dir $(DEMO_DIR)/hemorrhage_cnn --n_folds 2 --fold $$f || exit 1; done
	$(PY) scripts/hemorrhage_extract_features.py --data_dir $(DEMO_DIR)/rsna_train/dicom --no_progress \
		--weights_dir $(DEMO_DIR)/hemorrhage_cnn --output_dir $(DEMO_DIR)/hemorrhage_features --num_workers 0
	$(PY) scripts/hemorrhage_train_sequence.py --config configs/hemorrhage/sequence_tiny.yaml --no_progress \
		--features_dir $(DEMO_DIR)/hemorrhage_features --labels $(DEMO_DIR)/rsna_train/labels.csv \
		--output_dir $(DEMO_DIR)/hemorrhage_sequence --fold 0
	# held-out studies (another seed, 64 px like the training set); exit 3 is expected: the set's two
	# broken files are skipped and listed
	$(PY) scripts/hemorrhage_make_synthetic.py --config configs/hemorrhage/synthetic_small.yaml \
		--out_dir $(DEMO_DIR)/rsna_test --overwrite --n_studies 8 --size 64 --seed 4
	$(PY) scripts/hemorrhage_infer.py --data_dir $(DEMO_DIR)/rsna_test/dicom --weights_dir $(DEMO_DIR)/hemorrhage_cnn \
		--sequence_weights $(DEMO_DIR)/hemorrhage_sequence --no_progress --num_workers 0 \
		--output $(DEMO_DIR)/hemorrhage_infer/predictions.csv; rc=$$?; test $$rc -eq 0 -o $$rc -eq 3
	$(PY) scripts/hemorrhage_eval.py --predictions $(DEMO_DIR)/hemorrhage_infer/predictions.csv \
		--labels $(DEMO_DIR)/rsna_test/labels.csv --train_labels $(DEMO_DIR)/rsna_train/labels.csv \
		--per_slice $(DEMO_DIR)/hemorrhage_infer/predictions_per_slice.csv --output_dir $(DEMO_DIR)/hemorrhage_eval
	@echo "demo outputs: $(DEMO_DIR)/ct_rate (volumes, CSVs, train/valid_volumes.h5, split)  $(DEMO_DIR)/rsna"
	@echo "              $(DEMO_DIR)/ctclip_tiny (latest.pt, best.pt, train_log.jsonl, tensorboard/)"
	@echo "              $(DEMO_DIR)/ctclip_eval (scores.csv, metrics_per_finding.csv, summary.json, roc_curves.png, retrieval.json)"
	@echo "              $(DEMO_DIR)/rsna_train, rsna_test (synthetic head CT studies)  $(DEMO_DIR)/hemorrhage_cnn (tiny CNN,"
	@echo "              2 folds, original-format checkpoints)  hemorrhage_features (out-of-fold)  hemorrhage_sequence (head)"
	@echo "              $(DEMO_DIR)/hemorrhage_infer (predictions.csv, _per_slice, _per_study, _run.json, _errors, _manifest)"
	@echo "              $(DEMO_DIR)/hemorrhage_eval (metrics.json, metrics.csv, roc_curves.png: the tiny model on held-out studies)"
	@echo "              $(DEMO_DIR)/chest_montage.png  $(DEMO_DIR)/head_montage.png"

test: $(STAMP)
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

test-all: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check ctcore ctclip hemorrhage scripts tests

clean:
	rm -rf $(VENV) .tools $(DEMO_DIR) .pytest_cache .ruff_cache
