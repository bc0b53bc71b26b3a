"""Data-parallel ``vps eval``: the item split, the rank's environment, the rank files and their merge, and
real launches of two processes on CPU (gloo) whose rows equal a single process's.

The harness tests run the ranks of a launch in this process, one inside the other: rank 0's start
barrier runs the other ranks to the end, which is the order a real launch's files can be written in.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.helpers.tiny_eval import SPECS, fake_generate, settings_for, tiny_model, tiny_tokenizer, write_data
from vps import _io as io_mod
from vps import cli
from vps.evaluation import RunDir, RunLockedError, run_evaluation
from vps.evaluation import distributed as dist_mod
from vps.evaluation.distributed import (
    DistributedError,
    Shard,
    World,
    lone_launch_warning,
    rank_device,
    shard_items,
    world_from_env,
)

TOK = tiny_tokenizer()
LAUNCH_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK",
              "TORCHELASTIC_RUN_ID", "VPS_DIST_TIMEOUT", "VPS_DIST_FINISH_TIMEOUT", "ACCELERATE_USE_CPU")
# Timing and batching differ between a launch and a single process; everything else must not.
NOT_COMPARED = ("seconds", "nll_seconds", "batch_size")

pytestmark = pytest.mark.usefixtures("one_thread")


def _same(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in NOT_COMPARED} for r in rows]


def _lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def _keys(rows: list[dict]) -> list[tuple[str, str]]:
    return [(r["id"], r["config"]) for r in rows]


@pytest.fixture(autouse=True)
def _single_process_env(monkeypatch):
    """This process is no rank of a launch unless a test says so."""
    for name in LAUNCH_ENV:
        monkeypatch.delenv(name, raising=False)


# -- the split and the environment -------------------------------------------------------------------
def test_shard_items_puts_every_item_in_exactly_one_share():
    for n in range(0, 12):
        items = list(range(n))
        for size in range(1, 6):
            shares = [shard_items(items, rank, size) for rank in range(size)]
            assert sorted(x for s in shares for x in s) == items
            assert max(map(len, shares)) - min(map(len, shares)) <= 1
            assert all(x % size == rank for rank, s in enumerate(shares) for x in s), "by position, round robin"
    assert shard_items("abcde", 1, 2) == ["b", "d"]
    assert shard_items([1, 2], 3, 4) == [], "more ranks than items: a rank can have none"
    assert Shard(1, 3).take([0, 1, 2, 3, 4]) == [1, 4]
    for rank, size in ((2, 2), (-1, 2), (0, 0)):
        with pytest.raises(ValueError, match=r"rank must be in \[0, size\)"):
            shard_items([1], rank, size)
        with pytest.raises(ValueError, match=r"rank must be in \[0, size\)"):
            Shard(rank, size)


def test_world_from_env():
    assert world_from_env({}) == World(0, 1, 0) and not World().parallel
    assert world_from_env({"WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0"}) == World()
    assert world_from_env({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1"}) == World(3, 4, 1)
    assert world_from_env({"WORLD_SIZE": "2", "RANK": "1"}) == World(1, 2, 1), "LOCAL_RANK defaults to RANK"
    for env, message in [
        ({"WORLD_SIZE": "2"}, "WORLD_SIZE=2 but RANK is not set"),
        ({"WORLD_SIZE": "2", "RANK": "2"}, r"RANK must be in \[0, 2\)"),
        ({"WORLD_SIZE": "two", "RANK": "0"}, "WORLD_SIZE='two' is not a whole number"),
        ({"RANK": "1"}, "RANK=1 but WORLD_SIZE is unset"),
        ({"WORLD_SIZE": "0", "RANK": "0"}, "WORLD_SIZE must be >= 1"),
        ({"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "-1"}, "LOCAL_RANK must be >= 0"),
    ]:
        with pytest.raises(DistributedError, match=message):
            world_from_env(env)


# What accelerate 1.15 sets: its single-process launcher (--cpu, or no --multi_gpu on fewer than two GPUs) sets
# ACCELERATE_USE_CPU always and MASTER_ADDR / MASTER_PORT when more than one process was asked for; its multi-process
# launcher (torch elastic) sets WORLD_SIZE and RANK and no ACCELERATE_USE_CPU.
SIMPLE_ASKED_FOR_2 = {"ACCELERATE_USE_CPU": "True", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500",
                      "ACCELERATE_MIXED_PRECISION": "no"}


def test_a_launcher_that_started_one_of_several_processes_is_named():
    line = lone_launch_warning("eval", SIMPLE_ASKED_FOR_2)
    assert line is not None and "\n" not in line
    assert line.startswith("accelerate launch was asked for several processes but started this one alone")
    assert "accelerate launch --multi_gpu --num_processes N -m vps eval" in line
    assert "torchrun --nproc_per_node N -m vps eval" in line
    assert "-m vps ablate" in lone_launch_warning("ablate", SIMPLE_ASKED_FOR_2)
    assert world_from_env(SIMPLE_ASKED_FOR_2) == World(), "and the run itself is the single process it is"
    for env in [
        {},  # no launcher
        {"ACCELERATE_USE_CPU": "True", "ACCELERATE_MIXED_PRECISION": "no"},  # accelerate asked for one process
        {k: v for k, v in SIMPLE_ASKED_FOR_2.items() if k != "ACCELERATE_USE_CPU"},  # not accelerate's launcher
        {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500", "WORLD_SIZE": "2", "RANK": "0"},  # torchrun / --multi_gpu
        {**SIMPLE_ASKED_FOR_2, "WORLD_SIZE": "1", "RANK": "0"},  # a launch of one, said so
    ]:
        assert lone_launch_warning("eval", env) is None, env


def test_the_cli_says_so_in_one_line_for_sharding_commands_only(tmp_path, monkeypatch, capsys):
    for name, value in SIMPLE_ASKED_FOR_2.items():
        monkeypatch.setenv(name, value)
    assert cli.main(["eval", "--report-only", "--out", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("vps eval: warning: accelerate launch was asked for several processes"), err
    assert len(err) == 2 and err[1].startswith("vps eval: error: "), "then the command goes on as one process"
    assert cli.main(["tune", "--out", str(tmp_path / "study"), "--trials", "0"]) == 2
    assert "asked for several processes" not in capsys.readouterr().err, "vps tune runs as one process anyway"


def test_rank_device(monkeypatch):
    import torch

    if not torch.cuda.is_available():
        assert rank_device(None, 1) is None, "no GPU: the CPU, as for one process"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    current = []
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    assert rank_device(None, 1) == "cuda:1" and current == [1]
    assert rank_device("cuda", 0) == "cuda:0"
    assert rank_device("cuda:1", 0) == "cuda:1" and rank_device("cpu", 1) == "cpu", "an explicit device stays"
    with pytest.raises(ValueError, match="LOCAL_RANK 2: only 2 CUDA device"):
        rank_device(None, 2)


# -- the harness: ranks in one process ---------------------------------------------------------------
class Launch:
    """The ranks of a launch of ``size`` run in this process: rank 0's start barrier runs every other rank
    (each one's barriers recorded); ``stop_at_finish`` stops rank 0 there, as a launch killed before its merge."""

    def __init__(self, model, items, settings, out: Path, size: int, generate, stop_at_finish: bool = False):
        self.args = (model, TOK, items, SPECS, out, settings)
        self.size, self.generate, self.stop = size, generate, stop_at_finish
        self.synced: dict[int, list[str]] = {r: [] for r in range(size)}
        self.written: dict[int, dict[str, int]] = {}

    def _run(self, rank: int) -> None:
        def sync(stage: str) -> None:
            self.synced[rank].append(stage)
            if rank == 0 and stage == "start":
                assert (self.args[4] / "run.json").exists(), "rank 0 wrote run.json before any rank starts"
                for other in range(1, self.size):
                    self._run(other)
            if rank == 0 and stage == "finish" and self.stop:
                raise KeyboardInterrupt

        self.written[rank] = run_evaluation(*self.args, batch_size=2, progress=False, generate_fn=self.generate,
                                            log=lambda _m: None, shard=Shard(rank, self.size, sync=sync))

    def __call__(self) -> Launch:
        self._run(0)
        return self


def _counting(gen, seen: list[str]):
    def generate(model, tokenizer, prompts, *args, **kwargs):
        seen.extend(prompts)
        return gen(model, tokenizer, prompts, *args, **kwargs)

    return generate


def _single_run(tmp_path, model):
    """Items, settings and a fake generator, and the directory of one process's run of them."""
    data = write_data(tmp_path / "d.jsonl")
    items, settings = settings_for(data, nll=False)
    gen = fake_generate({"base": {0, 2}, "vps": {1}})
    single = tmp_path / "single"
    run_evaluation(model, TOK, items, SPECS, single, settings, batch_size=2, progress=False, generate_fn=gen,
                   log=lambda _m: None)
    return items, settings, gen, single


def test_a_launch_writes_the_rows_of_one_process_and_a_rank_without_items_still_meets(tmp_path, model):
    items, settings, gen, single = _single_run(tmp_path, model)
    out = tmp_path / "launch"
    launch = Launch(model, items, settings, out, 6, gen)()  # 5 items, 6 ranks: rank 5 has none
    assert launch.synced == {r: ["start", "finish"] for r in range(6)}
    assert launch.written[5] == {"base": 0, "vps": 0}
    assert all(launch.written[r] == {"base": 1, "vps": 1} for r in range(5))
    assert _same(_lines(out)) == _same(_lines(single)), "same rows, in the order one process writes them"
    assert json.loads((out / "run.json").read_text()) == json.loads((single / "run.json").read_text())
    assert sorted(p.name for p in out.iterdir()) == ["results.jsonl", "run.json"], "no rank file, no lock left"


def test_resume_after_the_number_of_processes_changed(tmp_path, model):
    items, settings, gen, single = _single_run(tmp_path, model)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):  # a launch of 4 stopped before rank 0 merged anything
        Launch(model, items, settings, out, 4, gen, stop_at_finish=True)()
    files = RunDir(out).rank_files()
    assert [p.name for p in files] == [f"rows.rank{r}.jsonl" for r in range(4)]
    assert not (out / "results.jsonl").exists() or not (out / "results.jsonl").read_text()
    cut = files[2].read_text().splitlines()  # rank 2 was killed in the middle of its last write
    files[2].write_text("\n".join(cut[:-1]) + "\n" + cut[-1][:25])
    lost = json.loads(cut[-1])

    seen: list[str] = []
    with pytest.warns(UserWarning, match=r"rows.rank2.jsonl:\d+: ignoring an unparsable final line"):
        Launch(model, items, settings, out, 2, _counting(gen, seen))()  # relaunched with 2 processes
    assert seen == [lost["prompt"]], "only the row cut off is computed again"
    rows = _lines(out)
    assert len(_keys(rows)) == len(set(_keys(rows))) == 10, "each row once"
    key = lambda r: (r["config"], r["index"])  # noqa: E731
    assert _same(sorted(rows, key=key)) == _same(sorted(_lines(single), key=key))
    assert RunDir(out).rank_files() == []
    # and once more as one process: nothing left to do, nothing written
    before = (out / "results.jsonl").read_bytes()
    assert run_evaluation(model, TOK, items, SPECS, out, settings, progress=False, generate_fn=_counting(gen, seen),
                          log=lambda _m: None) == {"base": 0, "vps": 0}
    assert (out / "results.jsonl").read_bytes() == before and len(seen) == 1


