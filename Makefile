# Set-up and the two top-level jobs. TORCH_SPEC selects the torch build (CPU wheel by default;
# e.g. TORCH_SPEC="torch==2.13.0 --index-url <cuda index>" on a GPU machine).
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
DEMO_RUN ?= runs/demo

.PHONY: setup demo test lint test-rest test-all wheel-check bench train-suite suite train-generalist generalist-suite clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e ".[dev]"
	# BenchMARL (train.backend=benchmarl) without the torchvision, av and hydra it declares and
	# does not use here: the torchvision this index resolves pulls in a CUDA torch, and one built
	# for another torch breaks the import of transformers (`pip install .[benchmarl]` takes all)
	$(PY) -m pip install -q --no-deps "benchmarl==1.5.2"
	touch $@

# The whole chain on the embedded default (about 13 minutes on 2 CPU cores): train MAPPO,
# kickstarted from the two-phase matching heuristic, evaluate against the heuristics, export the
# ONNX bundle, then a live run of verifier servers, drafting clients and the controller with the
# learned policy, nearest + gamma 4 and the best heuristic, compared with the simulator.
demo: setup
	rm -rf $(DEMO_RUN)
	$(VENV)/bin/marl-sd train configs/default.yaml --name demo --set train.total_timesteps=1500000
	$(VENV)/bin/marl-sd eval $(DEMO_RUN) --episodes 4 --seeds 0 1
	$(VENV)/bin/marl-sd export $(DEMO_RUN)
	$(VENV)/bin/marl-sd serve up --config configs/live.yaml --policy $(DEMO_RUN)/bundle nearest_g4 two_phase_matching \
		--duration 20 --target tiny:0 --draft tiny-draft:0:0.15 --compare-sim --out $(DEMO_RUN)/live.json

# make test: the fast tiers (unit, sim) on both cores; TIER=net (or train, ray, ...) runs one tier.
# make test-all: lint, format check and every tier, slow tests included (what CI runs).
TIER ?= (unit or sim) and not slow
test: setup
	$(PY) -m pytest -q -n 2 --durations=10 -m "$(TIER)"

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test-rest: setup
	$(PY) -m pytest -q --durations=15 -m "not ($(TIER))"

test-all: lint test test-rest

# The wheel, installed into a fresh virtualenv outside the checkout, runs the chain from there.
wheel-check:
	PYTHON=$(PYTHON) TORCH_SPEC="$(TORCH_SPEC)" bash tests/wheel_smoke.sh

bench: setup
	$(VENV)/bin/marl-sd bench env

# One MAPPO run per suite scenario (runs/suite_<scenario>/, about 5 minutes each on 2 CPU cores),
# then the suite table with those policies, both oracles and every heuristic.
SUITE := light capacity_kv hotspot hetero_sites datacenter_h100 vehicular bursty large shifting_sites
train-suite: setup
	for s in $(SUITE); do $(VENV)/bin/marl-sd train configs/suite/$$s.yaml --no-progress || exit 1; done

suite: setup
	$(VENV)/bin/marl-sd bench suite --seeds 0 1 2 3 4 5 --out runs/suite

# One policy for every site: trained across seven suite scenarios' physics (vehicular and
# datacenter_h100 held out), resumable (`RESUME=--resume`); then every suite scenario with it, the
# bound and every heuristic (the heuristics reused from runs/suite when the code is the same).
train-generalist: setup
	$(VENV)/bin/marl-sd train configs/generalist.yaml --no-progress $(RESUME)

generalist-suite: setup
	$(VENV)/bin/marl-sd bench suite --learned runs/generalist --suite-policies learned bound --seeds 0 1 2 3 4 5 \
		--reuse runs/suite/suite.json --out runs/suite_generalist

clean:
	rm -rf $(VENV) .pytest_cache
