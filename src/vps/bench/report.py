"""`format_report`: a `run_benchmark` result as text (what was measured and how, the ratio table, notes)."""

from __future__ import annotations

from typing import Any

__all__ = ["format_report"]


def _ms(seconds: float) -> str:
    ms = seconds * 1e3
    return f"{ms:.0f}" if ms >= 100 else f"{ms:.1f}" if ms >= 10 else f"{ms:.2f}"


def _cell(ratio: float, vps_s: float, base_s: float, ok: bool | None) -> str:
    mark = "" if ok is None else (" PASS" if ok else " FAIL")
    return f"{ratio:.2f}x ({_ms(vps_s)}/{_ms(base_s)} ms){mark}"


def _fmt_load(load: list[float] | None) -> str:
    return "n/a" if not load else " ".join(f"{x:.2f}" for x in load)


def _preamble(result: dict[str, Any]) -> list[str]:
    """Model, machine, code and load; how the run was measured and how to read the cells."""
    m, md, st = result["machine"], result["model"], result["settings"]
    lines = [
        f"vps bench — model {md['name'] or '(in-memory)'} ({md['class']}, {md['params'] / 1e6:.1f}M params, "
        f"{md['dtype']}) on {m['device']} ({m['device_name']})",
        f"torch {m['torch']}, transformers {m['transformers']}, vps {m['vps']}, python {m['python']}; "
        f"torch threads {m['threads']} of {m['cpu_count']} CPUs",
    ]
    if code := result.get("code"):
        lines.append(f"vps source {code['source_sha256']} (git {code['git_commit'] or 'n/a'}"
                     f"{', uncommitted changes' if code['git_dirty'] else ''})")
    load = (f"load average (1/5/15 min): start {_fmt_load(m.get('loadavg_start'))}, "
            f"end {_fmt_load(m.get('loadavg_end'))}")
    if m.get("load_1m_during"):
        d = m["load_1m_during"]
        load += f"; 1-min during runs min/median/max {d['min']:.2f}/{d['median']:.2f}/{d['max']:.2f}"
    lines.append(load)
    busy = (m.get("load_1m_during") or {}).get("median", 0.0)
    if m.get("cpu_count") and busy > m["cpu_count"]:
        lines.append(f"WARNING: machine busy (1-min load {busy:.1f} on {m['cpu_count']} CPUs): absolute times are "
                     "inflated; trust the paired ratios more"
                     + ("; with several torch threads, busy cores make OpenMP threads wait on each other and "
                        "times jump erratically — --threads 1 is steadier" if m["threads"] > 1 else ""))
    lines.append(f"base (unpatched) measured in this same process, interleaved with every config in rotating order "
                 f"after {st['warmup']} warm-up run(s); medians of {st['prefill_repeats']} (prefill) / "
                 f"{st['decode_repeats']} (decode) rounds{' [--quick sizes]' if st['quick'] else ''}")
    if st["quick"]:
        lines.append("--quick: a smoke test at tiny sizes, not a measurement: no target applies to its ratios")
    lines.append("cells: ratio vps/base (vps ms / base ms); decode = ms per token (decode steps only, "
                 f"{st['new_tokens']} new tokens after an untimed {st['prompt_tokens']}-token prefill); "
                 f"generate() = ms per new token of one greedy generate() call ({st['new_tokens']} new tokens, "
                 "its prefill included)")
    if comp := result.get("compile"):
        lines.append(f"compiled: base and every config with torch.compile(mode={comp['mode']!r}, fullgraph=True), each "
                     f"its own copy compiled once, {comp['graphs']} graph(s) in all; warm-up rounds compile, untimed; "
                     "decode and generate() into a static KV cache")
    if floors := [n for n, e in result["configs"].items() if e.get("plan_reuse")]:
        lines.append(f"{', '.join(floors)}: SK plans built by an untimed run, then reused: the rank-2 term alone, "
                     "the least any dynamic selection can cost (no target)")
    if result.get("memory_method"):
        lines.append(f"peak mem: {result['memory_method']}")
    elif result.get("memory_skipped"):
        lines.append(f"peak mem: skipped ({result['memory_skipped']})")
    if base_mem_info := result["base"].get("memory"):
        if not base_mem_info.get("peak_reset", True):
            lines.append("peak mem: WARNING: the peak RSS could not be reset after loading, so it includes the "
                         "loading peak and the ratios understate the difference")
    if result.get("memory_error"):
        lines.append(f"peak mem: error: {result['memory_error']}")
    return lines


# The console table is split into blocks of columns (each repeating the config column) to stay this wide.
TABLE_WIDTH = 120


