"""pip's build of the package (pyproject.toml holds the metadata): records the library
named by DMCACHE_LIBRARY at install time in dmcache/_install_paths.py, as meson install
records the one it installed."""
import os

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPy(build_py):
    def run(self):
        super().run()
        lib = os.environ.get('DMCACHE_LIBRARY')
        if lib:
            path = os.path.join(self.build_lib, 'dmcache', '_install_paths.py')
            with open(path, 'w') as f:
                f.write('"""Written by pip install: DMCACHE_LIBRARY at install."""\n'
                        'LIBRARY = %r\n' % os.path.abspath(lib))


setup(cmdclass={'build_py': BuildPy})
