#!/usr/bin/env bash
# A Python 3.11 venv with the CPU torch wheel and transformers, for scripts/make_hf_fixtures.py.
# (The main venv has no torch: on these machines the only torch wheel is a CPU build for 3.11.)
#   bash scripts/make_hf_venv.sh [.venv-hf]
set -euo pipefail
venv="${1:-.venv-hf}"
python=""
for candidate in python3.11 "$HOME/.pyenv/versions/3.11.7/bin/python3.11"; do
  if "$candidate" -c 'import sys; assert sys.version_info[:2] == (3, 11)' 2>/dev/null; then python="$candidate"; break; fi
done
if [[ -z "$python" ]]; then
  echo "error: no working Python 3.11 (the torch CPU wheel here is for 3.11); install one, e.g. pyenv install 3.11" >&2
  exit 1
fi
if [[ ! -x "$venv/bin/python" ]]; then "$python" -m venv "$venv"; fi
"$venv/bin/pip" install -q torch==2.13.0 transformers==5.24.0 safetensors tokenizers sentencepiece numpy
echo "$venv ready: $venv/bin/python scripts/make_hf_fixtures.py"
