"""One process at a time in a directory (`vps._io.lock_directory`): the lock of eval, ablate, the rescore target
and tune.

Two `vps eval` processes on one ``--out`` used to both do all the work and write duplicate rows.
The lock (``<dir>/.lock``, flock, recording the holder's pid and host) is held for the whole run;
a second process is refused with one line naming the holder; the lock of a process that died
(SIGKILL included) is taken over; it is released however the run ends.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.helpers.tiny_eval import SPECS, fake_generate, settings_for, tiny_tokenizer, write_data
from vps import _io as io_mod
from vps import cli
from vps.evaluation import RunDir, RunLockedError, RunMismatchError, rescore_run, run_evaluation

TOK = tiny_tokenizer()
ROOT = Path(__file__).resolve().parents[2]  # the repository: `tests` imports from there
HOST = socket.gethostname()

pytestmark = pytest.mark.usefixtures("one_thread")

# A process holding (or trying) a directory's lock; vps/_io.py imports only the standard library, so it
# is loaded on its own and the process starts in milliseconds.
HOLDER = textwrap.dedent(f"""
    import importlib.util, sys
    spec = importlib.util.spec_from_file_location("vps_io", {str(Path(io_mod.__file__))!r})
    vps_io = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(vps_io)
    mode, path = sys.argv[1], sys.argv[2]
    try:
        with vps_io.lock_directory(path):
            print("locked", open(path + "/.lock").read().strip(), flush=True)
            if mode == "hold":
                sys.stdin.readline()
    except vps_io.RunLockedError as exc:
        print("refused", exc, flush=True)
        sys.exit(3)
""")

# A whole evaluation on the tiny model; with "block" it stops inside its first batch until told to go on,
# with "wait" it starts only when told (so that both processes import torch at the same time).
EVAL = textwrap.dedent(f"""
    import json, sys
    from pathlib import Path
    sys.path.insert(0, {str(ROOT)!r})
    import torch
    torch.set_num_threads(1)
    from tests.helpers.tiny_eval import SPECS, fake_generate, settings_for, tiny_model, tiny_tokenizer
    from vps.evaluation import RunLockedError, run_evaluation
    data, out, mode = sys.argv[1:4]
    tok = tiny_tokenizer()
    model = tiny_model(tok)
    items, settings = settings_for(Path(data), nll=False)
    gen = fake_generate({{"base": {{0, 2}}, "vps": {{1}}}})
    gate = [mode == "block"]
    if mode == "wait":  # imported and ready; run when told
        print("ready", flush=True)
        sys.stdin.readline()

    def generate(*args, **kwargs):
        if gate[0]:
            gate[0] = False
            print("started", flush=True)
            sys.stdin.readline()
        return gen(*args, **kwargs)

    try:
        written = run_evaluation(model, tok, items, SPECS, out, settings, batch_size=2, progress=False,
                                 generate_fn=generate, log=lambda m: None)
    except RunLockedError as exc:
        print("refused", exc, flush=True)
        sys.exit(3)
    print("written", json.dumps(written), flush=True)
""")


def _script(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _start(script: Path, *args: str) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, str(script), *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def _finish(proc: subprocess.Popen, release: bool = True) -> tuple[int, str]:
    out, err = proc.communicate("\n" if release else None, timeout=120)
    return proc.returncode, out + err


@pytest.fixture
def holder(tmp_path):
    """Start a process holding a directory's lock; yields a function dir -> process (released at the end)."""
    script = _script(tmp_path, "holder.py", HOLDER)
    procs = []

    def hold(path: Path) -> subprocess.Popen:
        proc = _start(script, "hold", str(path))
        line = proc.stdout.readline()
        assert line.startswith("locked"), line + proc.stderr.read()
        procs.append(proc)
        return proc

    yield hold
    for proc in procs:
        if proc.poll() is None:
            _finish(proc)


def _try_lock(tmp_path: Path, path: Path) -> tuple[int, str]:
    return _finish(_start(_script(tmp_path, "holder.py", HOLDER), "try", str(path)))


