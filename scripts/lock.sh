#!/usr/bin/env bash
# Write constraints.txt: the versions of every package in a virtualenv (default .venv) where
# `make test` passed. The project itself is left out; torch loses its local version (+cpu), so
# the same file serves the CPU and the CUDA build.
set -euo pipefail
venv=${1:-.venv}
header=$(sed -n '/^#/p;/^[^#]/q' constraints.txt 2>/dev/null || true)
{
    printf '%s\n' "$header"
    "$venv/bin/python" -m pip freeze --exclude-editable \
        | grep -v -iE '^(saescope|-e )' \
        | sed -E 's/^(torch==[^+]+)\+.*/\1/'
} > constraints.txt.tmp
mv constraints.txt.tmp constraints.txt
echo "lock: $(grep -vc '^#' constraints.txt) packages in constraints.txt"
