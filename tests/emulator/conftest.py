"""Fixtures: one emulator subprocess per test file (real HTTP on loopback, port 0)."""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from client import Emulator  # noqa: E402


@pytest.fixture(scope='module')
def emu():
    e = Emulator(synthetic=['big:1000000', 'small:25:1000'])
    e.start()
    yield e
    assert e.stop() == 0, 'emulator did not exit cleanly on SIGTERM'


@pytest.fixture(autouse=True)
def _clean(request):
    if 'emu' in request.fixturenames:
        request.getfixturevalue('emu').reset()
    yield
