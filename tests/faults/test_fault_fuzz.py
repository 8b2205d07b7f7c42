"""Property-based fuzzing of the files a user hands the pipeline: class names, templates, manifest JSON,
split JSON. Whatever their content (empty, malformed, wrong encoding, huge), a command either works or
stops through click's error path with one `Error: ...` line: never an uncaught Python exception.

Commands run in-process (click's CliRunner); the teacher is named `dho-no-such-model`, so that input
that passes every check still stops (cleanly) before any model is built. Examples are derandomized (the
same 40 every run, no example database written); FAULTS_FUZZ_EXAMPLES=1000 explores further.
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
from pathlib import Path

import pytest
from fault_helpers import (  # noqa: F401  (one_torch_thread is an autouse fixture)
    assert_clean_error, cache_args, invoke, one_torch_thread, trainable_dataset,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir

from dho_pipeline.hashing import fingerprint_json

# Hypothesis keeps caches in ./.hypothesis even without an example database: keep them out of the repository.
set_hypothesis_home_dir(Path(tempfile.gettempdir()) / "dho-pipeline-faults-hypothesis")
EXAMPLES = int(os.environ.get("FAULTS_FUZZ_EXAMPLES", "40"))  # raise it for a deeper local run
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
TRIED: dict[str, int] = {}
NO_TEACHER = "dho-no-such-model"
CONTENT_KEYS = ("name", "num_samples", "size", "fingerprint", "keys", "labels", "image_ext", "image_offsets",
                "image_sizes")
SPLIT_KEYS = ("manifest_fingerprint", "num_samples", "method", "labeled", "holdout")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return trainable_dataset(tmp_path_factory.mktemp("fuzz"), num_shards=2, per_shard=6,
                             split_options=("--percent", "40", "--holdout", "1"))


def _mine(prefix: str) -> dict:
    return {k: v for k, v in TRIED.items() if k.startswith(prefix)}


def check(result, what: str) -> str:
    """Success, or click's clean error path; anything else fails the property."""
    TRIED[what] = TRIED.get(what, 0) + 1
    if result.exit_code == 0:
        return "ok"
    return assert_clean_error(result)


def _cache_teacher(base, tmp_path, **files):
    data = {**base, **files}
    args = cache_args(data, tmp_path / "fuzz.zarr")
    args[args.index("--teacher") + 1] = NO_TEACHER
    return invoke(*args)


def _train(base, tmp_path, *extra, student=NO_TEACHER, **files):
    data = {**base, **files}
    return invoke("train", "--cache", data["cache"], "--manifest", data["manifest"], "--split", data["split"],
                  "--out", tmp_path / "run", "--student", student, "--pretrained", "none", "--workers", "0", *extra)


# ---- strategies ---------------------------------------------------------------------------------------

ENCODINGS = ["utf-8", "utf-8-sig", "utf-16", "utf-32", "latin-1", "cp1252", "shift_jis"]
LINE_PIECES = ["cat", "dog", "a photo of a {}.", "{}", "{} {}", "{0}", "{name}", "}{", "# comment", "", "   ",
               "\t", "é", "日本", "\x00", "\x1b[31m", "\r", "\ufeff", "\u2028", "\ud800", "x" * 300]
