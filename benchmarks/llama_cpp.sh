#!/usr/bin/env bash
# llama.cpp as `swattn bench model`'s and `bench serve`'s peer, in one command:
#
#     bash benchmarks/llama_cpp.sh [DIR]        # default DIR: /tmp/swattn-llama
#
# 1. builds llama-bench, llama-batched-bench, llama-quantize and llama-server from the llama.cpp source that PyPI's
#    llama-cpp-python ships (Release, -DGGML_NATIVE=ON, 2 jobs: 3-5 minutes on 2 cores);
# 2. converts the benchmark's random two-layer checkpoint (/tmp/swattn-bench/gemma2-2layer,
#    written here if missing) with llama.cpp's own converter to f32 and bf16 GGUF, and with
#    llama-quantize --pure to Q8_0 and Q4_0 (the embedding, which Gemma's output head shares,
#    in Q8_0, as swattn's q4 keeps it). Gemma 2's converter insists on a SentencePiece
#    tokenizer.model: one is trained (on this Python's standard library, at the checkpoint's
#    vocabulary size) with `sentencepiece` installed into DIR/pylib, not into your environment;
# 3. prints the `swattn bench model` options that add the llama.cpp column.
#
# Steps already done are skipped. Needs cmake, a C++ compiler and network access to PyPI.
set -euo pipefail
DIR=${1:-/tmp/swattn-llama}
VERSION=0.3.36
PY=${PYTHON:-python}
REPO=$(cd "$(dirname "$0")/.." && pwd)
CKPT=/tmp/swattn-bench/gemma2-2layer
mkdir -p "$DIR"
cd "$DIR"

if [ ! -d "llama_cpp_python-$VERSION" ]; then
    "$PY" -m pip download --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d .
    tar xzf "llama_cpp_python-$VERSION.tar.gz"
fi
SRC=$DIR/llama_cpp_python-$VERSION/vendor/llama.cpp
BIN=$SRC/build/bin
if [ ! -x "$BIN/llama-bench" ] || [ ! -x "$BIN/llama-batched-bench" ] || [ ! -x "$BIN/llama-quantize" ]; then
    cmake -S "$SRC" -B "$SRC/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DBUILD_SHARED_LIBS=OFF \
        -DLLAMA_CURL=OFF > cmake.log
    cmake --build "$SRC/build" --target llama-bench llama-batched-bench llama-quantize llama-server -j 2 > build.log
fi

if [ ! -f "$CKPT/config.json" ]; then
    (cd "$REPO" && "$PY" -c "import sys; sys.path.insert(0, 'benchmarks'); import model; model._checkpoint('/tmp/swattn-bench')")
fi
MODEL=$DIR/gemma2-2layer
if [ ! -f "$MODEL/tokenizer.model" ]; then
    mkdir -p "$MODEL"
    cp "$CKPT/config.json" "$MODEL/"
    ln -sf "$CKPT/model.safetensors" "$MODEL/model.safetensors"
    [ -d pylib/sentencepiece ] || "$PY" -m pip install --target pylib sentencepiece > /dev/null
    PYTHONPATH=pylib "$PY" - "$MODEL" <<'EOF'
import json, pathlib, sys, sysconfig
import sentencepiece as spm

model = pathlib.Path(sys.argv[1])
vocab = json.loads((model / "config.json").read_text())["vocab_size"]
text = model / "train.txt"
with text.open("w", encoding="utf-8") as out:  # a few MB of Python is plenty for 4096 pieces
    for f in sorted(pathlib.Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:150]:
        out.write(f.read_text(encoding="utf-8", errors="ignore"))
spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(model / "tokenizer"), vocab_size=vocab,
                               model_type="bpe", byte_fallback=True, minloglevel=2)
EOF
fi
for out in f32 bf16; do
    [ -f "g2-$out.gguf" ] || PYTHONPATH=$SRC/gguf-py:$DIR/pylib "$PY" "$SRC/convert_hf_to_gguf.py" "$MODEL" \
        --outtype "$out" --outfile "g2-$out.gguf" > "convert-$out.log" 2>&1
done
[ -f g2-q8_0.gguf ] || "$BIN/llama-quantize" --pure g2-f32.gguf g2-q8_0.gguf Q8_0 > quantize-q8.log 2>&1
[ -f g2-q4_0.gguf ] || "$BIN/llama-quantize" --pure --token-embedding-type q8_0 g2-f32.gguf g2-q4_0.gguf Q4_0 \
    > quantize-q4.log 2>&1

echo "llama.cpp ready; add to swattn bench model:"
echo "  --llama-bench $BIN/llama-bench --gguf fp32=$DIR/g2-f32.gguf bf16=$DIR/g2-bf16.gguf q8=$DIR/g2-q8_0.gguf q4=$DIR/g2-q4_0.gguf"
