from __future__ import annotations

import pytest

from tests.operator.helpers import FakeApi, make_settings


@pytest.fixture
def settings():
    return make_settings()


@pytest.fixture
def fake_api() -> FakeApi:
    return FakeApi()