lines_text = st.lists(st.one_of(st.sampled_from(LINE_PIECES), st.text(max_size=20)), max_size=12).map("\n".join)
file_bytes = st.one_of(
    st.binary(max_size=300),
    lines_text.map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.tuples(lines_text, st.sampled_from(ENCODINGS)).map(lambda p: p[0].encode(p[1], "replace")),
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


# ---- class names and templates ------------------------------------------------------------------------


def test_fuzz_classnames_and_templates_files(base, tmp_path):
    @FUZZ
    @given(classnames=file_bytes, templates=file_bytes)
    def run(classnames, templates):
        classes = _write(tmp_path / "classes.txt", classnames)
        template_file = _write(tmp_path / "templates.txt", templates)
        check(_cache_teacher(base, tmp_path, classes=classes), "classnames (cache-teacher)")
        check(_cache_teacher(base, tmp_path, templates=template_file), "templates (cache-teacher)")
        check(_train(base, tmp_path, "--classnames", classes), "classnames (train)")

    run()
    print(f"\nFAULTS fuzz class names / templates: {_mine('classnames (') | _mine('templates (')}")
    assert TRIED["classnames (cache-teacher)"] >= EXAMPLES


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
            line = check(_cache_teacher(base, tmp_path, **{flag: path}), f"{flag} file: {name}")
            assert line != "ok" and str(path.name) in line, line
    print(f"\nFAULTS huge/empty/misencoded list files: {len(cases) * 2} tried")


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


def _manifest_commands(base, tmp_path, path, what):
    check(_cache_teacher(base, tmp_path, manifest=path), f"manifest {what} (cache-teacher)")
    check(invoke("split", "--manifest", path, "--percent", "50", "--out", tmp_path / "s.json"), f"manifest {what} (split)")
    check(invoke("cache", "verify", base["cache"], "--manifest", path), f"manifest {what} (cache verify)")


def test_fuzz_manifest_files(base, tmp_path):
    valid = json.loads(base["manifest"].read_text())

    @FUZZ
    @given(content=st.one_of(file_bytes, json_values.map(lambda v: json.dumps(v).encode()),
                             _mutations(valid).map(lambda d: json.dumps(d).encode())))
    def run(content):
        _manifest_commands(base, tmp_path, _write(tmp_path / "m.json", content), "bytes/JSON/stale-fingerprint")

    run()
    print(f"\nFAULTS fuzz manifests: {_mine('manifest bytes')}")
    assert TRIED["manifest bytes/JSON/stale-fingerprint (split)"] >= EXAMPLES


# A manifest whose fingerprint matches its (edited) content gets past the fingerprint check: every field
# must then be type-checked, or the commands crash.


def test_fuzz_consistent_manifests(base, tmp_path):
    valid = json.loads(base["manifest"].read_text())
    for shard in valid["shards"]:  # absolute paths: the fuzzed manifest lives in another folder
        shard["path"] = str((base["manifest"].parent / shard["path"]).resolve())

    @FUZZ
    @given(document=_mutations(valid))
    def run(document):
        path = _write(tmp_path / "m.json", json.dumps(_refingerprint(document)).encode())
        _manifest_commands(base, tmp_path, path, "consistent fingerprint")

    run()
    print(f"\nFAULTS fuzz consistent manifests: {_mine('manifest consistent')}")
    assert TRIED["manifest consistent fingerprint (split)"] >= EXAMPLES // 2


def _edited_manifest(base, tmp_path, edit, consistent=True):
    document = json.loads(base["manifest"].read_text())
    for shard in document["shards"]:
        shard["path"] = str((base["manifest"].parent / shard["path"]).resolve())
    edit(document["shards"][0])
    if consistent:
        _refingerprint(document)
    return _write(tmp_path / "m.json", json.dumps(document).encode())


MANIFEST_CRASHES = {
    # (edit of shard #0, fingerprint recomputed?, command) -> crashes today with
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
        "cache-teacher": lambda: _cache_teacher(base, tmp_path, manifest=path),
        "split": lambda: invoke("split", "--manifest", path, "--percent", "50", "--out", tmp_path / "s.json"),
        "cache verify": lambda: invoke("cache", "verify", base["cache"], "--manifest", path),
    }[command]()
    assert_clean_error(result, "m.json")


# ---- splits -------------------------------------------------------------------------------------------


def _resplit(document):
    if isinstance(document, dict) and all(k in document for k in SPLIT_KEYS):
        document["fingerprint"] = fingerprint_json({k: document[k] for k in SPLIT_KEYS})
    return document


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
        result = _train(base, tmp_path, split=_write(tmp_path / "s.json", content))
        check(result, "split file (train)")

    run()
    print(f"\nFAULTS fuzz splits: {_mine('split file')}")
    assert TRIED["split file (train)"] >= EXAMPLES


def test_fuzz_consistent_split_positions(base, tmp_path):
    """A split whose fingerprint matches its (edited) positions: the library must refuse it with a UserError
    (the train command would print it in one line); any other exception is a traceback for the user."""
    from dho_pipeline.errors import UserError
    from dho_pipeline.manifest import load_manifest
    from dho_pipeline.split import load_split

    valid = json.loads(base["split"].read_text())
    manifest = load_manifest(base["manifest"])
    names = [s.name for s in manifest.shards]
    positions = st.lists(st.integers(0, 5), max_size=4, unique=True)
    good = st.fixed_dictionaries({}, optional={n: positions for n in names})

    @FUZZ
    @given(labeled=good, holdout=good)
    def run(labeled, holdout):
        TRIED["consistent split (library)"] = TRIED.get("consistent split (library)", 0) + 1
        document = _resplit({**valid, "labeled": labeled, "holdout": holdout})
        path = _write(tmp_path / "s.json", json.dumps(document).encode())
        try:
            split = load_split(path)
            split.check_manifest(manifest)
            split.labeled_mask(manifest), split.unlabeled_mask(manifest)
        except UserError:
            pass

    run()
    print(f"\nFAULTS fuzz consistent splits (in range): {TRIED['consistent split (library)']}")


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
    result = _train(base, tmp_path, "--max-steps", "1", "--batch-size", "2", student="dho-tiny-student", split=path)
    assert_clean_error(result, "s.json")


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
                results = [_cache_teacher(base, tmp_path, manifest=path),
                           invoke("split", "--manifest", path, "--percent", "50", "--out", tmp_path / "s.json")]
            else:
                results = [_train(base, tmp_path, split=path)]
            for result in results:
                line = check(result, f"{kind}: {name}")
                assert line != "ok" and path.name in line, (name, kind, line)
            tried += 1
    print(f"\nFAULTS huge/empty/misencoded manifest and split files: {tried} tried")
