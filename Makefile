# Two commands do everything on a fresh machine:
#   make demo   creates .venv, installs, trains YOLOv4-tiny + CA (--phi 4) on the built-in sample data,
#               evaluates it, predicts on test images and prints where the outputs are
#   make test   creates .venv if needed and runs the test suite
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cksum < requirements.txt | cut -d' ' -f1)
DEMO := logs/demo
DEMO_ARGS ?= --epochs 50 --img 160 --batch 16 --nbs 16 --optimizer adam --workers 2 --cache ram

.PHONY: demo test venv clean-demo

venv: $(STAMP)

$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest

demo: $(STAMP)
	$(PY) train.py --data sample --phi 4 $(DEMO_ARGS) --save-dir logs --name demo --exist-ok
	$(PY) get_map.py --weights $(DEMO)/best.pt --data sample --split test --out $(DEMO)/map_out
	$(PY) predict.py --weights $(DEMO)/best.pt --source 'VOCdevkit/sample/JPEGImages/sample_00030*.jpg' --out $(DEMO)/predict
	$(PY) predict.py --weights $(DEMO)/best.pt --source VOCdevkit/sample/JPEGImages/sample_000300.jpg --mode heatmap --out $(DEMO)/heatmap
	$(PY) predict.py --weights $(DEMO)/best.pt --source VOCdevkit/sample/JPEGImages/sample_000300.jpg --mode heatmap --cam grad --cam-layer feat2 --out $(DEMO)/heatmap
	$(PY) predict.py --weights $(DEMO)/best.pt --source VOCdevkit/sample/JPEGImages/sample_000300.jpg --mode attention --out $(DEMO)/attention
	@echo
	@echo "demo outputs:"
	@echo "  run folder      $(DEMO)/  (best.pt, last.pt, results.csv, loss.png, map.png)"
	@echo "  evaluation      $(DEMO)/map_out/summary.json (+ detections.json, ground_truth.json)"
	@echo "  predictions     $(DEMO)/predict/*.jpg"
	@echo "  heatmaps        $(DEMO)/heatmap/sample_000300_heatmap.jpg, sample_000300_gradcam.jpg"
	@echo "  attention       $(DEMO)/attention/sample_000300_attention.jpg"

clean-demo:
	rm -rf $(DEMO)