def test_one_process_merges_what_a_launch_left(tmp_path, model):
    data = write_data(tmp_path / "d.jsonl")
    items, settings = settings_for(data, nll=False)
    gen = fake_generate({"base": {0, 2}, "vps": {1}})
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        Launch(model, items, settings, out, 3, gen, stop_at_finish=True)()
    left = sorted(_keys([json.loads(line) for p in RunDir(out).rank_files() for line in p.read_text().splitlines()]))
    assert len(left) == 10
    seen: list[str] = []
    logs: list[str] = []
    assert run_evaluation(model, TOK, items, SPECS, out, settings, progress=False, generate_fn=_counting(gen, seen),
                          log=logs.append) == {"base": 0, "vps": 0}
    assert seen == [] and sorted(_keys(_lines(out))) == left and RunDir(out).rank_files() == []
    assert any("all 5 items already in" in m for m in logs)


def test_rank_files_without_run_json_are_not_a_run_directory(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "rows.rank1.jsonl").write_text('{"id": "a", "config": "base"}\n')
    with pytest.raises(io_mod.RunMismatchError, match=r"rows.rank1.jsonl exists without .*run.json"):
        RunDir(out).check_target()


# -- locks -----------------------------------------------------------------------------------------------
HOLDER = textwrap.dedent(f"""
    import importlib.util, sys
    spec = importlib.util.spec_from_file_location("vps_io", {str(Path(io_mod.__file__))!r})
    vps_io = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(vps_io)
    with vps_io.lock_directory(sys.argv[1], sys.argv[2]):
        print("locked", flush=True)
        sys.stdin.readline()
""")


