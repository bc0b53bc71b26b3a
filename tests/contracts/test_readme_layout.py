"""The README's layout table names every module of the package, in the row of the folder that holds it, so a
newcomer finds each file from the table (and a new module without a row turns this red)."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "src" / "vps"
# Entry points and the version stamp: no idea of their own to describe.
UNLISTED = {"__init__.py", "__main__.py", "_version.py"}


def _layout_rows() -> list[tuple[str, str]]:
    """(where, whole row) of each row of the README's layout table (the one headed `| part | where |`)."""
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| part | where |"))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = line.split(" | ")
        rows.append((cells[1], line))
    return rows


def _modules() -> list[Path]:
    return sorted(p.relative_to(PACKAGE) for p in PACKAGE.rglob("*.py") if p.name not in UNLISTED)


def _named(module: Path, rows: list[tuple[str, str]]) -> bool:
    if f"`{module.as_posix()}`" in " ".join(row for _, row in rows):
        return True
    folder = module.parent.as_posix()
    if folder == ".":  # a top-level module is named by its file name in some row
        return any(f"`{module.name}`" in row for _, row in rows)
    # A module of a package is named in the row whose "where" cell is that package's folder.
    return any(f"`{folder}/`" in where and f"`{module.name}`" in row for where, row in rows)


def test_every_module_has_its_place_in_the_layout_table():
    rows = _layout_rows()
    assert len(rows) > 20
    missing = [m.as_posix() for m in _modules() if not _named(m, rows)]
    assert not missing, f"README layout table does not name: {missing}"


def test_the_check_sees_a_module_that_is_missing(tmp_path):
    """The check above can fail: a file named in no row is reported."""
    rows = _layout_rows()
    assert not _named(Path("evaluation/unheard_of.py"), rows)
    assert not _named(Path("report.py"), [(w, r) for w, r in rows if "`report.py`" not in r])
