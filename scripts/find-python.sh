#!/usr/bin/env bash
# Prints the path of a Python >= 3.12 interpreter: first from PATH, then from pyenv.
# Exits 1 with advice when none is found. Used by the Makefile; safe to run by hand.
set -u
ok() { "$1" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' >/dev/null 2>&1; }
if [ -n "${PYTHON:-}" ]; then
  if ok "$PYTHON"; then command -v "$PYTHON"; exit 0; fi
  echo "error: PYTHON=$PYTHON is not a Python >= 3.12" >&2; exit 1
fi
for name in python3.12 python3.13 python3 python; do
  p=$(command -v "$name" 2>/dev/null) || continue
  # pyenv shims for versions that are not selected fail to run: ok() filters them out.
  if ok "$p"; then echo "$p"; exit 0; fi
done
if command -v pyenv >/dev/null 2>&1; then
  for v in $(pyenv versions --bare 2>/dev/null | grep -E '^3\.(1[2-9]|[2-9][0-9])(\.|$)' | sort -V); do
    prefix=$(pyenv prefix "$v" 2>/dev/null) || continue
    for cand in "$prefix/bin/python3" "$prefix/bin/python"; do
      if [ -x "$cand" ] && ok "$cand"; then echo "$cand"; exit 0; fi
    done
  done
fi
cat >&2 <<'MSG'
error: no Python >= 3.12 found (mitmproxy 12 needs it).
Install one, then run make again, for example:
  Debian/Ubuntu:  apt-get install python3.12 python3.12-venv   (where your release has it)
  pyenv:          pyenv install 3.12
  or point to one: make run PYTHON=/path/to/python3.12
MSG
exit 1