def _raw_keys(out: Path) -> list[tuple[str, str]]:
    return [(r["id"], r["config"]) for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())]


# -- two processes -----------------------------------------------------------------------------------
def test_a_second_eval_process_is_refused_while_the_first_runs(tmp_path):
    data = write_data(tmp_path / "d.jsonl")
    out = tmp_path / "out"
    script = _script(tmp_path, "eval.py", EVAL)
    first = _start(script, str(data), str(out), "block")
    second = _start(script, str(data), str(out), "wait")
    try:
        assert first.stdout.readline().strip() == "started", first.stderr.read()
        assert second.stdout.readline().strip() == "ready", second.stderr.read()
        code, text = _finish(second)
        assert code == 3, text
        assert f"is in use by another run: process {first.pid} on host {HOST} holds {out / '.lock'}" in text
    finally:
        if second.poll() is None:
            second.kill()
            second.wait()
        code, text = _finish(first)
    assert code == 0 and 'written {"base": 5, "vps": 5}' in text, text
    keys = _raw_keys(out)
    assert len(keys) == len(set(keys)) == 10, "each row written once"
    assert not (out / ".lock").exists()


@pytest.mark.parametrize("name, argv", [
    ("eval", ["eval", "--methods", "base", "--out", "OUT"]),
    ("ablate", ["ablate", "--grid", "GRID", "--out", "OUT"]),
    ("rescore", ["rescore", "RUN", "--extract", "last", "--out", "OUT"]),
])
def test_the_cli_names_the_holder_in_one_line(tmp_path, model, holder, monkeypatch, capsys, name, argv):
    monkeypatch.setattr("vps.commands.eval.load", lambda args: pytest.fail("the model must not be loaded"))
    data = write_data(tmp_path / "d.jsonl")
    grid = tmp_path / "g.json"
    grid.write_text(json.dumps({"baseline": {"method": "base"}, "g3": {"gamma": 0.3}}))
    run = tmp_path / "run"
    items, settings = settings_for(data, nll=False)
    run_evaluation(model, TOK, items[:2], SPECS, run, settings, progress=False,
                   generate_fn=fake_generate({"base": {0}, "vps": set()}), log=lambda _m: None)
    out = tmp_path / "out"
    proc = holder(out)
    sub = {"OUT": str(out), "GRID": str(grid), "RUN": str(run)}
    argv = [sub.get(a, a) for a in argv]
    if name != "rescore":
        argv += ["--data", str(data), "--max-new-tokens", "3", "--no-progress"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f"vps {name}: error: --out {out} is in use by another run: process {proc.pid} on host "
                       f"{HOST} holds {out / '.lock'}; wait for it to finish or use another directory"), err
    assert sorted(p.name for p in out.iterdir()) == [".lock"], "nothing written while another process holds it"


# -- stale locks -----------------------------------------------------------------------------------------
def _finished_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.mark.parametrize("name, content", [
    ("pid of a finished process on this host", lambda: f"{_finished_pid()} {HOST}\n"),
    ("pid of a finished process, another host's name", lambda: f"{_finished_pid()} elsewhere\n"),
    ("empty (a crash before its pid was written)", lambda: ""),
    ("garbage", lambda: "\x00\x01 not a pid"),
])
def test_a_stale_lock_is_taken_over(tmp_path, name, content):
    out = tmp_path / "out"
    out.mkdir()
    (out / ".lock").write_text(content())
    code, text = _try_lock(tmp_path, out)  # a real process takes it over
    assert code == 0 and text.split()[0] == "locked", f"{name}: {text}"
    assert text.split()[2] == HOST and int(text.split()[1]) > 0, "it recorded its own pid and host"
    assert not (out / ".lock").exists(), "and released it"


