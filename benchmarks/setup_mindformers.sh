#!/usr/bin/env bash
# The benchmark-only venv with the reference converter: MindFormers v1.3.2 on MindSpore 2.10.
#
#   bash benchmarks/setup_mindformers.sh      # creates benchmarks/.venv-mindformers once (~1.5 GB, minutes)
#
# Never a runtime or test dependency of mindformers-conv. matplotlib (for the plot) lives here too.
# torch is pinned to the CPU build (an unpinned torch pulls the CUDA wheels). mindformers is installed
# with --no-deps: its own pins (tokenizers 0.15, pyarrow 12, datasets 2.18) clash with transformers
# 4.46.3 and are not needed to convert weights; the last line is what its import demands
# (pyarrow < 18 and numpy < 2 keep wheels built for numpy 1).
set -euo pipefail
cd "$(dirname "$0")"
VENV=.venv-mindformers
STAMP=$VENV/.installed
PYTHON=${PYTHON311:-python3.11}

if [ -f "$STAMP" ] && [ "$STAMP" -nt setup_mindformers.sh ]; then
    exit 0
fi
test -x $VENV/bin/python || "$PYTHON" -m venv $VENV
PIP=(env PIP_DISABLE_PIP_VERSION_CHECK=1 $VENV/bin/python -m pip install --quiet)
"${PIP[@]}" mindspore==2.10.0 "numpy<2" torch==2.13.0 transformers==4.46.3 safetensors matplotlib
"${PIP[@]}" --no-deps mindformers==1.3.2 mindpet==1.0.4
"${PIP[@]}" "numpy<2" "pyarrow<18" jieba ftfy sentencepiece rouge_chinese nltk tiktoken opencv-python-headless
$VENV/bin/python -c "import torch; assert torch.version.cuda is None, 'not the CPU build: ' + torch.__version__"
$VENV/bin/python "$(pwd)/run_mindformers.py" --check
touch "$STAMP"
