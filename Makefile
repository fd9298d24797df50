# flair2-kit: every target creates .venv on first use, so a fresh machine needs only `make demo` / `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE ?= 0
export NO_ALBUMENTATIONS_UPDATE := 1
export PYTHONUNBUFFERED := 1

# Knobs (override on the command line): make train FOLD=0 CONFIG=configs/unet_r34.yaml lr=1e-3
DATA ?= data
RAW ?= data/raw
SYNTH ?= data/synth
SUBSET ?= all
SOURCE ?= ovh
KEEP_ZIPS ?= 1
K ?= 5
SEED ?= 42
SCHEME ?= stratified
CONFIG ?= configs/unet_r34.yaml
FOLD ?= 0
GPUS ?= 1
NODES ?= 1
TORCHRUN_ARGS ?=
RESUME ?= 0
TTA ?=
ENGINE ?=
SPLIT ?= test
RECIPE ?=
ENSEMBLE_RUNS ?= $(RUNS)
# One name for a run, its predictions and its submission. NAME= when given; else a RECIPE's stem; else the `name`
# of CONFIG when CONFIG is given; else the run `make train` started last (runs/latest); else the default CONFIG's.
CONFIG_NAME = $(or $(shell sed -n 's/^name:[[:space:]]*"\{0,1\}\([^"#[:space:]]*\).*/\1/p' $(CONFIG) 2>/dev/null | head -n 1),$(basename $(notdir $(CONFIG))))
LATEST = $(shell cat runs/latest 2>/dev/null)
NAME ?= $(if $(RECIPE),$(basename $(notdir $(RECIPE))),$(if $(filter command line,$(origin CONFIG)),$(CONFIG_NAME),$(or $(LATEST),$(CONFIG_NAME))))
NAME_FROM = $(if $(filter command line,$(origin NAME)),NAME=,$(if $(RECIPE),RECIPE=$(RECIPE),$(if $(filter command line,$(origin CONFIG)),CONFIG=$(CONFIG),$(if $(LATEST),the run make train started last: runs/latest,the default CONFIG=$(CONFIG)))))
RUNS ?= runs/$(NAME)
# The models of predict, pseudo and submit: a recipe's when RECIPE is given, else every checkpoint under RUNS.
MODELS_ARG = $(if $(RECIPE),--recipe $(RECIPE),--runs $(RUNS))
PRED ?= predictions/$(NAME)
PSEUDO ?= data/pseudo
# One line saying which run a step uses when neither RUNS nor PRED was typed.
SAY_RUN = @$(if $(filter command line,$(origin RUNS) $(origin PRED)),:,echo "make: NAME=$(NAME) (from $(NAME_FROM)): $(1)")
LABELS ?=
DEMO ?= data/demo
TB_DIR ?= runs
PORT ?= 6006
TREE ?= /tmp/flair_scale
SCALE_WORK ?= /tmp/flair_scale_work
TRAIN_NAME = $(if $(filter command line,$(origin NAME)),name=$(NAME))
KNOBS := DATA RAW SYNTH SUBSET SOURCE KEEP_ZIPS K SEED SCHEME CONFIG FOLD GPUS NODES RESUME RUNS TTA ENGINE SPLIT \
	PRED NAME LABELS DEMO PYTHON ARGS ROOT EDA_DATA TORCHRUN_ARGS SRC OUT BANDS \
	TB_DIR PORT TREE SCALE_WORK RECIPE ENSEMBLE_RUNS PSEUDO MODELS_ARG CONFIG_NAME LATEST NAME_FROM SAY_RUN TRAIN_NAME \
	ENGINE_ARG
# Every other VAR=value on the command line is a config override (key=value) for train/predict.
OVERRIDES = $(strip $(foreach v,$(filter-out $(KNOBS),$(.VARIABLES)),$(if $(filter command line,$(origin $(v))),$(v)=$($(v)))) \
	$(ARGS) \
	$(if $(filter command line,$(origin DATA)),data_dir=$(DATA)))
# The engine of predict, pseudo, submit and infer (torch | onnx | auto: onnx on a CPU).
ENGINE_ARG = $(if $(ENGINE),engine=$(ENGINE))

