"""Prints the build-directory outputs that `meson install` installs and ninja builds
(paths relative to the build directory), so that debian/rules builds exactly those.
Files meson writes at configure time (configure_file) are already there."""
import json
import os
import subprocess
import sys

build = os.path.abspath(sys.argv[1])
installed = json.loads(subprocess.run(['meson', 'introspect', '--installed', build],
                                      capture_output=True, text=True, check=True).stdout)
known = {line.rsplit(':', 1)[0] for line in subprocess.run(
    ['ninja', '-C', build, '-t', 'targets', 'all'], capture_output=True, text=True,
    check=True).stdout.splitlines()}
print(' '.join(sorted(rel for rel in (os.path.relpath(p, build) for p in installed
                                      if p.startswith(build + os.sep)) if rel in known)))
