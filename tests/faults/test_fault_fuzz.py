"""Property-based fuzzing of the files a user hands the pipeline: class names, templates, manifest JSON,
split JSON. Every fuzzed case is classified, and the figures count cases by class:

- refused, naming the file: a non-zero exit through click's error path, one `Error: ...` line that names
  the fuzzed file (for a manifest: the file, or the shard it lists that does not match);
- accepted and correct: exit 0, and what the command made agrees with what the file says, worked out by
  the test from the file itself (the entries a class-names file's lines give, the keys a manifest lists,
  the positions a split lists), not by the loader under test;
- a defect: anything else (a traceback, a refusal that does not name the file, a file the documented
  format forbids that was accepted, an accepted file whose result disagrees with it). A defect fails the
  test, and Hypothesis shrinks it to a minimal file.

The commands run to the end with the real tiny models (teacher dho-test-vit, student dho-tiny-student,
`--pretrained none`), so acceptance is exercised, not cut short by a missing model. Examples are
derandomized (the same ones every run, no example database written); FAULTS_FUZZ_EXAMPLES=1000 explores
further.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
import unicodedata
from collections import Counter
from pathlib import Path

import pytest
import torch
from fault_helpers import (  # noqa: F401  (one_torch_thread is an autouse fixture)
    CLASSNAMES, assert_clean_error, cache_args, dump_records, invoke, one_torch_thread, trainable_dataset, write_lists,
    write_shards,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir

from dho_pipeline.hashing import fingerprint_json

# Hypothesis keeps caches in ./.hypothesis even without an example database: keep them out of the repository.
set_hypothesis_home_dir(Path(tempfile.gettempdir()) / "dho-pipeline-faults-hypothesis")
EXAMPLES = int(os.environ.get("FAULTS_FUZZ_EXAMPLES", "30"))  # raise it for a deeper local run
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
REFUSED, ACCEPTED = "refused, naming the file", "accepted and correct"
OUTCOMES: dict[str, Counter] = {}  # what was fuzzed (file, command) -> outcome -> cases
CONTENT_KEYS = ("name", "num_samples", "size", "fingerprint", "keys", "labels", "image_ext", "image_offsets",
                "image_sizes")
SPLIT_KEYS = ("manifest_fingerprint", "num_samples", "method", "labeled", "holdout")


class Defect(AssertionError):
    pass


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """Two labeled shards with a top-3 cache and a split (train, split, verify), plus a one-shard, one-class
    data set for the class-name and template files (any non-empty class list covers its labels)."""
    root = tmp_path_factory.mktemp("fuzz")
    data = trainable_dataset(root, num_shards=2, per_shard=6, split_options=("--percent", "40", "--holdout", "1"))
    write_shards(root / "one-class", num_shards=1, per_shard=2, num_classes=1, seed=3)
    assert invoke("manifest", root / "one-class" / "shard-000000.tar", "--out", root / "one-class.json").exit_code == 0
    return {**data, "one_class": root / "one-class.json"}


def _record(what: str, outcome: str) -> str:
    OUTCOMES.setdefault(what, Counter())[outcome] += 1
    return outcome


def _line_of(result) -> str | None:
    """The refusal's `Error:` line, or None for a success; a traceback or a ragged error is a Defect."""
    if result.exit_code == 0:
        return None
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        import traceback

        trace = "".join(traceback.format_exception(result.exception))[-3000:]
        raise Defect(f"uncaught {type(result.exception).__name__} (a traceback for the user):\n{trace}")
    lines = result.output.rstrip("\n").splitlines()
    if not lines or not lines[-1].startswith("Error: ") or "Traceback" in result.output:
        raise Defect(f"exit {result.exit_code} without one 'Error: ...' line:\n{result.output[-2000:]}")
    return lines[-1]