def _columns(result: dict[str, Any]) -> list[list[str]]:
    """The ratio table as columns: config names, then one per workload and one for peak memory (where any
    was measured). Each column is [header, target, base, one cell per config]."""
    workloads, base = result["workloads"], result["base"]
    columns = [["config", "target", "base", *result["configs"]]]
    for w in workloads:
        t = w["target"]
        s = base["workloads"][w["key"]]
        column = [w["label"], "" if t is None else f"<= {t:.2f}x" + (" (frozen)" if w["frozen_only"] else ""),
                  f"{_ms(s['median_s'])} ms" + ("/tok" if w["kind"] != "prefill" else "")
                  + f" [{_ms(s['min_s'])}-{_ms(s['max_s'])}]"]
        for entry in result["configs"].values():
            c = entry["workloads"][w["key"]]
            column.append(_cell(c["ratio"], c["median_s"], s["median_s"], c["pass"]))
        columns.append(column)
    base_mem = base.get("memory")
    mems = [e.get("memory") for e in result["configs"].values()]
    if base_mem or any(mems):
        targets = {m["target"] for m in mems if m and m.get("target") is not None}
        column = ["peak mem", " / ".join(f"<= {t:.2f}x" for t in sorted(targets)),
                  f"{base_mem['peak_mb']:.0f} MB" if base_mem else "-"]
        for mem in mems:
            if mem and "ratio" in mem and base_mem:
                mark = "" if mem.get("pass") is None else (" PASS" if mem["pass"] else " FAIL")
                column.append(f"{mem['ratio']:.3f}x ({mem['peak_mb']:.0f}/{base_mem['peak_mb']:.0f} MB){mark}")
            else:
                column.append("-")
        columns.append(column)
    return columns


def _blocks(widths: list[int], limit: int) -> list[list[int]]:
    """Column indices (after the first, which every block repeats) packed into blocks whose lines fit ``limit``;
    a column wider than ``limit`` on its own gets a block of its own."""
    blocks: list[list[int]] = []
    line = limit + 1  # forces a new block for the first column
    for i in range(1, len(widths)):
        if line + 3 + widths[i] > limit:
            blocks.append([])
            line = widths[0]
        blocks[-1].append(i)
        line += 3 + widths[i]
    return blocks


def _table(result: dict[str, Any], limit: int = TABLE_WIDTH) -> list[str]:
    """The ratio table: a column per workload and peak memory; rows target (only where a target applies), base
    and one per config; split into blocks of columns no wider than ``limit`` characters."""
    columns = _columns(result)
    widths = [max(len(cell) for cell in column) for column in columns]
    lines: list[str] = []
    for block in _blocks(widths, limit):
        shown = [0, *block]
        with_target = any(columns[i][1] for i in block)
        if lines:
            lines.append("")
        for row in range(len(columns[0])):
            if row == 1 and not with_target:
                continue
            lines.append(" | ".join(columns[i][row].ljust(widths[i]) for i in shown).rstrip())
            if row == (1 if with_target else 0):
                lines.append("-+-".join("-" * widths[i] for i in shown))
    return lines


def _notes(result: dict[str, Any]) -> list[str]:
    """Base throughput, noisy cells, RSS growth and the wall time."""
    workloads, base = result["workloads"], result["base"]
    lines = []
    for w in workloads:
        if w["kind"] != "prefill":
            s = base["workloads"][w["key"]]
            rates = [f"{name} {e['workloads'][w['key']]['tokens_per_s']:.1f}" for name, e in result["configs"].items()]
            lines.append(f"{w['label']} tokens/s: base {s['tokens_per_s']:.1f}" + "".join(f", {r}" for r in rates))
    noisy = []
    for name, entry in result["configs"].items():
        for w in workloads:
            s = entry["workloads"][w["key"]]
            if abs(s["paired_ratio"] - s["ratio"]) > 0.05 * s["ratio"]:
                noisy.append(f"{name} {w['label']} (paired {s['paired_ratio']:.2f}x)")
    if noisy:
        lines.append("noisy (median ratio and per-round paired ratio differ by > 5%): " + ", ".join(noisy))
    if base_mem := base.get("memory"):
        mems = [f"{n} +{e['memory']['workload_mb']:.0f} MB" for n, e in result["configs"].items() if e.get("memory")]
        lines.append(f"RSS growth during the prefills (includes paging in memory-mapped weights on first use): base "
                     f"+{base_mem['workload_mb']:.0f} MB; " + ", ".join(mems))
    lines.append(f"wall time {result['wall_s']:.0f} s")
    return lines


def _compile_lines(result: dict[str, Any]) -> list[str]:
    """Compile time of each variant (its own line) and any compilation that fell into a timed round."""
    comp = result.get("compile")
    if not comp or "base_compile_s" not in comp:
        return []
    parts = [f"base {comp['base_compile_s']:.1f} s"]
    for name, c in comp["configs"].items():
        ratio = f" ({c['ratio']:.2f}x)" if c["ratio"] is not None else ""
        parts.append(f"{name} {c['compile_s']:.1f} s{ratio}")
    # Results written before the caches were switched off say nothing ("cold" absent): not claimed cold.
    how = "cold, caches off" if comp.get("cold") else "caches on: an earlier process's graphs may load from disk"
    lines = [f"compile time (dynamo + inductor, every shape of the warm-up rounds, {how}; ratio to base): "
             + "; ".join(parts)]
    timed = {"base": comp.get("timed_base_compile_s", 0.0)}
    timed |= {n: c["timed_compile_s"] for n, c in comp["configs"].items()}
    if late := {n: s for n, s in timed.items() if s > 0}:
        lines.append("WARNING: compilation inside timed rounds (a recompile), those figures include it: "
                     + ", ".join(f"{n} {s:.1f} s" for n, s in late.items()))
    else:
        lines.append("timed rounds compiled nothing: every figure (and tokens/s) excludes compile time")
    return lines


def format_report(result: dict[str, Any]) -> str:
    """Machine info, the ratio table (with targets where they apply, in blocks of at most `TABLE_WIDTH`
    columns), compile times when compiled, and how to read it."""
    return "\n".join([*_preamble(result), "", *_table(result), "", *_compile_lines(result), *_notes(result)])
