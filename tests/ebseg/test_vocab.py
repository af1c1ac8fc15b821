"""Vocabularies: shipped benchmark data, the seen/unseen rule, constructors, file formats and ids."""

from __future__ import annotations

import json
from pathlib import Path

import fsspec
import pytest

from ebseg.seen import default_synonyms, is_seen, seen_flags
from ebseg.vocab import BENCHMARKS, Vocabulary

REFERENCE = Path(__file__).resolve().parents[2] / ".." / "shared" / "reference" / "vocabularies"
REFERENCE_FILES = {
    "coco171": "coco_stuff_171",
    "ade150": "ade20k_150",
    "ade847": "ade20k_847",
    "pc59": "pascal_context_59",
    "pc459": "pascal_context_459",
    "voc20": "voc_20",
}
SHIPPED = Path(__file__).resolve().parents[2] / "ebseg" / "vocabularies"

# (classes, seen) per benchmark, as the facts sheet states (section 7 item 3).
COUNTS = {
    "coco171": (171, 171),
    "voc20": (20, 20),
    "pc59": (59, 51),
    "pc459": (459, 94),
    "ade150": (150, 67),
    "ade847": (847, 115),
}


# ------------------------------------------------------------------------------------------ shipped data


@pytest.mark.parametrize("short", COUNTS)
def test_benchmark_counts(short):
    vocab = Vocabulary.from_benchmark(short)
    classes, seen = COUNTS[short]
    assert len(vocab) == len(vocab.names) == len(vocab.synonyms) == len(vocab.seen) == classes
    assert sum(vocab.seen) == seen
    assert vocab.name == short
    assert vocab.dataset == BENCHMARKS[short]


def test_pc59_unseen_classes():
    vocab = Vocabulary.from_benchmark("pc59")
    unseen = [s for s, f in zip(vocab.synonyms, vocab.seen) if not f]
    # The facts sheet names them by their first synonym; the prompt names differ for four of them.
    assert [s[0] for s in unseen] == [
        "bag", "bedclothes", "computer case", "lamp", "street", "sidewalk", "sign", "wood piece",
    ]  # fmt: skip
    assert [n for n, f in zip(vocab.names, vocab.seen) if not f] == [
        "bag", "bedclothes", "computer", "light", "road", "sidewalk", "sign", "wood",
    ]  # fmt: skip


@pytest.mark.parametrize("short", COUNTS)
def test_seen_rule_reproduces_shipped_flags(short):
    vocab = Vocabulary.from_benchmark(short)
    assert seen_flags(vocab.synonyms) == vocab.seen
    # The lenient comparison used for custom names agrees on every benchmark.
    assert seen_flags(vocab.synonyms, normalize=True) == vocab.seen


def test_coco_synonyms_are_byte_exact():
    coco = Vocabulary.from_benchmark("coco171")
    wall_wood = coco.synonyms[coco.names.index("wall-wood")]
    assert " wall wood" in wall_wood  # leading space kept, as in the reference's class_names file
    assert sum(len(s) for s in coco.synonyms) == 328
    assert is_seen([" wall wood"])
    assert not is_seen(["wall wood"])  # exact rule: no stripping
    assert is_seen(["wall wood"], normalize=True)


@pytest.mark.parametrize("short", COUNTS)
def test_shipped_data_matches_reference(short):
    ref_path = REFERENCE / f"{REFERENCE_FILES[short]}.json"
    if not ref_path.is_file():
        pytest.skip(
            f"reference vocabularies not found at {REFERENCE} (only present in CI / the project checkout)"
        )
    ref = json.loads(ref_path.read_text(encoding="utf-8"))
    vocab = Vocabulary.from_benchmark(short)
    assert [c["id"] for c in ref["classes"]] == list(range(len(vocab)))
    assert vocab.names == tuple(c["prompt_name"] for c in ref["classes"])
    assert vocab.synonyms == tuple(tuple(c["synonyms"]) for c in ref["classes"])
    assert vocab.seen == tuple(c["seen"] for c in ref["classes"])
    assert vocab.ignore_label == ref["ignore_label"]
    assert vocab.dataset == ref["source_dataset_key"]


@pytest.mark.parametrize("short", COUNTS)
def test_shipped_file_layout(short):
    text = (SHIPPED / f"{short}.json").read_text(encoding="utf-8")
    data = json.loads(text)
    assert data["format"] == "ebseg-vocabulary"
    assert data["version"] == 1
    assert Vocabulary.from_benchmark(short).to_json() == text


@pytest.mark.parametrize(
    ("spelling", "short"),
    [
        ("ade150", "ade150"),
        ("ADE150", "ade150"),
        ("ade20k_sem_seg_val", "ade150"),
        ("ade20k_full_sem_seg_val", "ade847"),
        ("voc_sem_seg_val", "voc20"),
        ("pcontext_sem_seg_val", "pc59"),
        ("PContext_Full_Sem_Seg_Val", "pc459"),
        ("coco_2017_train_stuff_sem_seg", "coco171"),
        ("coco_2017_test_stuff_sem_seg", "coco171"),
        (" pc59 ", "pc59"),
    ],
)
def test_from_benchmark_spellings(spelling, short):
    assert Vocabulary.from_benchmark(spelling).name == short


