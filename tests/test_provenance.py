"""Every annotated benchmark figure in BENCHMARKS.md and README.md is the number in a committed JSON.

A table or paragraph that quotes measured figures is preceded by an HTML comment naming its source:

    <!-- figures: bench/results/cpu-2026-11-30/stage1_datapath.json
    | - | views_1.bare_images_per_second | views_1.ratio |
    | - | views_8.bare_images_per_second | views_8.ratio |
    -->
    | views | bare loop | ratio |
    |---|---|---|
    | 1 | 279.4 img/s | **0.948** |
    | 8 | 54.8 img/s | **0.925** |

Above a table, the comment holds one row per data row and one cell per column: `-` for a cell that
quotes no figure (a label), else one JSON path per number in the cell, in order. Above a paragraph
(up to the next blank line), it holds lines `PATH = PRINTED`: the figure as printed there. A path is
`[FILE:]KEY.KEY...[*FACTOR]`: keys (list indices as numbers) into the JSON, the file relative to the
source when the source is a folder, and a factor for the printed unit (`*100` for a percentage,
`*1e-9` for GFLOP). `{a,b}` expands as in a shell: `variants.eager_bf16.{64,128}.mfu`.

Checked: every annotated number matches its JSON value within the printed rounding (0.948 means
within 0.0005), and a paragraph prints each annotated figure as many times as it is annotated; every
figures comment is well formed (none is skipped unread); every JSON under bench/results records command,
commit, machine and date; every table in BENCHMARKS.md has a source; every repository path
BENCHMARKS.md cites exists. Numbers a paragraph prints without an annotation are not checked.
"""

from __future__ import annotations

import itertools
from collections import Counter
import json
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOCUMENTS = ("BENCHMARKS.md", "README.md")
COMMENT = re.compile(r"<!--\s*figures:\s*(\S+)(.*?)-->\n", re.S)
# A printed figure: digits with optional thousands separators and decimals, not glued to a letter,
# digit or point before it (the 16 of "bf16" is not a figure; that of "ViT-B-16" is, as in "0.82-1.05").
NUMBER = re.compile(r"(?<![\w.])(\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?)")


def numbers(text: str) -> list[str]:
    return NUMBER.findall(text)


def cells(row: str) -> list[str]:
    return [cell.strip() for cell in row.strip().strip("|").split("|")]


def expand(path: str) -> list[str]:
    """Shell-style brace expansion, any number of groups, no nesting."""
    parts = re.split(r"\{([^{}]*)\}", path)
    choices = [[p] if i % 2 == 0 else p.split(",") for i, p in enumerate(parts)]
    return ["".join(combo) for combo in itertools.product(*choices)]


def resolve(source: Path, path: str):
    """The number a path names, times its factor."""
    factor = 1.0
    if "*" in path:
        path, scale = path.rsplit("*", 1)
        factor = float(scale)
    file = source
    if ":" in path:
        name, path = path.split(":", 1)
        file = source / name if source.is_dir() else source.parent / name
    value = load(file)
    for key in path.split("."):
        value = value[int(key)] if isinstance(value, list) else value[key]
    if not isinstance(value, (int, float)):
        raise AssertionError(f"{file}: {path} is {value!r}, not a number")
    return file, value * factor


_loaded: dict[Path, dict] = {}


def load(file: Path) -> dict:
    if file not in _loaded:
        assert file.is_file(), f"{file.relative_to(REPO)} is cited but does not exist"
        _loaded[file] = json.loads(file.read_text())
    return _loaded[file]


def matches(printed: str, value: float) -> bool:
    decimals = len(printed.split(".")[1]) if "." in printed else 0
    return abs(value - float(printed.replace(",", ""))) <= 0.5 * 10**-decimals * (1 + 1e-9) + 1e-12


def annotations(document: str) -> list[tuple[str, Path, str, str, int]]:
    """(document, source, comment body, the block after the comment, line number) per annotation."""
    text = (REPO / document).read_text()
    opened = len(re.findall(r"<!--\s*figures", text))
    found = []
    for match in COMMENT.finditer(text):
        after = text[match.end():].split("\n\n", 1)[0]
        line = text[: match.start()].count("\n") + 1
        found.append((document, REPO / match.group(1), match.group(2).strip(), after, line))
    assert len(found) == opened, f"{document}: {opened - len(found)} figures comment(s) not of the form the test reads"
    return found


ALL = [a for document in DOCUMENTS for a in annotations(document)]


