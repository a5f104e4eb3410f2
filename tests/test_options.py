"""The command line's shared option rules (cli/options.py): what a mistake actually prints.

Each error is checked as the whole line the command prints (or the library raises), so a test
fails when the message changes, not only when a word disappears from it."""

from __future__ import annotations

import numpy as np
import pytest

from cleftchunk.errors import CleftchunkError
from cleftchunk.io.volumes import create_volume
from cleftchunk.run.options import block_shape_for
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
    [
        ("8,abc,64", int, "--opt '8,abc,64' must be integers Z,Y,X, e.g. --opt 16,256,256"),
        ("1,2", int, "--opt '1,2' has 2 values: write 3 values Z,Y,X"),
        ("0,4,4", int, "--opt '0,4,4': every value must be positive"),
        ("-8,64,64", int, "--opt '-8,64,64': every value must be positive"),
        ("nan,4,4", float, "--opt 'nan,4,4' must hold finite numbers"),
        ("inf,4,4", float, "--opt 'inf,4,4' must hold finite numbers"),
        ("4,a,4", float, "--opt '4,a,4' must be numbers Z,Y,X, e.g. --opt 16,256,256"),
    ],
)
def test_bad_triples_are_one_line_errors_naming_the_option(text, cast, message):
    with pytest.raises(CleftchunkError) as e:
        positive_zyx(text, "--opt", cast)
    assert str(e.value) == message


@pytest.fixture
def pred(tmp_path):
    """A small uint8 probability map for ``cleftchunk threshold`` (the run options' first user)."""
    volume = create_volume(tmp_path / "p.zarr" / "pred", (8, 32, 32), "uint8", chunks=(4, 16, 16), voxel_size=(40, 4, 4))
    volume.write(volume.roi, (np.arange(8 * 32 * 32) % 251).astype(np.uint8).reshape(8, 32, 32))
    return str(tmp_path / "p.zarr" / "pred")


@pytest.mark.parametrize(
    "flags, printed",
    [
        (["--block-shape", "8,abc,64"], "error: --block-shape '8,abc,64' must be integers Z,Y,X, e.g. --block-shape 16,256,256"),
        # the library's block_shape=... message, written as the command's flag
        (["--chunks", "4,16,16", "--block-shape", "4,24,16"],
         "error: --block-shape 4,24,16 is not a multiple of the output chunks 4,16,16: use --block-shape 4,32,16"),
        (["--scheduler", "nonsense"],
         "error: --scheduler nonsense is not the address of a Dask scheduler: give tcp://HOST:PORT or tls://HOST:PORT "
         "(leave it out to run on this machine)"),
        (["--tls-cert", "c.pem"],
         "error: --tls-ca-file/--tls-cert/--tls-key secure a cluster: use them with --scheduler tls://HOST:PORT or --listen"),
        (["--workers", "-1"], "error: Invalid value for '--workers': -1 is not in the range x>=0. (see cleftchunk threshold --help)"),
    ],
)
def test_run_option_mistakes_print_one_line_naming_the_flag(tmp_path, pred, flags, printed):
    from click.testing import CliRunner

    out = tmp_path / "o.zarr" / "mask"
    result = CliRunner().invoke(cli, ["threshold", pred, "-o", str(out), *flags], prog_name="cleftchunk")
    assert result.exit_code == 2 and result.output == printed + "\n"
    assert not (tmp_path / "o.zarr").exists()  # refused before anything was created


def test_an_output_with_other_parameters_is_refused_naming_them_and_the_flag(tmp_path, run_cli, pred):
    out = tmp_path / "o.zarr" / "mask"
    run_cli("threshold", pred, "-o", out, "--no-progress")
    result = run_cli("threshold", pred, "-o", out, "--threshold", "10", "--no-progress", expect=2)
    assert result.output == (
        f"error: {out} exists, written by threshold with other parameters (threshold differ): "
        "pass --overwrite to replace it, or choose another output\n"
    )
    assert run_cli("threshold", pred, "-o", out, "--threshold", "10", "--no-progress", "--overwrite").exit_code == 0


def test_library_parameters_become_the_commands_flags():
    predict = cli.commands["predict"]
    with pytest.raises(CleftchunkError) as refused:  # a message the library really raises
        block_shape_for((4, 24, 16), (4, 16, 16), (8, 64, 64), (32, 512, 512))
    assert str(refused.value) == "block_shape=4,24,16 is not a multiple of the output chunks 4,16,16: use block_shape=4,32,16"
    assert in_flags(str(refused.value), predict) == "--block-shape 4,24,16 is not a multiple of the output chunks 4,16,16: use --block-shape 4,32,16"
    assert in_flags("exists: pass overwrite=True to replace it", predict) == "exists: pass --overwrite to replace it"
    assert in_flags("give window=8,256,256", predict) == "give --model-input 8,256,256"
    # names that are no option of the command, and text that only looks like one, stay as they are
    assert in_flags("x=3 and foo=1, e.g. a==b", predict) == "x=3 and foo=1, e.g. a==b"
    assert in_flags("pass overwrite=True", None) == "pass overwrite=True"