def classify(what: str, result, names: tuple[str, ...], check_accepted) -> str:
    """Refused naming one of `names` (the fuzzed file, ...), or accepted and `check_accepted()` passes."""
    line = _line_of(result)
    if line is None:
        check_accepted()  # raises Defect when the result disagrees with the file
        return _record(what, ACCEPTED)
    if not any(name in line for name in names):
        raise Defect(f"the refusal does not name {names[0]}: {line}")
    return _record(what, REFUSED)


def _summary(prefix: str) -> str:
    total = Counter()
    for what, counts in OUTCOMES.items():
        if what.startswith(prefix):
            total.update(counts)
    return f"{sum(total.values())} cases: {total[REFUSED]} {REFUSED}, {total[ACCEPTED]} {ACCEPTED}, 0 defects"


def _fresh(path: Path) -> Path:
    """An output path with nothing of an earlier example's run left at it."""
    shutil.rmtree(path, ignore_errors=True)
    for suffix in (".lock", ".timings.jsonl"):
        Path(str(path) + suffix).unlink(missing_ok=True)
    return path


# ---- running commands ------------------------------------------------------------------------------------


def _cache_teacher(data, out, **files):
    return invoke(*cache_args({**data, **files}, _fresh(out), "--topk", "3"))


def _train(base, out, *extra, **files):
    data = {**base, **files}
    return invoke("train", "--cache", data["cache"], "--manifest", data["manifest"], "--split", data["split"],
                  "--out", _fresh(out), "--student", "dho-tiny-student", "--pretrained", "none", "--workers", "0",
                  "--batch-size", "2", "--max-steps", "1", *extra)


def _cache_attrs(cache: Path) -> dict:
    """The cache's root attributes, read straight from Zarr's metadata file."""
    return json.loads((cache / "zarr.json").read_text())["attributes"]


def _student_metadata(run: Path) -> dict:
    return torch.load(run / "student.pt", weights_only=True)["dho_pipeline"]


def _expect(condition: bool, message: str) -> None:
    if not condition:
        raise Defect(message)


# ---- strategies ---------------------------------------------------------------------------------------

ENCODINGS = ["utf-8", "utf-8-sig", "utf-16", "utf-32", "latin-1", "cp1252", "shift_jis"]
LINE_PIECES = ["cat", "dog", "a photo of a {}.", "{}", "{} {}", "{0}", "{name}", "}{", "# comment", "", "   ",
               "\t", "é", "日本", "\x00", "\x1b[31m", "\r", "\ufeff", "\u2028", "\x85", "\x0c", "\x7f", "\ud800",
               "x" * 300]
lines_text = st.lists(st.one_of(st.sampled_from(LINE_PIECES), st.text(max_size=20)), max_size=12).map("\n".join)
file_bytes = st.one_of(
    st.binary(max_size=300),
    lines_text.map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.tuples(lines_text, st.sampled_from(ENCODINGS)).map(lambda p: p[0].encode(p[1], "replace")),
)


@st.composite
def _edited_list(draw, entries: list[str]):
    """A valid list file as editors leave it: BOM, CRLF or CR line ends, comments, blank lines, padding;
    sometimes an entry dropped, repeated or moved (then it is another list)."""
    names = list(entries)
    change = draw(st.sampled_from(["none", "none", "drop", "repeat", "swap"]))
    if change == "drop":
        names.pop(draw(st.integers(0, len(names) - 1)))
    elif change == "repeat":
        names.append(names[draw(st.integers(0, len(names) - 1))])
    elif change == "swap":
        names[0], names[-1] = names[-1], names[0]
    lines = []
    for name in names:
        lines += draw(st.lists(st.sampled_from(["", "  ", "# a comment", "\t# indented comment"]), max_size=2))
        lines.append(draw(st.sampled_from(["", " ", "\t"])) + name + draw(st.sampled_from(["", " ", "\t"])))
    newline = draw(st.sampled_from(["\n", "\r\n", "\r"]))
    text = newline.join(lines) + draw(st.sampled_from(["", newline]))
    return (draw(st.sampled_from(["", "\ufeff"])) + text).encode("utf-8")


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


# ---- class names and templates ------------------------------------------------------------------------


