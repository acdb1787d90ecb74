"""Multimodal tests: the tiny VLM folders come from tests/conftest.py's `tiny_vlm_dir`."""
from __future__ import annotations

import pytest

pytest.importorskip("PIL", reason="pillow is a dependency: pip install pillow")