def check_table(source: Path, body: str, table: str, where: str) -> int:
    grid = [cells(line) for line in body.splitlines() if line.strip().startswith("|")]
    rows = [cells(line) for line in table.splitlines() if line.startswith("|")][2:]  # header, rule
    assert len(grid) == len(rows), f"{where}: {len(grid)} annotation rows for {len(rows)} table rows"
    checked = 0
    for r, (paths_row, row) in enumerate(zip(grid, rows), 1):
        assert len(paths_row) == len(row), f"{where}, row {r}: {len(paths_row)} annotation cells, {len(row)} in the table"
        for c, (spec, cell) in enumerate(zip(paths_row, row), 1):
            if spec == "-":
                continue
            paths = [p for word in spec.split() for p in expand(word)]
            printed = numbers(cell)
            assert len(paths) == len(printed), f"{where}, row {r} cell {c} {cell!r}: {len(printed)} numbers, {len(paths)} paths"
            for path, figure in zip(paths, printed):
                file, value = resolve(source, path)
                assert matches(figure, value), (f"{where}, row {r} cell {c}: printed {figure}, "
                                                f"{file.relative_to(REPO)} {path} = {value}")
                checked += 1
    return checked


def check_paragraph(source: Path, body: str, paragraph: str, where: str) -> int:
    printed_here = numbers(paragraph)
    annotated = Counter(line.split("=")[1].strip() for line in body.splitlines())
    twice = annotated - Counter(printed_here)  # each annotation needs its own printed figure
    assert not twice, f"{where}: {sorted(twice)} annotated more often than printed"
    checked = 0
    for line in body.splitlines():
        path, printed = (part.strip() for part in line.split("="))
        assert printed in printed_here, f"{where}: {printed} ({path}) is not in the paragraph that follows"
        file, value = resolve(source, path)
        assert matches(printed, value), f"{where}: printed {printed}, {file.relative_to(REPO)} {path} = {value}"
        checked += 1
    return checked


@pytest.mark.parametrize("document, source, body, after, line", ALL, ids=[f"{a[0]}:{a[4]}" for a in ALL])
def test_figures_match_their_json(document, source, body, after, line):
    where = f"{document}:{line}"
    assert body, f"{where}: the annotation lists no figures"
    if after.startswith("|"):
        assert check_table(source, body, after, where) > 0, f"{where}: no figure checked"
    else:
        assert check_paragraph(source, body, after, where) > 0


def cited_files() -> set[Path]:
    files = set()
    for _, source, body, _, _ in ALL:
        for word in re.findall(r"(\S+\.json):", body):
            files.add(source / word if source.is_dir() else source.parent / word)
        if not source.is_dir():
            files.add(source)
    return files


def test_cited_json_exists():
    missing = sorted(str(f.relative_to(REPO)) for f in cited_files() if not f.is_file())
    assert not missing, f"cited but not committed: {missing}"


@pytest.mark.parametrize("file", sorted(REPO.glob("bench/results/**/*.json")), ids=lambda p: str(p.relative_to(REPO)))
def test_cited_json_records_its_provenance(file):
    data = load(file)
    for key in ("command", "commit", "machine", "date"):
        assert data.get(key), f"{file.relative_to(REPO)} has no {key}"
    assert "sha" in data["commit"] and "dirty" in data["commit"], f"{file.relative_to(REPO)}: commit needs sha and dirty"


def test_every_benchmark_table_has_a_source():
    lines = (REPO / "BENCHMARKS.md").read_text().splitlines()
    in_comment, inside = False, []
    for line in lines:  # the annotation rows inside a comment are not a table
        in_comment = in_comment or line.startswith("<!--")
        inside.append(in_comment)
        in_comment = in_comment and "-->" not in line
    starts = [i for i, line in enumerate(lines)
              if line.startswith("|") and not inside[i] and not (i and lines[i - 1].startswith("|") and not inside[i - 1])]
    for i in starts:
        before = "\n".join(lines[:i])
        opened = before.rfind("<!--")
        assert lines[i - 1].rstrip().endswith("-->") and before[opened:].startswith("<!-- figures:"), \
            f"BENCHMARKS.md line {i + 1}: a table without a figures comment right above it: {lines[i]}"
    assert starts


def test_paths_cited_in_benchmarks_exist():
    text = (REPO / "BENCHMARKS.md").read_text()
    cited = set(re.findall(r"`((?:bench|dho_pipeline|stages|tests|docs|manifests)/[^`\s]*)`", text))
    cited |= {m.group(1) for m in COMMENT.finditer(text)}
    cited = {p for p in cited if "<" not in p}  # templates such as bench/results/<gpu>-<date>/
    missing = sorted(p for p in cited if not any(REPO.glob(p.rstrip("/"))))
    assert not missing, f"BENCHMARKS.md cites paths that do not exist: {missing}"
    assert cited
