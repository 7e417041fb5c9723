from types import SimpleNamespace

import pytest

from duobench import registry as registry_module
from duobench.errors import DuobenchError
from duobench.registry import Registry


def test_decorator_and_lazy_entries_resolve():
    methods = Registry("method")

    @methods.register("alpha")
    def alpha():
        """The alpha method."""

    methods.register("lazy-path", "pathlib:PurePosixPath", description="a lazily imported class")
    assert methods.get("alpha") is alpha
    assert methods.describe("alpha") == "The alpha method."
    from pathlib import PurePosixPath

    assert methods.get("lazy-path") is PurePosixPath
    assert methods.names() == ["alpha", "lazy-path"]


def test_unknown_name_lists_known_names_and_suggests():
    methods = Registry("method", "duobench.test-group")
    methods.register("duo", object())
    methods.register("esd-u", object())
    with pytest.raises(DuobenchError) as error:
        methods.get("dou")
    message = str(error.value)
    assert "Did you mean 'duo'?" in message
    assert "duo, esd-u" in message


def test_duplicate_registration_is_refused():
    methods = Registry("method")
    methods.register("x", object())
    with pytest.raises(ValueError):
        methods.register("x", object())


def test_entry_point_plugins_join_the_registry(monkeypatch):
    plugin = SimpleNamespace(name="outside-method", value="pathlib:Path")
    monkeypatch.setattr(registry_module, "entry_points", lambda group: [plugin] if group == "duobench.methods" else [])
    methods = Registry("method", "duobench.methods")
    assert "outside-method" in methods.names()
    from pathlib import Path

    assert methods.get("outside-method") is Path


def test_broken_lazy_entry_gives_a_clear_error():
    methods = Registry("method")
    methods.register("broken", "duobench_no_such_module:thing")
    with pytest.raises(DuobenchError, match="importing it failed"):
        methods.get("broken")
