"""A fake batch system for tests: ``sbatch``/``qsub``/``bsub`` run the submitted job script on this
machine, in the background, in a new session (its own process group); ``scancel``/``qdel``/
``bkill`` end that group (SIGTERM, then SIGKILL) and mark the job CANCELLED; ``squeue``/``qstat``/
``bjobs`` list the jobs still running. State lives in $FAKE_BATCH_DIR: ``<id>.sh`` (the script),
``<id>.out`` (its output), ``<id>.pid``, ``<id>.state`` and ``calls.log`` (every command run).
``FAKE_BATCH_REFUSE=reason`` makes submissions fail as a real scheduler refusing a job does;
``FAKE_BATCH_PENDING=1`` leaves submitted jobs waiting in the queue (their scripts never run).

Run as ``fake_batch.py COMMAND ARGS...`` (the sibling wrappers named after each command do that).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

SUBMIT = {"sbatch": "Submitted batch job {id}", "qsub": "{id}.fake-server", "bsub": "Job <{id}> is submitted to queue <normal>."}
CANCEL = ("scancel", "qdel", "bkill")
LIST = ("squeue", "qstat", "bjobs")


def group_alive(pgid: int) -> bool:
    """True while a process of group ``pgid`` runs (zombies, whose parent has not reaped them, do not count)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended while we looked
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def jobs(state: Path) -> dict[str, int]:
    return {p.stem: int(p.read_text()) for p in state.glob("*.pid")}


def submit(command: str, args: list[str], state: Path) -> int:
    if os.environ.get("FAKE_BATCH_REFUSE"):
        print(f"{command}: error: Batch job submission failed: {os.environ['FAKE_BATCH_REFUSE']}", file=sys.stderr)
        return 1
    script = Path(args[-1]).read_text() if args else sys.stdin.read()  # bsub reads the script from stdin
    number = 1000
    while True:  # concurrent submissions: the first to create <id>.sh owns the id
        try:
            fd = os.open(state / f"{number}.sh", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
            break
        except FileExistsError:
            number += 1
    with os.fdopen(fd, "w") as f:
        f.write(script)
    job = str(number)
    if os.environ.get("FAKE_BATCH_PENDING"):
        (state / f"{job}.state").write_text("PENDING")
        print(SUBMIT[command].format(id=job))
        return 0
    env = dict(os.environ, SLURM_JOB_ID=job, PBS_JOBID=job, LSB_JOBID=job, JOB_ID=job)
    with open(state / f"{job}.out", "w") as out:
        proc = subprocess.Popen(["bash", str(state / f"{job}.sh")], stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env, start_new_session=True)
    (state / f"{job}.pid").write_text(str(proc.pid))
    (state / f"{job}.state").write_text("RUNNING")
    print(SUBMIT[command].format(id=job))
    return 0


def cancel(args: list[str], state: Path) -> int:
    known = jobs(state)
    for job in (a.split(".")[0] for a in args if not a.startswith("-")):
        if job not in known and (state / f"{job}.state").exists():  # still pending: nothing runs
            (state / f"{job}.state").write_text("CANCELLED")
            continue
        if job not in known:
            print(f"error: invalid job id {job}", file=sys.stderr)
            return 1
        pgid = known[job]
        for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + wait
            while group_alive(pgid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if not group_alive(pgid):
                break
        (state / f"{job}.state").write_text("CANCELLED")
    return 0


def listing(state: Path) -> int:
    print("JOBID STATE")
    for job, pgid in sorted(jobs(state).items()):
        if group_alive(pgid):
            print(f"{job} RUNNING")
    return 0


def main() -> int:
    command, args = Path(sys.argv[1]).name, sys.argv[2:]
    state = Path(os.environ["FAKE_BATCH_DIR"])
    state.mkdir(parents=True, exist_ok=True)
    with open(state / "calls.log", "a") as log:
        log.write(" ".join([command, *args]) + "\n")
    if command in SUBMIT:
        return submit(command, args, state)
    if command in CANCEL:
        return cancel(args, state)
    if command in LIST:
        return listing(state)
    print(f"fake_batch: unknown command {command}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
