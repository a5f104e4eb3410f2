"""``cleftchunk predict INPUT OUTPUT --checkpoint CKPT``: block-wise cleft probabilities on Dask.

Also takes the seed tutorial's test.py options: ``-t ROOT -dn A.h5@B.h5 -o OUTDIR -mi 8,256,256
-g 4 -c 4 -b 16 -ac unetv0 -pm CKPT`` (each input X becomes OUTDIR/X-stem.zarr/pred). The run
options (--workers, --threads, --scheduler, -g/--gpus, --block-shape, --dry-run, --overwrite,
--progress...) are every block-wise command's (cli/options.py); ``-c/--cpus`` is predict's own:
the cores it uses in all, which it shares between task threads or worker processes as torch
threads (--threads is not the same thing: task threads per worker).
"""

from __future__ import annotations

from pathlib import Path

import click

from cleftchunk.errors import CleftchunkError
from cleftchunk.io.volumes import split_spec
from cleftchunk.predict import PRECISIONS, TTA_CHOICES, OutputOptions, WindowOptions, predict
from cleftchunk_cli.options import amount, count, ignore_frame_option, parse_fraction, positive_zyx, run_options, source_selection


@click.command("predict")
@click.argument("input_spec", metavar="INPUT", required=False)
@click.argument("output_spec", metavar="OUTPUT", required=False)
@click.option("--checkpoint", "-pm", "checkpoint", help="Checkpoint file written by cleftchunk train (-pm as in the tutorial).")
@click.option("--model-input", "-mi", "model_input", help="Window Z,Y,X (default: the size the checkpoint was trained with).")
@click.option("--overlap", type=amount(0, 1, open_high=True, example="0.5"), default=0.5, show_default=True, help="Fraction of a window shared by neighbouring tiles: stride = int(W·(1−overlap)).")
@click.option("--blend", type=click.Choice(["gaussian", "constant"]), default="gaussian", show_default=True, help="Weights of overlapping tiles.")
@click.option("--pad/--no-pad", default=False, show_default=True, help="Reflect-pad the volume by half a window (as the original pipeline).")
@click.option("--batch-size", "-b", type=count(1, message="batch size {number} must be at least 1: fix --batch-size"), help="Tiles per forward pass (default 1 on CPU, 4 on GPU).")
@click.option("--tta", type=click.Choice([str(n) for n in TTA_CHOICES]), default="1", show_default=True, help="Flip test-time augmentation: mean over 1, 4, 8 or 16 variants.")
@click.option("--scale", help="Float images: multiply by this to reach [0, 1], e.g. 1/255 for a float copy of 0..255 data.")
@click.option("--precision", type=click.Choice(PRECISIONS), default="auto", show_default=True, help="auto: fp32 on CPU, bf16 autocast on GPU.")
@click.option("--compile", "compile_model", is_flag=True, help="torch.compile the model on each worker.")
@click.option("--mask", help="Volume whose zero voxels are not predicted (written 0; tiles without any mask voxel are not run); "
              "placed by its voxel size and offset, it must cover INPUT (or see --ignore-frame).")
@click.option("--cpus", "-c", type=count(1), help="CPU cores predict uses in all (default: all): task threads with --workers 0, "
              "else torch threads of each worker process = cores / workers (-c as in the tutorial).")