def test_from_benchmark_unknown():
    with pytest.raises(ValueError, match=r"unknown benchmark 'ade151'.*ade150.*voc20"):
        Vocabulary.from_benchmark("ade151")


def test_benchmark_ignore_labels():
    assert Vocabulary.from_benchmark("ade847").ignore_label == 65535
    assert Vocabulary.from_benchmark("pc459").ignore_label == 65535
    assert Vocabulary.from_benchmark("ade150").ignore_label == 255


# --------------------------------------------------------------------------------------- custom vocabularies


def test_custom_list_end_to_end():
    vocab = Vocabulary(["cat", "Dog ", "spaceship", "building, edifice"])
    assert vocab.names == ("cat", "Dog", "spaceship", "building, edifice")
    assert vocab.synonyms == (
        ("cat",),
        ("Dog",),
        ("spaceship",),
        ("building", "edifice", "building, edifice"),
    )
    assert vocab.seen == (True, True, False, True)  # "Dog" matches "dog" after lower-casing
    assert vocab.name is None
    assert vocab.ignore_label == 255
    assert vocab.id.startswith("custom-")
    assert len(vocab) == 4
    assert Vocabulary.from_dict(json.loads(json.dumps(vocab.to_dict()))) == vocab
    assert "classes=4" in repr(vocab)


def test_custom_explicit_fields():
    vocab = Vocabulary(("sofa",), synonyms=[["sofa", "couch"]], seen=[False], name="mine", ignore_label=7)
    assert vocab.synonyms == (("sofa", "couch"),)
    assert vocab.seen == (False,)  # explicit flags win over the rule
    assert vocab.id.startswith("mine-")


def test_large_custom_vocabulary_moves_ignore_label():
    vocab = Vocabulary([f"thing {i}" for i in range(300)])
    assert vocab.ignore_label == 65535


def test_default_synonyms():
    assert default_synonyms("cat") == ("cat",)
    assert default_synonyms("road, route") == ("road", "route", "road, route")
    assert default_synonyms("a, a") == ("a", "a, a")


def test_is_seen_rejects_bare_string():
    with pytest.raises(TypeError, match="list of synonyms"):
        is_seen("cat")


# -------------------------------------------------------------------------------------------- file formats


def test_text_file(tmp_path):
    path = tmp_path / "classes.txt"
    path.write_text("# my classes\ncat\n\n  Sofa : couch, settee \nroad, route\n", encoding="utf-8")
    vocab = Vocabulary.from_file(path)
    assert vocab.names == ("cat", "Sofa", "road, route")
    assert vocab.synonyms == (("cat",), ("Sofa", "couch", "settee"), ("road", "route", "road, route"))
    assert vocab.seen == (True, True, True)  # "couch" is a COCO synonym; "road" too
    assert vocab.name == "classes"


def test_reference_class_names_style(tmp_path):
    # The reference's class_names/*.txt layout reproduces the shipped synonyms byte for byte.
    coco = Vocabulary.from_benchmark("coco171")
    lines = [f"{i}:{','.join(s)}" for i, s in enumerate(coco.synonyms)]
    path = tmp_path / "coco.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    vocab = Vocabulary.from_file(path)
    assert vocab.synonyms == coco.synonyms
    assert vocab.names == tuple(s[0].strip() for s in coco.synonyms)
    assert all(vocab.seen)


def test_reference_style_ids_checked(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_text("0:cat\n2:dog\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad.txt:2: class id 2, expected 1"):
        Vocabulary.from_file(path)
    path.write_text("0:cat\ndog\n", encoding="utf-8")
    with pytest.raises(ValueError, match="mixes"):
        Vocabulary.from_file(path)


def test_json_files(tmp_path):
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps(["cat", "spaceship"]), encoding="utf-8")
    vocab = Vocabulary.from_file(plain)
    assert vocab.names == ("cat", "spaceship")
    assert vocab.seen == (True, False)
    assert vocab.name == "plain"

    ade = Vocabulary.from_benchmark("ade150")
    ours = tmp_path / "copy.json"
    ours.write_text(ade.to_json(), encoding="utf-8")
    assert Vocabulary.from_file(ours) == ade

    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps({"classes": [{"name": "cat"}, {"name": "alien", "synonyms": ["et"]}]}))
    vocab = Vocabulary.from_file(partial)
    assert vocab.synonyms == (("cat",), ("et",))
    assert vocab.seen == (True, False)
    assert vocab.name == "partial"


