"""`vps eval` killed with SIGKILL at many points, then rerun: the run always ends complete and unchanged.

Each kill hits a real process running the real CLI (`vps.cli.main`) on a tiny checkpoint saved to
disk. Starting Python and importing torch costs seconds, so the processes are forked from a driver
(this file run as a script) that has imported everything once; each forked child then runs the CLI
from its argv as ``vps eval`` does, loading the checkpoint, locking the directory and writing its
files. The kill points are either hooks installed in the child before it runs (after the n-th batch
is on disk; in the middle of a batch's write, leaving a partial line; while run.json or summary.json
is being replaced; at the model load; right after the lock is taken; while the report is drawn) or
a SIGKILL from the driver after a delay spread over the run's duration. After every kill the same
command is rerun to completion; the run must then hold exactly one row per item and method, every
line strict JSON, with the outputs and correctness of an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repository: `tests` imports from there
METHODS = "base,vps"
N_ITEMS = 5
BATCH = 2
APPENDS = 2 * -(-N_ITEMS // BATCH)  # batches written: 3 per method
CHILD_TIMEOUT = 120.0  # seconds: a child that hangs is killed and reported, rather than hanging the test


def _strict(text: str) -> object:
    def refuse(name: str) -> None:
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


# -- the driver (this file as a script) --------------------------------------------------------------
def _install(hook: str) -> None:
    """In a forked child: SIGKILL this process at the point ``hook`` names."""
    from vps import _io
    from vps.commands import eval as eval_cmd
    from vps.evaluation import report, rundir

    def die() -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    kind, _, arg = hook.partition(":")
    if kind == "append":  # after the n-th batch is on disk
        n, real, calls = int(arg), rundir.RunDir.append, []

        def append(self, rows):
            real(self, rows)
            calls.append(1)
            if len(calls) == n:
                die()

        rundir.RunDir.append = append
    elif kind == "partial":  # the n-th batch's write cut off after a fraction of its bytes (or a row and a bit)
        n_text, cut = arg.split(":")
        n, real, calls = int(n_text), rundir.RunDir.append, []

        def append(self, rows):
            calls.append(1)
            if len(calls) < n:
                return real(self, rows)
            payload = rundir.rows_payload(rows)
            first_row = payload.index(b"\n") + 1
            at = first_row + 3 if cut == "row+3" else first_row if cut == "row" else int(len(payload) * float(cut))
            with self.results.open("ab") as fh:
                fh.write(payload[:at])
                fh.flush()
                os.fsync(fh.fileno())
            die()

        rundir.RunDir.append = append
    elif kind == "replace":  # the temporary file written, os.replace not yet done
        real_replace = os.replace

        def replace(src, dst, *a, **k):
            if Path(dst).name == arg:
                die()
            return real_replace(src, dst, *a, **k)

        os.replace = replace
    elif kind == "load":  # the lock held, the model not yet loaded
        eval_cmd.load = lambda args: die()
    elif kind == "locked":  # right after the lock is taken
        real_acquire = _io._acquire

        def acquire(path):
            fd = real_acquire(path)
            die()
            return fd

        _io._acquire = acquire
    elif kind == "plot":  # report.md and summary.json written, the plot not
        report.plot = lambda *a, **k: die()
    elif kind != "none":
        raise ValueError(f"unknown hook {hook!r}")


def driver() -> None:
    """Read one JSON request per line ({argv, hook, delay, log}); fork a child running the CLI for each;
    answer with one JSON line: how the child ended and how long it ran."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401

    import vps.cli
    import vps.commands.eval
    import vps.evaluation.report  # noqa: F401
    import vps.models  # noqa: F401

    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        start = time.perf_counter()
        pid = os.fork()
        if pid == 0:  # the child: the CLI, its output to a log
            code = 70
            try:
                fd = os.open(req["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
                os.dup2(fd, 1)
                os.dup2(fd, 2)
                _install(req.get("hook", "none"))
                code = vps.cli.main(req["argv"])
            except BaseException:  # noqa: BLE001 - report anything in the log, never return to the loop
                import traceback

                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        delay = req.get("delay")
        deadline = start + (delay if delay is not None else CHILD_TIMEOUT)
        while True:  # wait for the child; at the deadline, SIGKILL it
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.perf_counter() >= deadline:
                os.kill(pid, signal.SIGKILL)
                _, status = os.waitpid(pid, 0)
                break
            time.sleep(0.005)
        result = {"signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
                  "code": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None,
                  "seconds": time.perf_counter() - start, "timed_out": delay is None and done == 0}
        print(json.dumps(result), flush=True)


class Driver:
    def __init__(self, tmp: Path) -> None:
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
                   MPLBACKEND="Agg", PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
        self.tmp = tmp
        self.proc = subprocess.Popen([sys.executable, __file__], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env=env, cwd=tmp)
        assert json.loads(self.proc.stdout.readline()) == {"ready": True}

    def run(self, argv: list[str], log: Path, hook: str = "none", delay: float | None = None) -> dict:
        self.proc.stdin.write(json.dumps({"argv": argv, "hook": hook, "delay": delay, "log": str(log)}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, f"the driver died; see {log}"
        return json.loads(line)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


# -- the test ----------------------------------------------------------------------------------------
def _fixture(tmp: Path) -> tuple[Path, Path]:
    from tests.helpers.tiny_eval import tiny_model, tiny_tokenizer, write_data

    tok = tiny_tokenizer()
    ckpt = tmp / "ckpt"
    tiny_model(tok).save_pretrained(ckpt)
    tok.save_pretrained(ckpt)
    return ckpt, write_data(tmp / "d.jsonl")


def _argv(ckpt: Path, data: Path, out: Path) -> list[str]:
    return ["eval", "--model", str(ckpt), "--data", str(data), "--methods", METHODS, "--out", str(out),
            "--max-new-tokens", "4", "--batch-size", str(BATCH), "--system", "Solve.", "--threads", "1",
            "--no-progress"]


def _lines(out: Path) -> list[dict]:
    """Every line of results.jsonl, each parsed strictly (a partial or NaN line fails here)."""
    text = (out / "results.jsonl").read_text(encoding="utf-8")
    assert text.endswith("\n")
    return [_strict(line) for line in text.splitlines()]


def _outcome(rows: list[dict]) -> dict[tuple[str, str], tuple]:
    return {(r["id"], r["config"]): (r["output"], r["pred"], r["correct"], r["tokens"]) for r in rows}


HOOKS = ([f"append:{n}" for n in range(1, APPENDS + 1)]
         + ["partial:1:0.3", "partial:2:row", "partial:3:row+3", "partial:4:0.5", "partial:5:0.9", "partial:6:0.05"]
         + ["replace:run.json", "replace:summary.json", "locked", "load", "plot"])


def test_sigkill_at_any_point_then_rerun_gives_the_uninterrupted_run(tmp_path):
    ckpt, data = _fixture(tmp_path)
    drv = Driver(tmp_path)
    try:
        ref_out = tmp_path / "reference"
        ref = drv.run(_argv(ckpt, data, ref_out), tmp_path / "reference.log")
        assert ref["code"] == 0 and not ref["timed_out"], (tmp_path / "reference.log").read_text()
        reference = _outcome(_lines(ref_out))
        assert len(reference) == N_ITEMS * 2
        duration = ref["seconds"]
        # SIGKILLs from outside at delays spread over the run (the last ones past the model load)
        delays = [duration * f for f in (0.1, 0.3, 0.5, 0.65, 0.8, 0.9, 0.97)]
        plans = [(h, None) for h in HOOKS] + [("none", d) for d in delays]
        killed = 0
        for k, (hook, delay) in enumerate(plans):
            out, log = tmp_path / f"run{k}", tmp_path / f"run{k}.log"
            first = drv.run(_argv(ckpt, data, out), log, hook=hook, delay=delay)
            assert not first["timed_out"], f"{hook}: the run hung\n{log.read_text()}"
            if hook != "none":
                assert first["signal"] == signal.SIGKILL, f"{hook}: the kill point was never reached\n{log.read_text()}"
            assert first["signal"] in (signal.SIGKILL, None), log.read_text()
            killed += first["signal"] == signal.SIGKILL
            again = drv.run(_argv(ckpt, data, out), log)
            assert again["code"] == 0 and not again["timed_out"], f"{hook} {delay}: the rerun failed\n{log.read_text()}"
            lines = _lines(out)
            keys = [(r["id"], r["config"]) for r in lines]
            assert len(keys) == len(set(keys)) == N_ITEMS * 2, f"{hook} {delay}: {sorted(keys)}"
            assert _outcome(lines) == reference, f"{hook} {delay}: rows differ from the uninterrupted run"
            for name in ("run.json", "summary.json"):
                _strict((out / name).read_text(encoding="utf-8"))
            assert (out / "report.md").exists() and (out / "report.png").stat().st_size > 0
            assert not (out / ".lock").exists(), "the finished run released its lock"
        assert len(plans) >= 20 and killed >= 20
    finally:
        drv.close()


if __name__ == "__main__":
    driver()
