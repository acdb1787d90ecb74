"""OutlierDetector on a fake clock; RouterConfig and `kubeinfer router` flags a user can get wrong."""
from __future__ import annotations

import pytest

from kubeinfer.cli import main
from kubeinfer.router.cli import parse_static
from kubeinfer.router.config import RouterConfig, RouterConfigError
from kubeinfer.router.outliers import OutlierDetector


def test_repeated_failures_eject_for_a_while():
    now = [0.0]
    d = OutlierDetector(max_failures=3, eject_seconds=10, clock=lambda: now[0])
    assert [d.failure("a"), d.failure("a")] == [False, False] and not d.is_ejected("a")
    d.success("a")                                   # a success clears the streak
    assert [d.failure("a"), d.failure("a"), d.failure("a")] == [False, False, True]
    assert d.ejected(["a", "b"]) == {"a"}
    now[0] = 10.5                                    # the time is up: tried again
    assert not d.is_ejected("a")
    assert d.failure("a") and d.is_ejected("a")      # one more failure ejects it at once
    d.success("a")
    assert not d.is_ejected("a")


@pytest.mark.parametrize("kw, needle", [
    ({"port": 0}, "port (0)"),
    ({"max_queue_wait": -1}, "max queue wait"),
    ({"default_strategy": "random"}, "least-load, prefix-hash"),
    ({"load_factor": 0.9}, "load factor (0.9) must be >= 1.0"),
    ({"retry_after": 0}, "retry after"),
    ({"max_failures": 0}, "max failures"),
])
def test_bad_config_says_what_to_fix(kw, needle):
    with pytest.raises(RouterConfigError, match=None) as e:
        RouterConfig(**kw)
    assert needle in str(e.value)


@pytest.mark.parametrize("argv, needle", [
    (["--static", "llama"], "MODEL=HOST:PORT"),
    (["--static", "llama=nohostport"], "MODEL=HOST:PORT"),
    (["--load-factor", "0.5", "--static", "m=h:1"], "load factor"),
])
def test_cli_rejects_bad_flags_without_a_traceback(argv, needle, capsys):
    assert main(["router", *argv]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


def test_parse_static():
    [b] = parse_static(["m=http://h1:80/, h2:81"], "prefix-hash")
    assert (b.model, b.strategy, [e.address for e in b.endpoints]) == ("m", "prefix-hash", ["h1:80", "h2:81"])
