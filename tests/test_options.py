"""The command line's shared option rules (cli/options.py)."""

from __future__ import annotations

import pytest

from cleftchunk.errors import CleftchunkError
from cleftchunk_cli.main import cli
from cleftchunk_cli.options import in_flags, parse_zyx, positive_zyx


def test_one_triple_syntax_everywhere():
    assert parse_zyx("16,256,256", "--chunks") == (16, 256, 256)
    assert parse_zyx("16x256x256", "--chunks") == (16, 256, 256)
    assert parse_zyx("8", "--halo") == (8, 8, 8)
    assert parse_zyx("40,4,4", "--voxel-size", float) == (40.0, 4.0, 4.0)
    assert parse_zyx(None, "--chunks") is None


@pytest.mark.parametrize(
    "text, cast, message",
    [("8,abc,64", int, "must be integers"), ("1,2", int, "has 2 values"), ("0,4,4", int, "positive"),
     ("-8,64,64", int, "positive"), ("nan,4,4", float, "finite"), ("inf,4,4", float, "finite")],
)
def test_bad_triples_are_one_line_errors_naming_the_option(text, cast, message):
    with pytest.raises(CleftchunkError, match=message) as e:
        positive_zyx(text, "--opt", cast)
    assert "--opt" in str(e.value) and "\n" not in str(e.value)


def test_library_parameters_become_the_commands_flags():
    predict = cli.commands["predict"]
    assert in_flags("exists: pass overwrite=True to replace it", predict) == "exists: pass --overwrite to replace it"
    assert in_flags("use block_shape=32,64,64; or tta=8.", predict) == "use --block-shape 32,64,64; or --tta 8."
    assert in_flags("give window=8,256,256", predict) == "give --model-input 8,256,256"
    # names that are no option of the command, and text that only looks like one, stay as they are
    assert in_flags("x=3 and foo=1, e.g. a==b", predict) == "x=3 and foo=1, e.g. a==b"
    assert in_flags("pass overwrite=True", None) == "pass overwrite=True"