def documented_entries(data: bytes, templates: bool = False) -> list[str] | None:
    """What prompts.py's documented format reads in a class-name or template file, written out here
    independently; None where the format says the file must be refused. UTF-8 text (a leading BOM
    allowed); one entry per line (a line ends at \\n, \\r\\n or \\r, as in any text file); surrounding
    whitespace, blank lines and `#` lines ignored; at least one entry; no control characters in an entry
    (a form feed or NEL is not a line break); a template holds exactly one `{}`."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    text = text.removeprefix("\ufeff")
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    entries = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
    if not entries or any(unicodedata.category(ch) == "Cc" for entry in entries for ch in entry):
        return None
    if templates and any(entry.count("{}") != 1 for entry in entries):
        return None
    return entries


def _list_file_case(base, tmp_path, data: bytes, flag: str) -> None:
    """cache-teacher with a fuzzed --classnames or --templates file."""
    path = _write(tmp_path / f"{flag}.txt", data)
    expected = documented_entries(data, templates=flag == "templates")
    out = tmp_path / "fuzz.zarr"
    result = _cache_teacher({**base, "manifest": base["one_class"]}, out,
                            **{"classes" if flag == "classnames" else "templates": path})

    def accepted():
        _expect(expected is not None, f"accepted a {flag} file the format forbids: {data!r}")
        attrs = _cache_attrs(out)
        _expect(attrs[flag] == expected,
                f"{flag} file {data!r}: the cache holds {attrs[flag]!r}, the file says {expected!r}")
        rows = dump_records(out)
        _expect(len(rows) == 2 and all(i < len(attrs["classnames"]) for r in rows for v in r["views"]
                                       for i in v["topk_index"]), f"cache rows do not fit the class list: {rows}")

    outcome = classify(f"{flag} file (cache-teacher)", result, (path.name,), accepted)
    if outcome == REFUSED and expected is not None:
        raise Defect(f"refused a valid {flag} file {data!r} (reads {expected!r}): {result.output.splitlines()[-1]}")


def _train_classnames_case(base, tmp_path, data: bytes) -> None:
    """train --classnames: accepted only when the file gives the cache's own class list, in order."""
    path = _write(tmp_path / "train-classes.txt", data)
    expected = documented_entries(data)
    run = tmp_path / "run"
    result = _train(base, run, "--classnames", path)

    def accepted():
        _expect(expected == CLASSNAMES, f"train accepted class names {expected!r} for a cache of {CLASSNAMES!r}")
        _expect(_student_metadata(run)["classnames"] == CLASSNAMES, "student.pt holds another class list")

    outcome = classify("classnames file (train)", result, (path.name,), accepted)
    if outcome == REFUSED and expected == CLASSNAMES:
        raise Defect(f"train refused a class-names file that gives the cache's own list {data!r}: "
                     f"{result.output.splitlines()[-1]}")


@pytest.mark.slow
def test_fuzz_classnames_and_templates_files(base, tmp_path):
    @FUZZ
    @given(classnames=st.one_of(file_bytes, _edited_list(CLASSNAMES)),
           templates=st.one_of(file_bytes, _edited_list(["a photo of a {}.", "art of the {}."])))
    def run(classnames, templates):
        _list_file_case(base, tmp_path, classnames, "classnames")
        _list_file_case(base, tmp_path, templates, "templates")
        _train_classnames_case(base, tmp_path, classnames)

    run()
    print(f"\nFAULTS fuzz class names / templates: {_summary('classnames') } / {_summary('templates')}")
    for what in ("classnames file (cache-teacher)", "templates file (cache-teacher)", "classnames file (train)"):
        print(f"  {what}: {dict(OUTCOMES[what])}")
        # both ways exercised: the property saw acceptance and refusal
        assert sum(OUTCOMES[what].values()) >= EXAMPLES and OUTCOMES[what][ACCEPTED] and OUTCOMES[what][REFUSED]