.DEFAULT_GOAL := help
.PHONY: help venv synth index download folds train oof ensemble predict pseudo submit evaluate export infer tensorboard demo eda settings test test-all lint bench scale-bench clean

help: ## list every target
	@grep -E '^[a-z][a-z0-9_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

$(STAMP): requirements.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -r requirements.txt
	@touch $(STAMP)

venv: $(STAMP) ## create .venv and install requirements.txt (every target does this first)

synth: $(STAMP) ## write a small synthetic dataset in the exact FLAIR #2 layout under SYNTH=data/synth
	$(PY) -m src.synth --out $(SYNTH) $(ARGS)

index: $(STAMP) ## index a data tree (ROOT=data/raw or data/synth) into DATA/index_{train,test}.csv
	$(PY) -m src.index --root $(or $(ROOT),$(if $(wildcard $(RAW)),$(RAW),$(SYNTH))) --out $(DATA) $(ARGS)

download: $(STAMP) ## download + verify + extract the real data (SUBSET=toy|aux|train|test|all, SOURCE=ovh|hf)
	$(PY) -m src.download --subset $(SUBSET) --out $(RAW) --source $(SOURCE) --keep-zips $(KEEP_ZIPS) --index-out $(DATA) $(ARGS)

folds: $(STAMP) ## split training domains into K folds by domain (K=5 SEED=42 SCHEME=stratified|hf)
	$(PY) -m src.folds --data $(DATA) --k $(K) --seed $(SEED) --scheme $(SCHEME) $(ARGS)

train: $(STAMP) ## train one fold: FOLD=0|all CONFIG=configs/x.yaml GPUS=1 [NODES TORCHRUN_ARGS] RESUME=0 key=value...
ifeq ($(GPUS)$(NODES),11)
	$(PY) -m src.train --config $(CONFIG) --fold $(FOLD) --resume $(RESUME) $(TRAIN_NAME) $(OVERRIDES)
else
	$(VENV)/bin/torchrun --nnodes $(NODES) --nproc-per-node $(GPUS) $(TORCHRUN_ARGS) -m src.train --config $(CONFIG) --fold $(FOLD) --resume $(RESUME) $(TRAIN_NAME) $(OVERRIDES)
endif

oof: $(STAMP) ## (re)write the out-of-fold probabilities of every fold under RUNS at TTA=none|flip|d4
	$(call SAY_RUN,out-of-fold stores of $(RUNS))
	$(PY) -m src.oof --runs $(RUNS) --tta $(or $(TTA),none) $(OVERRIDES)

ensemble: $(STAMP) ## search a recipe on the OOF stores of ENSEMBLE_RUNS="runs/a runs/b" into RECIPE=recipes/recipe.json
	$(PY) -m src.blend --runs $(ENSEMBLE_RUNS) --out $(or $(RECIPE),recipes/recipe.json) $(if $(filter command line,$(origin DATA)),--data $(DATA)) $(if $(TTA),--tta $(TTA)) $(ARGS)

predict: $(STAMP) ## predict SPLIT=test with every checkpoint under RUNS (or a RECIPE) (TTA, ENGINE, fold/model ensemble) into PRED
	$(call SAY_RUN,predicting with $(if $(RECIPE),$(RECIPE),$(RUNS)) into $(PRED))
	$(PY) -m src.predict $(MODELS_ARG) --split $(SPLIT) --out $(PRED) $(if $(TTA),--tta $(TTA)) $(ENGINE_ARG) $(OVERRIDES)

pseudo: $(STAMP) ## pseudo-label SPLIT=test with RUNS (or a RECIPE) at TTA into PSEUDO=data/pseudo (class + confidence)
	$(call SAY_RUN,pseudo-labels from $(if $(RECIPE),$(RECIPE),$(RUNS)))
	$(PY) -m src.predict $(MODELS_ARG) --split $(SPLIT) --out $(PSEUDO)/pred \
		--save-probs $(PSEUDO)/probs $(if $(TTA),--tta $(TTA)) $(ENGINE_ARG) $(OVERRIDES)
	$(PY) -m src.pseudo --probs $(PSEUDO)/probs --index $(DATA)/index_$(SPLIT).csv --out $(PSEUDO) \
		--skipped $(PSEUDO)/pred/skipped.txt

