"""Prints where this interpreter looks for pure-Python packages under the install prefix
argv[1] (meson.build, at configure time): Debian's /usr/lib/python3/dist-packages for
/usr, /usr/local/lib/python3.X/dist-packages for /usr/local (both on Debian's sys.path,
unlike meson's default /usr/local/lib/python3/dist-packages), the interpreter's own
scheme under any other prefix (a venv's site-packages when the prefix is the venv)."""
import os
import sys
import sysconfig

prefix = os.path.normpath(sys.argv[1])
schemes = sysconfig.get_scheme_names()
if prefix == os.path.normpath(sys.prefix):
    # the interpreter's own prefix: its default scheme (a venv's, or Debian's system one)
    path = sysconfig.get_path('purelib', 'deb_system' if 'deb_system' in schemes and
                              sys.prefix == sys.base_prefix else None)
elif prefix == '/usr/local' and 'posix_local' in schemes:
    path = sysconfig.get_path('purelib', 'posix_local')
else:
    path = sysconfig.get_path('purelib', 'posix_prefix', {'base': prefix, 'platbase': prefix})
print(path)