@pytest.mark.parametrize("flag", ["classnames", "templates"])
def test_list_files_that_look_like_lines_but_are_not(base, tmp_path, flag):
    """Characters Python's str.splitlines() takes for line breaks but a text file does not (form feed,
    NEL, the separators U+001C-U+001E): a control character inside an entry is refused, naming the
    file, never silently read as two entries (a class list one longer shifts every label after it)."""
    entry = "a photo of a {}." if flag == "templates" else "cat"
    for separator in ("\x0c", "\x0b", "\x1c", "\x1d", "\x1e", "\x85"):
        data = f"{entry}{separator}{entry}\n{entry}\n".encode()
        assert documented_entries(data) is None
        _list_file_case(base, tmp_path, data, flag)


def test_huge_empty_and_misencoded_list_files(base, tmp_path):
    cases = {
        "empty": b"",
        "only comments and blanks": b"# nothing\n\n   \n",
        "utf-16": "cat\ndog\n".encode("utf-16"),
        "latin-1": "caf\xe9\n".encode("latin-1"),
        "huge (20 MB)": None,
        "a directory": "dir",
    }
    for name, content in cases.items():
        path = tmp_path / f"list-{name.split()[0]}"
        if content is None:
            with open(path, "wb") as handle:
                handle.truncate(20 << 20)  # sparse: costs no disk
        elif content == "dir":
            path.mkdir()
        else:
            path.write_bytes(content)
        for flag in ("classes", "templates"):
            result = _cache_teacher({**base, "manifest": base["one_class"]}, tmp_path / "c.zarr", **{flag: path})
            assert classify(f"list file: {name} ({flag})", result, (path.name,), lambda: None) == REFUSED
    print(f"\nFAULTS huge/empty/misencoded list files: {_summary('list file:')}")


# ---- manifests ------------------------------------------------------------------------------------------


def _refingerprint(document):
    """What `dho-pipeline manifest` would have written for this content (a consistent, hand-made manifest)."""
    shards = document.get("shards") if isinstance(document, dict) else None
    if isinstance(shards, list) and all(isinstance(s, dict) for s in shards):
        document["fingerprint"] = fingerprint_json([{k: s.get(k) for k in CONTENT_KEYS} for s in shards])
    return document


def _mutations(valid: dict):
    fields = st.sampled_from(["format", "version", "fingerprint", "shards", "num_shards"])
    shard_fields = st.sampled_from([*CONTENT_KEYS, "path", "extra"])

    @st.composite
    def mutated(draw):
        document = copy.deepcopy(valid)
        for _ in range(draw(st.integers(1, 3))):
            shards = document.get("shards")
            whole = isinstance(shards, list) and len(shards) == 2 and all(isinstance(s, dict) for s in shards)
            if draw(st.booleans()) or not whole:
                field, target = draw(fields), document
            else:
                field, target = draw(shard_fields), shards[draw(st.integers(0, 1))]
            target_kind = draw(st.sampled_from(["replace", "delete", "element"]))
            if target_kind == "delete":
                target.pop(field, None)
            elif target_kind == "element" and isinstance(target.get(field), list) and target[field]:
                target[field][draw(st.integers(0, len(target[field]) - 1))] = draw(json_values)
            else:
                target[field] = draw(json_values)
        return document

    return mutated()


def _listed(document) -> list[tuple[str, str, object]]:
    """(shard, key, label) of every sample the manifest document lists, read from the JSON itself."""
    rows = []
    for shard in document["shards"]:
        labels = shard.get("labels") or [None] * len(shard["keys"])
        rows += [(shard["name"], key, label) for key, label in zip(shard["keys"], labels)]
    return rows


