# Two commands for a new machine (see README): `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO := models/demo

.PHONY: demo demo-review browser test lint bench clean c

$(BIN)/hiad-train: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[cpu,train,serve,ray,openvino,test]'
	touch $@

# Build the ELPV demo, train PatchCore (O2O), export a bundle (parity-checked; with the whole-image graph
# that `make c`'s hiad-infer runs), run the torch-free runtime on the test modules, and evaluate what the
# runtime produced.
demo: $(BIN)/hiad-train
	$(BIN)/hiad-train demo-data data
	$(BIN)/hiad-train configs/demo.yaml --data data/elpv --out $(DEMO) --eval
	$(BIN)/hiad-export $(DEMO)/checkpoint --out $(DEMO)/bundle --index IVF64,Flat --search nprobe=4 --pipeline
	$(BIN)/hiad-runtime predict $(DEMO)/bundle data/elpv/test --out $(DEMO)/runtime --overlays --overwrite
	$(BIN)/hiad-train eval-runtime $(DEMO)/runtime --data data/elpv

# The review page on the demo model: a copy of the demo bundle calibrated on the test modules (good ones, and
# defective ones to miss at most 20 %; the training modules are in its memory bank: calibrated on them,
# every test module is flagged), served with
# --review-dir and fed the test modules; a headless chromium labels each with the keyboard and writes
# screenshots of the list and the viewer (models/demo/review_list.png, review_viewer.png). Needs `make demo`.
demo-review: $(BIN)/hiad-train browser $(DEMO)/review/bundle/manifest.json
	$(BIN)/python tests/review_browser.py $(DEMO)/review/bundle data/elpv/test --out $(DEMO)

$(DEMO)/review/bundle/manifest.json: $(DEMO)/bundle/manifest.json
	$(BIN)/hiad-train calibrate $(DEMO)/bundle --normal data/elpv/test/good --defective data/elpv/test/defect --max-miss 0.2 \
		--out $(DEMO)/review/bundle

# Debian's chromium and chromedriver (apt-get, as root, when missing): the review page's browser test uses them.
browser:
	tests/install_browser.sh

test: $(BIN)/hiad-train
	$(BIN)/python -m pytest

# Lint and layout (configured in pyproject.toml); CI runs it before the tests.
lint: $(BIN)/hiad-train
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Benchmarks print figures (docs/benchmarks.md records them); they are not tests.
bench: $(BIN)/hiad-train
	$(BIN)/python benchmarks/bench_train.py
	$(BIN)/python benchmarks/bench_runtime.py

# The C library and hiad-infer (c/): installs missing -dev packages and ONNX Runtime's C header itself.
c:
	$(MAKE) -C c

clean:
	rm -rf $(VENV) data models/demo c/build
