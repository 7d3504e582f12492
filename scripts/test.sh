#!/usr/bin/env bash
# The test command: installs what is missing, builds twice (plain, and with
# AddressSanitizer + UndefinedBehaviorSanitizer), runs every suite in both builds, and
# ends with one line 'N passed, N failed' counted from meson's test logs.
#
#   scripts/test.sh                 everything
#   scripts/test.sh --suite unit    only some suites (meson test's --suite, repeatable)
#   BUILD_DIR=... ASAN_BUILD_DIR=... override the build directories
#   DMC_TSAN=0                      no ThreadSanitizer run; by default a third build
#                                   (TSAN_BUILD_DIR, default build-tsan) runs the
#                                   concurrency-heavy integration tests (prefetch, serve):
#                                   any report fails them (docs/reliability.md O4;
#                                   suppressions in tests/tsan.supp)
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install-deps.sh

build=${BUILD_DIR:-build}
asan=${ASAN_BUILD_DIR:-build-asan}
jobs=$(nproc)

setup() { # dir, options...
	local dir=$1
	shift
	if [ -f "$dir/build.ninja" ]; then
		meson configure "$dir" "$@" >/dev/null
	else
		meson setup "$dir" "$@" >/dev/null
	fi
}

setup "$build" -Dwerror=true
# b_lundef=false: sanitizer runtimes resolve symbols at run time
setup "$asan" -Dwerror=true -Db_sanitize=address,undefined -Db_lundef=false

ninja -C "$build"
ninja -C "$asan"
tsan=
if [ "${DMC_TSAN:-1}" = 1 ]; then
	tsan=${TSAN_BUILD_DIR:-build-tsan}
	setup "$tsan" -Dwerror=true -Db_sanitize=thread -Db_lundef=false -Dslow_tests=false
	ninja -C "$tsan"
fi

# sanitizer reports fail the test that triggered them, child processes included
export ASAN_OPTIONS=${ASAN_OPTIONS:-abort_on_error=1:halt_on_error=1:detect_leaks=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-halt_on_error=1:abort_on_error=1:print_stacktrace=1}

status=0
meson test -C "$build" --print-errorlogs --num-processes "$jobs" "$@" || status=1
meson test -C "$asan" --print-errorlogs --num-processes "$jobs" "$@" || status=1
if [ -n "$tsan" ]; then
	# a report makes the process exit 66: the test that started it fails; decoding under
	# ThreadSanitizer is several times slower: the daemons get a longer decode timeout
	TSAN_OPTIONS=${TSAN_OPTIONS:-suppressions=$PWD/tests/tsan.supp:exitcode=66:second_deadlock_stack=1} \
		DMC_TEST_DAEMON_ARGS="--set decode_timeout=120s" \
		meson test -C "$tsan" --print-errorlogs --num-processes "$jobs" --timeout-multiplier 3 \
		prefetch serve || status=1
fi

/usr/bin/python3 - "$build" "$asan" $tsan <<'PY'
import json, sys
passed = failed = skipped = 0
for d in sys.argv[1:]:
    try:
        lines = open(d + '/meson-logs/testlog.json').read().splitlines()
    except OSError:
        failed += 1
        continue
    for line in lines:
        r = json.loads(line)['result']
        if r in ('OK', 'EXPECTEDFAIL'):
            passed += 1
        elif r == 'SKIP':
            skipped += 1
        else:
            failed += 1
print('%d passed, %d failed, %d skipped' % (passed, failed, skipped))
PY
exit $status
