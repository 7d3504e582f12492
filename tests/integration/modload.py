"""A module loaded from its file under a name of its own: how the other suites (tests/tier,
tests/python) and the benchmarks use the integration suite's conftest.py (its Daemon and
paths) without clashing with their own conftest module."""
import importlib.util
import os

HERE = os.path.dirname(os.path.abspath(__file__))


def load(name, path):
    """The module at `path`, executed as `name` (not entered in sys.modules)."""
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def integration_conftest():
    """tests/integration/conftest.py; its BUILD comes from DMC_BUILD_ROOT, read now."""
    return load('dmc_integration_conftest', os.path.join(HERE, 'conftest.py'))