def _manifest_commands(base, tmp_path, path, what, content: bytes):
    """cache-teacher, split and cache verify with a fuzzed manifest; an accepted one must describe the
    same samples as the real manifest (its shards are the real ones), and each output must fit it."""
    reference = json.loads(base["manifest"].read_text())
    names = (path.name, *(s["name"] for s in reference["shards"]))

    def document():
        return json.loads(content)  # accepted: so it is UTF-8 JSON

    def same_samples():
        _expect(_listed(document()) == _listed(reference),
                f"accepted a manifest listing other samples: {content[:300]!r}")

    out = tmp_path / "fuzz.zarr"

    def cache_fits():
        same_samples()
        rows = dump_records(out)
        _expect([(r["shard"], r["key"]) for r in rows] == [(s, k) for s, k, _ in _listed(document())],
                "the cache's rows are not the manifest's samples")

    classify(f"manifest {what} (cache-teacher)", _cache_teacher(base, out, manifest=path), names, cache_fits)

    split = _fresh(tmp_path / "s.json")

    def split_fits():
        same_samples()
        drawn = json.loads(split.read_text())
        sizes = {s["name"]: len(s["keys"]) for s in document()["shards"]}
        _expect(drawn["num_samples"] == sum(sizes.values()), "the split counts another number of samples")
        positions = [(n, p) for n, ps in drawn["labeled"].items() for p in ps]
        _expect(positions and all(n in sizes and 0 <= p < sizes[n] for n, p in positions),
                f"split positions outside the manifest: {drawn['labeled']}")

    classify(f"manifest {what} (split)",
             invoke("split", "--manifest", path, "--percent", "50", "--out", split), names, split_fits)
    verified = invoke("cache", "verify", base["cache"], "--manifest", path)
    classify(f"manifest {what} (cache verify)", verified, names, same_samples)


def test_fuzz_manifest_files(base, tmp_path):
    valid = json.loads(base["manifest"].read_text())

    @FUZZ
    @given(content=st.one_of(file_bytes, json_values.map(lambda v: json.dumps(v).encode()),
                             _mutations(valid).map(lambda d: json.dumps(d).encode())))
    def run(content):
        path = _write(tmp_path / "m.json", content)
        _manifest_commands(base, tmp_path, path, "bytes/JSON/stale-fingerprint", content)

    run()
    print(f"\nFAULTS fuzz manifests: {_summary('manifest bytes')}")
    for what, counts in OUTCOMES.items():
        if what.startswith("manifest bytes"):
            print(f"  {what}: {dict(counts)}")
            assert sum(counts.values()) >= EXAMPLES


# A manifest whose fingerprint matches its (edited) content gets past the fingerprint check: every field
# must then be type-checked, or the commands crash.


def test_fuzz_consistent_manifests(base, tmp_path):
    valid = json.loads(base["manifest"].read_text())
    for shard in valid["shards"]:  # absolute paths: the fuzzed manifest lives in another folder
        shard["path"] = str((base["manifest"].parent / shard["path"]).resolve())

    @FUZZ
    @given(document=_mutations(valid))
    def run(document):
        content = json.dumps(_refingerprint(document)).encode()
        path = _write(tmp_path / "m.json", content)
        _manifest_commands(base, tmp_path, path, "consistent fingerprint", content)

    run()
    print(f"\nFAULTS fuzz consistent manifests: {_summary('manifest consistent')}")
    for what, counts in OUTCOMES.items():
        if what.startswith("manifest consistent"):
            print(f"  {what}: {dict(counts)}")
            assert sum(counts.values()) >= EXAMPLES // 2, f"{what}: only {sum(counts.values())} cases reached it"


def _edited_manifest(base, tmp_path, edit, consistent=True):
    document = json.loads(base["manifest"].read_text())
    for shard in document["shards"]:
        shard["path"] = str((base["manifest"].parent / shard["path"]).resolve())
    edit(document["shards"][0])
    if consistent:
        _refingerprint(document)
    return _write(tmp_path / "m.json", json.dumps(document).encode())