submit: $(STAMP) ## predict the test index, validate and zip into submissions/ (NAME=approach; RECIPE=recipes/recipe.json)
	$(call SAY_RUN,submitting $(if $(RECIPE),$(RECIPE),$(RUNS)) as $(NAME) from $(PRED))
	$(PY) -m src.predict $(MODELS_ARG) --split test --out $(PRED) $(if $(TTA),--tta $(TTA)) --submit $(NAME) $(ENGINE_ARG) $(OVERRIDES)

evaluate: $(STAMP) ## score predictions (PRED=folder or zip) against labels with the official mIoU
	$(call SAY_RUN,scoring $(PRED))
	$(PY) -m src.evaluate --pred $(PRED) --index $(DATA)/index_$(SPLIT).csv $(if $(LABELS),--labels $(LABELS)) --json $(basename $(PRED))_scores.json --png $(basename $(PRED))_confusion.png

export: $(STAMP) ## fp16 slim checkpoint + ONNX beside every best.pt under RUNS, both checked against PyTorch
	$(call SAY_RUN,exporting $(RUNS))
	$(PY) -m src.export --runs $(RUNS) $(ARGS)

infer: $(STAMP) ## whole orthophoto(s) -> land-cover GeoTIFF (aerial-only models): SRC=ortho.tif|dir|list.txt OUT=file.tif|dir RUNS= [TTA= ENGINE= BANDS= GPUS=]
ifeq ($(GPUS),1)
	$(PY) -m src.infer --runs $(RUNS) --src $(SRC) --out $(OUT) $(if $(TTA),--tta $(TTA)) $(if $(BANDS),--bands $(BANDS)) $(ENGINE_ARG) $(OVERRIDES)
else
	$(VENV)/bin/torchrun --nproc-per-node $(GPUS) -m src.infer --runs $(RUNS) --src $(SRC) --out $(OUT) $(if $(TTA),--tta $(TTA)) $(if $(BANDS),--bands $(BANDS)) $(ENGINE_ARG) $(OVERRIDES)
endif

tensorboard: $(STAMP) ## live curves, per-class IoU and validation pictures of every run under TB_DIR=runs (PORT=6006)
	$(VENV)/bin/tensorboard --logdir $(TB_DIR) --port $(PORT)

demo: $(STAMP) ## whole chain on CPU on synthetic data: synth, index, folds, train (S2 fusion vs aerial only), predict, submit, evaluate
	bash scripts/demo.sh $(DEMO)

eda: $(STAMP) ## execute notebooks/eda.ipynb headlessly (EDA_DATA=path) into notebooks/out/ (+ HTML)
	$(PY) -m src.eda $(if $(EDA_DATA),--data $(EDA_DATA)) $(ARGS)

settings: $(STAMP) ## print every setting: type, default, allowed values, the jobs that read it, what it does
	@$(PY) -m src.train --settings

test: $(STAMP) ## run the fast test suite (what CI runs)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m "not slow" $(ARGS)

test-all: $(STAMP) ## run every test, slow ones included
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q $(ARGS)

lint: $(STAMP) ## ruff check
	$(VENV)/bin/ruff check src tests bench

bench: $(STAMP) ## run the CPU benchmarks under bench/ but the scale one (figures go to BENCHMARKS.md by hand)
	for b in bench/*_bench.py; do [ $$b = bench/scale_bench.py ] || $(PY) $$b || exit 1; done

scale-bench: $(STAMP) ## the chain at the real data's size under ulimit -n 1024 (TREE=/tmp/flair_scale: 0.5 GB; ~90 min on 2 cores)
	test -f $(TREE)/.scale_tree.json || $(PY) bench/scale_tree.py --out $(TREE)
	$(PY) bench/scale_bench.py --tree $(TREE) --work $(SCALE_WORK)

clean: ## remove caches and the demo outputs (keeps .venv, data/raw and runs/)
	rm -rf .pytest_cache .ruff_cache $(DEMO) runs/demo predictions/demo
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
