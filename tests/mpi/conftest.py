"""A rank that waits in a collective its peers never join would hang the
whole ``mpiexec`` run: end the process instead, with every thread's stack."""
import faulthandler

import pytest

HANG_SECONDS = 120


@pytest.fixture(autouse=True)
def fail_instead_of_hanging():
    faulthandler.dump_traceback_later(HANG_SECONDS, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()