@pytest.fixture
def holder(tmp_path):
    """Start a process holding the lock file NAME of a directory; released at the end."""
    script = tmp_path / "holder.py"
    script.write_text(HOLDER)
    procs: list[subprocess.Popen] = []

    def hold(path: Path, name: str) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, str(script), str(path), name], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "locked", proc.stderr.read()
        procs.append(proc)
        return proc

    yield hold
    for proc in procs:
        proc.communicate("\n", timeout=30)


def test_a_second_process_of_one_rank_is_refused_and_other_ranks_are_not(tmp_path, holder):
    out = tmp_path / "out"
    proc = holder(out, ".lock.rank1")
    with pytest.raises(RunLockedError, match=rf"rank 1: .* process {proc.pid} on host .* holds .*\.lock\.rank1"):
        with dist_mod.rank_session(RunDir(out), World(1, 2, 1), environ={}):
            pytest.fail("a second rank 1 must not get in")
    with RunDir(out).lock(rank=0), RunDir(out).lock(rank=2), RunDir(out).lock():
        pass  # other ranks, and the directory's own lock, are free
    holder(out, ".lock")  # a single-process run works in the directory: a launch's rank 0 is refused
    with pytest.raises(RunLockedError, match=r"rank 0: .* holds .*/\.lock;"):
        with dist_mod.rank_session(RunDir(out), World(0, 2, 0), environ={}):
            pytest.fail("rank 0 must not get in")


