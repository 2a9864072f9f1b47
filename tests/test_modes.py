"""Every mode-like setting (a Literal field of a method's Config) refuses a wrong value with
exit 2, a message naming the allowed values, and nothing written, before any model loads."""
from __future__ import annotations

import dataclasses
import typing

import pytest

from obliviate import methods
from obliviate.cli import main


def mode_fields() -> list[tuple[str, str, tuple]]:
    found = []
    for name in methods.available():
        config = methods.get(name).Config
        for field, kind in typing.get_type_hints(config).items():
            if typing.get_origin(kind) is typing.Literal and field in {f.name for f in dataclasses.fields(config)}:
                found.append((name, field, typing.get_args(kind)))
    return found


def test_ember_declares_its_modes():
    assert {("ember", "selection"), ("ember", "tied_output"), ("ember", "factorize_on")} <= \
        {(m, f) for m, f, _ in mode_fields()}


@pytest.mark.parametrize("method,field,allowed", mode_fields())
def test_a_wrong_mode_exits_2_naming_the_allowed_values(method, field, allowed, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["erase", "--concept", "golf", "--method", method, "--set", f"{method}.{field}=bogus",
                 "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "bogus" in err and all(str(a) in err for a in allowed) and "Traceback" not in err
    assert not out.exists()
