#!/usr/bin/env bash
# Runs the whole test suite on a 2-core machine in two passes, and fails if either fails.
#   1. every test but the `browser` and `slow` ones, on two workers (pytest-xdist): each test runs torch on one
#      thread, so one process alone leaves a core idle; a worker that runs out of tests takes some of the
#      other's (worksteal), so the pass does not end on one worker's long tail;
#   2. the `browser` and `slow` tests, one at a time: a headless Chromium, or a group of 3-5 ranks, needs the
#      machine to itself to keep its timing (a fake microphone, keep-alives every few seconds).
# Extra arguments go to both passes (e.g. -x, -k NAME).
set -uo pipefail
cd "$(dirname "$0")/.."
python=.venv/bin/python
status=0
run_pass() {  # a pass that selects no test (exit 5, e.g. with -k) is not a failure
  "$python" -m pytest -q "$@"
  local code=$?
  if [ "$code" -ne 0 ] && [ "$code" -ne 5 ]; then status=$code; fi
}
run_pass -n 2 --dist worksteal -m "not browser and not slow" "$@"
run_pass -m "browser or slow" "$@"
exit "$status"
