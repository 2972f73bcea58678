"""Fixtures of the model tests (helpers live in models_testlib.py)."""

import pytest
from models_testlib import FAMILIES


@pytest.fixture(params=sorted(FAMILIES))
def family_cfg(request):
    return FAMILIES[request.param]