MANIFEST_CRASHES = {
    # (edit of shard #0, fingerprint recomputed?, command): each crashed once
    "label that is a word (cache-teacher)": (lambda s: s["labels"].__setitem__(0, "cat"), True, "cache-teacher"),
    "label that is a word (split)": (lambda s: s["labels"].__setitem__(0, "cat"), True, "split"),
    "label that is a list (cache-teacher)": (lambda s: s["labels"].__setitem__(0, [1]), True, "cache-teacher"),
    "name that is a number (split)": (lambda s: s.__setitem__("name", 7), True, "split"),
    "name that is a list (cache verify)": (lambda s: s.__setitem__("name", ["a"]), True, "cache verify"),
    "name that is a list, stale fingerprint": (lambda s: s.__setitem__("name", ["a"]), False, "cache-teacher"),
}


@pytest.mark.parametrize("case", sorted(MANIFEST_CRASHES))
def test_manifest_with_wrong_types(base, tmp_path, case):
    edit, consistent, command = MANIFEST_CRASHES[case]
    path = _edited_manifest(base, tmp_path, edit, consistent)
    result = {
        "cache-teacher": lambda: _cache_teacher(base, tmp_path / "c.zarr", manifest=path),
        "split": lambda: invoke("split", "--manifest", path, "--percent", "50", "--out", tmp_path / "s.json"),
        "cache verify": lambda: invoke("cache", "verify", base["cache"], "--manifest", path),
    }[command]()
    assert_clean_error(result, "m.json")


# ---- splits -------------------------------------------------------------------------------------------


def _resplit(document):
    if isinstance(document, dict) and all(k in document for k in SPLIT_KEYS):
        document["fingerprint"] = fingerprint_json({k: document[k] for k in SPLIT_KEYS})
    return document


def _split_case(base, tmp_path, content: bytes, what: str) -> None:
    """train with a fuzzed split: an accepted one must train on exactly the samples it lists as labeled."""
    path = _write(tmp_path / "s.json", content)
    run = tmp_path / "run"
    result = _train(base, run, split=path)
    manifest = json.loads(base["manifest"].read_text())
    keys = {shard["name"]: shard["keys"] for shard in manifest["shards"]}

    def accepted():
        document = json.loads(content)
        listed = {part: {(n, p) for n, ps in document[part].items() for p in ps} for part in ("labeled", "holdout")}
        _expect(not listed["labeled"] & listed["holdout"], f"accepted a split whose labeled and held-out samples "
                                                            f"overlap: {sorted(listed['labeled'] & listed['holdout'])}")
        summary = json.loads((run / "summary.json").read_text())
        total = sum(len(k) for k in keys.values())
        _expect(summary["labeled"] == len(listed["labeled"]) and
                summary["unlabeled"] == total - len(listed["labeled"]) - len(listed["holdout"]),
                f"trained on {summary['labeled']} + {summary['unlabeled']} samples; the split lists {listed}")
        trained = sorted(_student_metadata(run)["labeled_keys"])
        _expect(trained == sorted(keys[n][p] for n, p in listed["labeled"]), "trained on other labeled keys")

    classify(what, result, (path.name,), accepted)


def test_fuzz_split_files(base, tmp_path):
    valid = json.loads(base["split"].read_text())
    fields = st.sampled_from([*SPLIT_KEYS, "format", "fingerprint", "num_labeled"])

    @st.composite
    def mutated(draw):
        document = copy.deepcopy(valid)
        for _ in range(draw(st.integers(1, 3))):
            field = draw(fields)
            if draw(st.booleans()):
                document.pop(field, None)
            else:
                document[field] = draw(json_values)
        return document

    @FUZZ
    @given(content=st.one_of(file_bytes, json_values.map(lambda v: json.dumps(v).encode()),
                             mutated().map(lambda d: json.dumps(d).encode())))
    def run(content):
        _split_case(base, tmp_path, content, "split file (train)")

    run()
    print(f"\nFAULTS fuzz splits: {_summary('split file')}")
    assert sum(OUTCOMES["split file (train)"].values()) >= EXAMPLES


