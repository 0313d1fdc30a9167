# Two entry points on a fresh clone: `make demo` and `make test`.
# Each creates the virtual environment .venv first (torch pinned by requirements/torch.txt).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv demo test lint clean figures

# The real CIFAR-10 as a folder of images (train/<class>/, test/<class>/); `make figures`
# reruns every paper_repro spec at cpu scale into repro/ and copies its report, figures and
# CSVs into figures/SPEC/ (runs already finished are skipped).
CIFAR ?= data/cifar10-jpeg
SPECS ?= keskar keskar-ablation masters-luschi accumulation noise-scale noise-scale-edge edge-of-stability sam generalization-measures

venv: $(STAMP)

$(STAMP): pyproject.toml requirements/torch.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements/torch.txt
	$(BIN)/python -m pip install --quiet -e '.[dev,ray,bench]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/sharp demo --out runs/demo

figures: $(STAMP)
	set -e; for spec in $(SPECS); do \
	  $(BIN)/sharp repro $$spec --scale cpu --dataset folder:$(CIFAR) --out repro/$$spec-cpu; \
	  rm -rf figures/$$spec; mkdir -p figures/$$spec; \
	  cp repro/$$spec-cpu/figures/* repro/$$spec-cpu/repro.json figures/$$spec/; \
	  sed 's#](figures/#](#g' repro/$$spec-cpu/report.md > figures/$$spec/report.md; \
	done

lint: $(STAMP)
	$(BIN)/ruff check .

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs repro .pytest_cache .ruff_cache