@click.option("--chunks", help="Output chunk shape Z,Y,X (default 16,256,256).")
@click.option("--root", "-t", type=click.Path(file_okay=False), help="Directory the -dn inputs are relative to.")
@click.option("--inputs", "-dn", help="Several inputs joined by @ (tutorial style); outputs go under -o.")
@click.option("--output-dir", "-o", help="With -dn: directory receiving <input stem>.zarr/pred for each input.")
@click.option("--architecture", "-ac", help="Expected architecture of the checkpoint (e.g. unetv0); a mismatch is an error.")
@click.option("--load-model", "-lm", hidden=True, help="Accepted for the tutorial's command line; the checkpoint is always loaded.")
@click.option("--scratch", type=click.Path(file_okay=False), help="Folder for per-block partial results, on a filesystem all workers see (default: beside a local OUTPUT; for an s3:// or gs:// OUTPUT, the current directory, in .<name>.predict-<hash>).")
@ignore_frame_option
@source_selection("input_spec")
@run_options(gpus=True)
def command(input_spec, output_spec, checkpoint, model_input, overlap, blend, pad, batch_size, tta, scale, precision, compile_model,
            mask, cpus, chunks, root, inputs, output_dir, architecture, load_model, scratch, ignore_frame, run):
    """Predict cleft probabilities of INPUT into OUTPUT (e.g. out.zarr/pred) as uint8 OME-Zarr.

    The result does not depend on block shape, worker count or interruptions: re-running the
    same command resumes where it stopped. Default --block-shape: 32,512,512 with --workers 0,
    64,1024,1024 with worker processes, GPUs or a cluster (rounded to the output chunks).
    """
    if not checkpoint:
        raise CleftchunkError("no model given: pass --checkpoint CKPT (or -pm CKPT), a file written by cleftchunk train")
    window = WindowOptions(positive_zyx(model_input, "--model-input"), overlap, blend, pad, batch_size, int(tta),
                           parse_fraction(scale, "--scale"), precision, compile_model)
    from cleftchunk.urls import local_file

    scratch = local_file(scratch, "--scratch folder") if scratch else None  # partial results live on a local filesystem
    if root:
        local_file(root, "--root folder")
    out = OutputOptions(positive_zyx(chunks, "--chunks"), mask, scratch, cpus, ignore_frame=ignore_frame)
    log = click.echo if run.dry_run else (lambda message: click.echo(message, err=True))
    for src, dst in input_output_pairs(input_spec, output_spec, root, inputs, output_dir):
        result = predict(checkpoint, src, dst, window, run, out, architecture=architecture, log=log)
        if not run.dry_run:
            click.echo(result.summary())


def input_output_pairs(input_spec, output_spec, root, inputs, output_dir) -> list[tuple[str, str]]:
    """(input, output) pairs from either INPUT OUTPUT or the tutorial's -t/-dn/-o."""
    if inputs and input_spec and not output_spec:  # `-dn X OUT`: the one positional is the output
        input_spec, output_spec = None, input_spec
    if inputs and input_spec:
        raise CleftchunkError("give the input either as INPUT or with -dn, not both")
    if not inputs:
        if not input_spec or not output_spec:
            raise CleftchunkError("give INPUT and OUTPUT, e.g. cleftchunk predict in.zarr/raw out.zarr/pred --checkpoint CKPT")
        return [(_under(root, input_spec), output_spec)]
    names = [n for n in inputs.split("@") if n]
    if len(names) == 1 and output_dir is None and output_spec is None:
        raise CleftchunkError("-dn needs -o OUTDIR (or an OUTPUT) to know where to write")
    if len(names) == 1 and output_spec is None:
        return [(_under(root, names[0]), _output_for(output_dir, names[0]))]
    if len(names) == 1:
        return [(_under(root, names[0]), output_spec)]
    if output_dir is None:
        raise CleftchunkError(f"-dn names {len(names)} inputs: give -o OUTDIR to receive one <stem>.zarr/pred each")
    pairs = [(_under(root, n), _output_for(output_dir, n)) for n in names]
    outputs = [dst for _, dst in pairs]
    if len(set(outputs)) < len(outputs):
        raise CleftchunkError(f"-dn inputs {', '.join(names)} share file names, so their outputs under -o would collide: run them separately")
    return pairs


def _under(root: str | None, name: str) -> str:
    return str(Path(root) / name) if root else name


def _output_for(output_dir: str, name: str) -> str:
    """OUTDIR/<container stem>.zarr/pred: images/im_A.h5 → OUTDIR/im_A.zarr/pred."""
    container, _ = split_spec(name)
    stem = container.name.split(".", 1)[0]
    return str(Path(output_dir) / f"{stem}.zarr" / "pred")