def test_the_cli_refuses_a_second_rank_before_loading_anything(tmp_path, model, holder, monkeypatch, capsys):
    monkeypatch.setattr("vps.commands.eval.load", lambda args: pytest.fail("the model must not be loaded"))
    data = write_data(tmp_path / "d.jsonl")
    out = tmp_path / "out"
    proc = holder(out, ".lock.rank1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert cli.main(["eval", "--data", str(data), "--methods", "base", "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (f"vps eval: error: --out rank 1: {out} is in use by another run: process {proc.pid} on host "
                   f"{socket.gethostname()} holds {out / '.lock.rank1'}; wait for it to finish or use another "
                   f"directory"), err


def test_tune_refuses_a_launch_with_a_clear_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert cli.main(["tune", "--out", str(tmp_path / "study")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("vps tune: error: vps tune runs as one process, and this is rank 1 "
                                               "of a WORLD_SIZE=2 launch"), err
    assert not (tmp_path / "study").exists()


def test_a_malformed_launch_environment_is_refused_first(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert cli.main(["eval", "--methods", "base", "--out", str(tmp_path / "out")]) == 2
    assert "WORLD_SIZE=2 but RANK is not set" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# -- real launches: processes, gloo -------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV}
    return {**env, "OMP_NUM_THREADS": "1", **extra}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("launch")
    tok = tiny_tokenizer()
    tiny_model(tok).save_pretrained(root / "ckpt")
    tok.save_pretrained(root / "ckpt")
    return root / "ckpt", write_data(root / "d.jsonl")


def _argv(checkpoint, out: Path) -> list[str]:
    ckpt, data = checkpoint
    return ["eval", "--model", str(ckpt), "--data", str(data), "--methods", "base,vps", "--out", str(out),
            "--max-new-tokens", "4", "--batch-size", "2", "--system", "Solve.", "--threads", "1", "--no-progress"]


@pytest.fixture(scope="module")
def reference(checkpoint, tmp_path_factory):
    """The run directory of one process (this one), greedy, and its rows."""
    out = tmp_path_factory.mktemp("reference") / "out"
    saved = {k: os.environ.pop(k) for k in LAUNCH_ENV if k in os.environ}
    try:
        assert cli.main(_argv(checkpoint, out)) == 0
    finally:
        os.environ.update(saved)
    return out, _lines(out)


def _spawn(argv: list[str], ranks: range, size: int, port: int, **extra: str) -> list[subprocess.Popen]:
    """Ranks of a launch of ``size`` as a launcher starts them: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
    MASTER_PORT."""
    return [subprocess.Popen([sys.executable, "-m", "vps", *argv], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, env=_env(RANK=str(r), WORLD_SIZE=str(size), LOCAL_RANK=str(r),
                                                 MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), **extra))
            for r in ranks]


def _wait(procs: list[subprocess.Popen], timeout: float = 180) -> list[tuple[int, str]]:
    outputs = [p.communicate(timeout=timeout)[0] for p in procs]
    return [(p.returncode, text) for p, text in zip(procs, outputs, strict=True)]


def test_torchrun_with_two_processes_gives_the_greedy_rows_of_one(checkpoint, reference, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "vps", *_argv(checkpoint, out)]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "rank 1 of 2: done; rank 0 merges the rows" in proc.stderr
    assert proc.stdout.count("accuracy [95% CI]") == 1, "rank 0 alone reports"
    assert _same(_lines(out)) == _same(reference[1]), "the same rows, in the order one process writes them"
    assert json.loads((out / "run.json").read_text()) == json.loads((reference[0] / "run.json").read_text())
    assert sorted(p.name for p in out.iterdir()) == ["report.md", "report.png", "results.jsonl", "run.json",
                                                      "summary.json"], "no rank file, no lock left"


def _accelerate(*flags: str, argv: list[str]) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *flags, "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "--main_process_port", str(_free_port()), "-m", "vps", *argv]
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=240)


def test_accelerate_cpu_launch_of_two_says_it_runs_one_and_the_recipe_runs_two(checkpoint, reference, tmp_path):
    """The README's CPU recipe as written: ``--cpu`` starts one process and says so; ``--multi_gpu`` (no GPU
    here) starts two, which give the rows of one."""
    pytest.importorskip("accelerate")
    lone = _accelerate("--cpu", "--num_processes", "2", argv=_argv(checkpoint, tmp_path / "lone"))
    assert lone.returncode == 0, lone.stdout + lone.stderr
    warned = [line for line in lone.stderr.splitlines() if "asked for several processes" in line]
    assert len(warned) == 1 and warned[0].startswith("vps eval: warning: accelerate launch"), lone.stderr
    assert "rank 0 of" not in lone.stderr and _same(_lines(tmp_path / "lone")) == _same(reference[1])
    two = _accelerate("--multi_gpu", "--num_processes", "2", argv=_argv(checkpoint, tmp_path / "two"))
    assert two.returncode == 0, two.stdout + two.stderr
    assert "asked for several processes" not in two.stderr and "rank 1 of 2: done" in two.stderr, two.stderr
    assert _same(_lines(tmp_path / "two")) == _same(reference[1])


def test_two_processes_resume_what_a_launch_of_four_left(checkpoint, reference, tmp_path):
    ref_dir, ref_rows = reference
    out = tmp_path / "out"
    out.mkdir()
    (out / "run.json").write_text((ref_dir / "run.json").read_text())
    # What a launch of 4 left when it was stopped: ranks 1 and 3 had done their items (rank 3's last write
    # cut off), ranks 0 and 2 nothing. Positions are in the run's item order, which the reference's rows follow.
    order = [r["id"] for r in ref_rows if r["config"] == "base"]
    planted = {r: [dict(row, seconds=777.0) for row in ref_rows if order.index(row["id"]) % 4 == r] for r in (1, 3)}
    for rank, rows in planted.items():
        text = "".join(json.dumps(row) + "\n" for row in rows)
        (out / f"rows.rank{rank}.jsonl").write_text(text[:-20] if rank == 3 else text)
    kept = planted[1] + planted[3][:-1]
    assert planted[1] and planted[3][:-1]
    results = _wait(_spawn(_argv(checkpoint, out), range(2), 2, _free_port()))
    assert [code for code, _ in results] == [0, 0], "\n".join(text for _, text in results)
    assert "ignoring an unparsable final line" in results[0][1]
    rows = _lines(out)
    assert len(_keys(rows)) == len(set(_keys(rows))) == len(ref_rows), "each row once"
    by_key = {(r["id"], r["config"]): r for r in rows}
    assert all(by_key[(r["id"], r["config"])] == r for r in kept), "what the old launch finished is not redone"
    recomputed = [r for r in rows if r["seconds"] != 777.0]
    assert len(recomputed) == len(ref_rows) - len(kept)
    ref_by_key = {(r["id"], r["config"]): r for r in ref_rows}
    assert _same(recomputed) == _same([ref_by_key[k] for k in _keys(recomputed)])
    assert RunDir(out).rank_files() == [] and (out / "report.md").exists()


def test_a_rank_whose_peers_never_come_stops_with_a_clear_error(checkpoint, tmp_path):
    out = tmp_path / "out"
    # rank 1 never starts (say it was refused, or crashed at once): rank 0 gives up after VPS_DIST_TIMEOUT
    [(code, text)] = _wait(_spawn(_argv(checkpoint, out), range(1), 2, _free_port(), VPS_DIST_TIMEOUT="3"))
    assert code == 2, text
    assert "vps eval: error: --out" not in text and "rank 0 of 2: could not join the other ranks" in text, text
    assert "within 3 s (VPS_DIST_TIMEOUT)" in text and "model:" not in text, text
    assert not (out / "run.json").exists() and not list(out.glob(".lock*")), "nothing written, locks released"