def test_fsspec_uri():
    fs = fsspec.filesystem("memory")
    fs.pipe("/ebseg-test/vocab.txt", b"cat\ndog\nspaceship\n")
    fs.pipe("/ebseg-test/vocab.json", json.dumps(Vocabulary.from_benchmark("voc20").to_dict()).encode())
    try:
        assert Vocabulary.from_file("memory://ebseg-test/vocab.txt").names == ("cat", "dog", "spaceship")
        assert Vocabulary.parse("memory://ebseg-test/vocab.txt").seen == (True, True, False)
        assert Vocabulary.from_file("memory://ebseg-test/vocab.json") == Vocabulary.from_benchmark("voc20")
    finally:
        fs.rm("/ebseg-test", recursive=True)


# ------------------------------------------------------------------------------------------------- parse


def test_parse(tmp_path):
    assert Vocabulary.parse("ade150") == Vocabulary.from_benchmark("ade150")
    assert Vocabulary.parse("voc_sem_seg_val").name == "voc20"
    assert Vocabulary.parse("cat, dog,tree").names == ("cat", "dog", "tree")
    assert Vocabulary.parse("cat,").names == ("cat",)
    path = tmp_path / "v.txt"
    path.write_text("cat\n", encoding="utf-8")
    assert Vocabulary.parse(str(path)).names == ("cat",)


@pytest.mark.parametrize("spec", ["ade15", "missing.txt", "cat"])
def test_parse_rejects_unknown(spec):
    with pytest.raises(ValueError, match="not a benchmark"):
        Vocabulary.parse(spec)


# ---------------------------------------------------------------------------------------------------- ids


def test_id_is_stable_and_content_based():
    ade = Vocabulary.from_benchmark("ade150")
    assert ade.id == "ade150-9ce50cf339f7"  # changes only if the shipped names or flags change
    assert Vocabulary.from_dict(ade.to_dict()).id == ade.id
    assert Vocabulary(["cat", "dog"]).id == Vocabulary(["cat", "dog"]).id
    assert Vocabulary(["cat", "dog"]).id != Vocabulary(["dog", "cat"]).id
    assert Vocabulary(["cat", "dog"]).id != Vocabulary(["cat", "dog"], seen=[True, False]).id
    # Synonyms matter only through the flags they produce.
    assert Vocabulary(["cat"], synonyms=[["cat", "kitty"]]).id == Vocabulary(["cat"]).id
    assert Vocabulary(["cat"], name="my pets/v1").id.startswith("my-pets-v1-")
    assert len({Vocabulary.from_benchmark(s).id for s in COUNTS}) == len(COUNTS)


# -------------------------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"names": []}, ValueError, "empty vocabulary"),
        ({"names": ["cat", "  "]}, ValueError, r"class 1: empty class name"),
        ({"names": ["cat", "dog", "cat "]}, ValueError, r"duplicate class name 'cat' \(classes 0 and 2\)"),
        ({"names": ["cat", 3]}, ValueError, "class 1: name must be a string"),
        ({"names": "cat"}, TypeError, "not the string 'cat'"),
        ({"names": ["cat"], "synonyms": [["cat"], ["dog"]]}, ValueError, "2 synonym lists for 1 classes"),
        ({"names": ["cat"], "synonyms": ["cat"]}, ValueError, "class 'cat': synonyms must be a list"),
        ({"names": ["cat"], "synonyms": [[]]}, ValueError, "class 'cat' has no synonyms"),
        ({"names": ["cat"], "seen": [True, False]}, ValueError, "2 seen flags for 1 classes"),
        ({"names": ["cat"], "seen": ["yes"]}, ValueError, "class 'cat': seen flag must be a bool"),
        ({"names": ["cat"], "name": 3}, ValueError, "name must be a string or None"),
        ({"names": ["cat", "dog"], "ignore_label": 1}, ValueError, "ignore_label 1 is the id of class 'dog'"),
    ],
)
def test_bad_constructor_inputs(kwargs, error, message):
    with pytest.raises(error, match=message):
        Vocabulary(**kwargs)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"format": "other", "classes": []}, "not an ebseg-vocabulary document"),
        ({"version": 2, "classes": [{"name": "cat"}]}, "unsupported ebseg-vocabulary version 2"),
        ({"classes": [{"name": "cat"}], "colour": 1}, r"unknown keys \['colour'\]"),
        ({"classes": [{"name": "cat", "prompt": "x"}]}, r"class 0 \('cat'\): unknown keys \['prompt'\]"),
        ({"classes": [{"name": "cat", "seen": True}, {"name": "dog"}]}, "class 1 lacks it"),
        ({"classes": ["cat"]}, "class 0 must be an object with a 'name'"),
        ({"name": "x"}, "needs a 'classes' list"),
        ({"classes": []}, "empty vocabulary"),
    ],
)
def test_bad_dicts(data, message):
    with pytest.raises(ValueError, match=message):
        Vocabulary.from_dict(data)


def test_bad_files(tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match=r"broken\.json: not valid JSON"):
        Vocabulary.from_file(broken)
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing here\n\n", encoding="utf-8")
    with pytest.raises(ValueError, match="empty vocabulary"):
        Vocabulary.from_file(empty)
    with pytest.raises(FileNotFoundError):
        Vocabulary.from_file(tmp_path / "absent.txt")