def test_fuzz_consistent_split_positions(base, tmp_path):
    """Splits whose fingerprint matches their (edited) positions, some out of range, some overlapping:
    train refuses them naming the file, or trains on exactly the listed samples."""
    valid = json.loads(base["split"].read_text())
    names = [s["name"] for s in json.loads(base["manifest"].read_text())["shards"]]
    positions = st.lists(st.integers(0, 6), max_size=3, unique=True)  # shards of 6 samples: 6 is past the end
    chosen = st.fixed_dictionaries({}, optional={n: positions for n in names})

    @FUZZ
    @given(labeled=chosen, holdout=st.one_of(st.just({}), chosen))
    def run(labeled, holdout):
        document = _resplit({**valid, "labeled": labeled, "holdout": holdout})
        _split_case(base, tmp_path, json.dumps(document).encode(), "consistent split (train)")

    run()
    print(f"\nFAULTS fuzz consistent splits: {_summary('consistent split')}")


SPLIT_CRASHES = {
    "position past the shard's end": {"shard-000000.tar": [99]},
    "position that is a string": {"shard-000000.tar": ["1"]},
    "positions that are a dict": {"shard-000000.tar": {"1": 2}},
    "labeled that is a list": ["shard-000000.tar"],
}


@pytest.mark.parametrize("case", sorted(SPLIT_CRASHES))
def test_consistent_split_with_bad_positions(base, tmp_path, case):
    document = _resplit({**json.loads(base["split"].read_text()), "labeled": SPLIT_CRASHES[case]})
    path = _write(tmp_path / "s.json", json.dumps(document).encode())
    assert_clean_error(_train(base, tmp_path / "run", split=path), "s.json")


def test_split_whose_labeled_and_held_out_samples_overlap(base, tmp_path):
    """Found by the fuzzing above: held out means never trained on, so a sample may not be both."""
    split = json.loads(base["split"].read_text())
    name, positions = next(iter(split["labeled"].items()))
    document = _resplit({**split, "holdout": {name: positions[:1]}})
    path = _write(tmp_path / "s.json", json.dumps(document).encode())
    assert_clean_error(_train(base, tmp_path / "run", split=path), "s.json", "both labeled and held out")


def test_huge_empty_and_misencoded_manifest_and_split_files(base, tmp_path):
    valid_manifest, valid_split = base["manifest"].read_text(), base["split"].read_text()
    cases = {
        "empty": b"",
        "whitespace": b" \n\t\n",
        "UTF-16 (a valid document, re-saved)": None,
        "latin-1 bytes": "{\"format\": \"caf\xe9\"}".encode("latin-1"),
        "huge (20 MB of NUL bytes)": "sparse",
        "JSON nested 100000 deep": b"[" * 100_000 + b"]" * 100_000,
        "a directory": "dir",
    }
    tried = 0
    for name, content in cases.items():
        for kind, valid in (("manifest", valid_manifest), ("split", valid_split)):
            path = tmp_path / f"{kind}-{tried}.json"
            if content is None:
                path.write_bytes(valid.encode("utf-16"))
            elif content == "sparse":
                with open(path, "wb") as handle:
                    handle.truncate(20 << 20)
            elif content == "dir":
                path.mkdir()
            else:
                path.write_bytes(content)
            if kind == "manifest":
                results = [_cache_teacher(base, tmp_path / "c.zarr", manifest=path),
                           invoke("split", "--manifest", path, "--percent", "50", "--out", tmp_path / "s.json")]
            else:
                results = [_train(base, tmp_path / "run", split=path)]
            for result in results:
                assert classify(f"bad file: {kind}, {name}", result, (path.name,), lambda: None) == REFUSED
            tried += 1
    print(f"\nFAULTS huge/empty/misencoded manifest and split files: {_summary('bad file:')}")


def test_fuzz_summary(request):
    """Runs last in this module: every case of the module, by class."""
    print(f"\nFAULTS fuzz (all cases of this module): {_summary('')}")
    selected = [item for item in request.session.items if item.module is request.module]
    whole_module = len(selected) >= 20 and not request.config.getoption("markexpr")  # not a -k or -m selection
    if whole_module:
        assert sum(sum(c.values()) for c in OUTCOMES.values()) >= 10 * EXAMPLES
