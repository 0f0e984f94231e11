#!/usr/bin/env bash
# Create .venv in the repository root and install lmforge with everything it
# needs, pinned. Re-running it when nothing changed returns in about a second
# (a stamp of the dependency files is kept in .venv).
#
#   scripts/install.sh
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3.11}
VENV=.venv
stamp_file=$VENV/.lmforge-install-stamp
stamp=$(cat pyproject.toml scripts/install.sh requirements.lock | sha256sum | cut -d' ' -f1)

if [[ -x $VENV/bin/lmforge && -f $stamp_file && $(cat "$stamp_file") == "$stamp" ]]; then
    echo "lmforge: .venv is up to date"
    exit 0
fi

[[ -x $VENV/bin/python ]] || "$PYTHON" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip --disable-pip-version-check)

# 1. torch first, pinned exactly: pip then never resolves a bare `torch`
#    (which would take a multi-GB CUDA build).
"${pip[@]}" install torch==2.13.0
# 2. lmforge's pinned dependencies and test tools, held to the lock file.
"${pip[@]}" install -c requirements.lock -e '.[test]'
# 3. fairseq without its declared deps (torchaudio is not needed and would
#    pull another torch); its real runtime needs came with step 2.
"${pip[@]}" install --no-deps ve-fairseq==0.12.3

echo "$stamp" > "$stamp_file"
echo "lmforge: installed into $VENV ($("$VENV/bin/lmforge" --version))"
