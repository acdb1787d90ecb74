"""node_relay warns when several nodes would authenticate with the built-in key."""
from __future__ import annotations

import logging

from kubeinfer.engine import node_relay


def test_warns_only_without_a_node_secret(monkeypatch, caplog):
    monkeypatch.delenv(node_relay.NODE_SECRET_ENV, raising=False)
    with caplog.at_level(logging.WARNING, logger=node_relay.__name__):
        assert node_relay.warn_default_secret()
    assert "KUBEINFER_NODE_SECRET is not set" in caplog.text
    caplog.clear()
    monkeypatch.setenv(node_relay.NODE_SECRET_ENV, "s3cret-value")
    with caplog.at_level(logging.WARNING, logger=node_relay.__name__):
        assert not node_relay.warn_default_secret()
    assert caplog.text == ""
    assert b"s3cret-value" in node_relay._authkey()
