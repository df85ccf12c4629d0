#!/usr/bin/env bash
# Creates a venv with a Python >= 3.12 found explicitly: `python3.13`/`python3.12` only if they
# actually run (pyenv shims exit with an error unless that version is active), then pyenv's
# installed versions, then the default python3.
set -euo pipefail
venv="${1:-.venv}"
if [[ -x "$venv/bin/python" ]] && "$venv/bin/python" -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; then
  exit 0
fi
candidates=(python3.13 python3.12)
if command -v pyenv >/dev/null 2>&1; then
  root="$(pyenv root)"
  for v in $(ls -1 "$root/versions" 2>/dev/null | sort -rV); do candidates+=("$root/versions/$v/bin/python3"); done
fi
candidates+=(python3)
for py in "${candidates[@]}"; do
  if "$py" -c 'import sys; sys.exit(sys.version_info < (3, 12))' >/dev/null 2>&1; then
    echo "[setup] creating $venv with $("$py" --version 2>&1) ($(command -v "$py" || echo "$py"))"
    rm -rf "$venv"
    exec "$py" -m venv "$venv"
  fi
done
echo "error: btx_jax needs Python >= 3.12 and none was found (tried: ${candidates[*]})." >&2
echo "  fix: install one, e.g. 'pyenv install 3.12' or your OS package python3.12, then rerun." >&2
exit 1