def test_the_lock_of_a_killed_process_is_taken_over(tmp_path, model, holder):
    out = tmp_path / "out"
    proc = holder(out)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (out / ".lock").read_text().split()[0] == str(proc.pid), "the dead process's record is still there"
    items, settings = settings_for(write_data(tmp_path / "d.jsonl"), nll=False)
    written = run_evaluation(model, TOK, items[:2], SPECS, out, settings, progress=False,
                             generate_fn=fake_generate({"base": {0}, "vps": set()}), log=lambda _m: None)
    assert written == {"base": 2, "vps": 2} and not (out / ".lock").exists()


# -- release ---------------------------------------------------------------------------------------------
class Boom(RuntimeError):
    pass


@pytest.mark.parametrize("name, exc", [
    ("KeyboardInterrupt", KeyboardInterrupt),
    ("an error", Boom),
    ("SystemExit", SystemExit),
])
def test_the_lock_is_released_however_the_run_ends(tmp_path, model, name, exc):
    items, settings = settings_for(write_data(tmp_path / "d.jsonl"), nll=False)
    out = tmp_path / "out"
    seen = []

    def on_batch(config, rows):
        seen.append(config)
        assert (out / ".lock").read_text().split() == [str(os.getpid()), HOST]  # held, ours, during the run
        raise exc

    with pytest.raises(exc):
        run_evaluation(model, TOK, items, SPECS, out, settings, batch_size=2, progress=False,
                       generate_fn=fake_generate({"base": set(), "vps": set()}), on_batch=on_batch,
                       log=lambda _m: None)
    assert seen == ["base"], name
    assert not (out / ".lock").exists(), name
    code, text = _try_lock(tmp_path, out)
    assert code == 0, f"{name}: {text}"


def test_a_refused_run_keeps_the_lock_it_did_not_take(tmp_path, model, holder):
    items, settings = settings_for(write_data(tmp_path / "d.jsonl"), nll=False)
    out = tmp_path / "out"
    holder(out)
    with pytest.raises(RunLockedError, match="is in use by another run"):
        run_evaluation(model, TOK, items, SPECS, out, settings, progress=False,
                       generate_fn=fake_generate({"base": set(), "vps": set()}), log=lambda _m: None)
    assert (out / ".lock").exists() and not (out / "run.json").exists()
    code, text = _try_lock(tmp_path, out)
    assert code == 3 and "refused" in text, "the holder still holds it"


def test_the_lock_nests_within_one_process(tmp_path, model):
    items, settings = settings_for(write_data(tmp_path / "d.jsonl"), nll=False)
    out = tmp_path / "out"
    with RunDir(out).lock():
        run_evaluation(model, TOK, items[:2], SPECS, out, settings, progress=False,
                       generate_fn=fake_generate({"base": set(), "vps": set()}), log=lambda _m: None)
        assert (out / ".lock").exists(), "the outer hold outlives the inner one"
        code, _ = _try_lock(tmp_path, out)
        assert code == 3
    assert not (out / ".lock").exists()


def test_the_rescore_target_is_locked(tmp_path, model, holder):
    items, settings = settings_for(write_data(tmp_path / "d.jsonl"), nll=False)
    run = tmp_path / "run"
    run_evaluation(model, TOK, items[:2], SPECS, run, settings, progress=False,
                   generate_fn=fake_generate({"base": {0}, "vps": set()}), log=lambda _m: None)
    target = tmp_path / "target"
    holder(target)
    with pytest.raises(RunLockedError, match=f"--out {target} is in use by another run"):
        rescore_run(run, target, "last")
    assert sorted(p.name for p in target.iterdir()) == [".lock"]


def test_a_lock_on_a_file_is_refused(tmp_path):
    path = tmp_path / "file"
    path.write_text("x")
    with pytest.raises(ValueError, match="is a file, not a directory"), RunDir(path).lock():
        pass
    with pytest.raises(RunMismatchError, match="not a run directory"):
        (tmp_path / "d").mkdir()
        (tmp_path / "d" / "summary.json").write_text("{}")
        RunDir(tmp_path / "d").check_target()
