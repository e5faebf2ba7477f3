"""Tests for the fine-tuning input pipeline: TFDS builders, text files and the iterator."""

import gzip
import io
import json
import struct
import tarfile

import numpy as np
import pytest

from experiments.finetune import input_pipeline as ip

# ----------------------------------------------------------------------------------------
# Tiny source files in the real formats.
# ----------------------------------------------------------------------------------------

RT_ROWS = [(i + 1, (-1) ** i * (0.25 + i / 10), f"Sentence {i + 1} about the film, caf\u00e9.")
           for i in range(30)]  # fmt: skip


def _write_rotten_tomatoes(tmp_path):
  text = "".join(f"{i}\t{r}\t{t}\r\n" for i, r, t in RT_ROWS).encode("utf-8")
  path = tmp_path / "hutto_ICWSM_2014.tar.gz"
  with tarfile.open(path, "w:gz") as tar:
    info = tarfile.TarInfo("hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt")
    info.size = len(text)
    tar.addfile(info, io.BytesIO(text))
  return path


def _write_idx(path, array):
  header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim)
  header += struct.pack(f">{array.ndim}I", *array.shape)
  with gzip.open(path, "wb") as f:
    f.write(header + array.astype(np.uint8).tobytes())


def _write_fashion_mnist(tmp_path, n_train=12, n_test=5):
  tmp_path.mkdir()
  rng = np.random.default_rng(0)
  arrays = {}
  for prefix, n in (("train", n_train), ("t10k", n_test)):
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = np.arange(n, dtype=np.uint8) % 10
    _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", images)
    _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", labels)
    arrays[prefix] = images, labels
  return arrays


# ----------------------------------------------------------------------------------------
# TFDS builders, read back through data sources.
# ----------------------------------------------------------------------------------------


def test_rotten_tomatoes_builder(tmp_path):
  source = _write_rotten_tomatoes(tmp_path)
  data_dir = tmp_path / "tfds"
  ip.prepare(ip.RottenTomatoesSentences, data_dir, source=source)
  splits = ip.load_tfds("rotten_tomatoes_sentences", data_dir)
  assert {k: len(v) for k, v in splits.items()} == {"train": 24, "validation": 3, "test": 3}
  seen = {}
  for split in splits.values():
    for i in range(len(split)):
      ex = split[i]
      seen[int(ex["id"])] = ex
  assert sorted(seen) == [i for i, _, _ in RT_ROWS]
  for id_, rating, text in RT_ROWS:
    ex = seen[id_]
    assert ex["text"].decode("utf-8") == text
    assert ex["label"] == int(rating > 0)
    np.testing.assert_allclose(ex["rating"], rating, rtol=1e-6)
  # The split is fixed: a second preparation from the extracted file agrees.
  member = tmp_path / "hutto_ICWSM_2014" / "movieReviewSnippets_GroundTruth.txt"
  with tarfile.open(source) as tar:
    tar.extractall(tmp_path, filter="data")
  ip.prepare(ip.RottenTomatoesSentences, tmp_path / "tfds2", source=member)
  again = ip.load_tfds("rotten_tomatoes_sentences", tmp_path / "tfds2", split="validation")
  ids = lambda s: sorted(int(s[i]["id"]) for i in range(len(s)))  # noqa: E731
  assert ids(again) == ids(splits["validation"])


def test_fashion_mnist_builder(tmp_path):
  arrays = _write_fashion_mnist(tmp_path / "idx")
  data_dir = tmp_path / "tfds"
  builder = ip.prepare(ip.FashionMnistIdx, data_dir, source=tmp_path / "idx")
  assert builder.info.features["label"].num_classes == 10
  for split, prefix in (("train", "train"), ("test", "t10k")):
    source = ip.load_tfds("fashion_mnist_idx", data_dir, split=split)
    images, labels = arrays[prefix]
    assert len(source) == len(labels)
    got = ip.collate([source[i] for i in range(len(source))])
    assert got["image"].dtype == np.uint8 and got["image"].shape == (len(labels), 28, 28, 1)
    # Keys are the IDX row numbers; sort the read order back into file order.
    order = np.argsort([int(np.where((images == im[..., 0]).all((1, 2)))[0][0])
                        for im in got["image"]])  # fmt: skip
    np.testing.assert_array_equal(got["image"][order, ..., 0], images)
    np.testing.assert_array_equal(got["label"][order], labels)
  # The version directory reads back without the builder class too.
  by_dir = ip.load_tfds("", builder.data_dir, split="test")
  assert len(by_dir) == 5


def test_read_idx_rejects_bad_header(tmp_path):
  path = tmp_path / "bad.gz"
  with gzip.open(path, "wb") as f:
    f.write(struct.pack(">BBBBI", 0, 0, 0x08, 1, 5) + b"\0\0")
  with pytest.raises(ValueError, match="header says"):
    ip.read_idx(path)


# ----------------------------------------------------------------------------------------
# CSV and JSONL text-classification files.
# ----------------------------------------------------------------------------------------


def test_csv_with_validation_file(tmp_path):
  train = tmp_path / "train.csv"
  train.write_text('review,sentiment\n"good, very good",pos\nbad,neg\nfine,pos\n')
  val = tmp_path / "val.csv"
  val.write_text("review,sentiment\nawful,neg\n")
  data = ip.load_text_classification(
    train, validation_file=val, text_key="review", label_key="sentiment"
  )
  assert data.classes == ("neg", "pos")
  assert list(data.train.columns["text"]) == ["good, very good", "bad", "fine"]
  assert list(data.train.columns["label"]) == [1, 0, 1]
  assert data.validation[0] == {"text": "awful", "label": 0}
  tsv = tmp_path / "train.tsv"
  tsv.write_text("label\ttext\n2\tone, two\n0\tthree\n")
  data = ip.load_text_classification(tsv, classes=["a", "b", "c"], validation_fraction=0.5)
  pairs = [(ex["text"], int(ex["label"])) for src in (data.train, data.validation)
           for ex in src.__getitems__(range(len(src)))]  # fmt: skip
  assert sorted(pairs) == [("one, two", 2), ("three", 0)]


def test_jsonl_seeded_split_and_int_labels(tmp_path):
  path = tmp_path / "data.jsonl"
  path.write_text("".join(json.dumps({"t": f"x{i}", "y": i % 3}) + "\n" for i in range(20)))
  a = ip.load_text_classification(path, text_key="t", label_key="y", validation_fraction=0.25)
  b = ip.load_text_classification(path, text_key="t", label_key="y", validation_fraction=0.25)
  assert a.classes == ("0", "1", "2") and (len(a.train), len(a.validation)) == (15, 5)
  assert list(a.validation.columns["text"]) == list(b.validation.columns["text"])
  all_texts = set(a.train.columns["text"]) | set(a.validation.columns["text"])
  assert all_texts == {f"x{i}" for i in range(20)}
  for src in (a.train, a.validation):
    for text, label in zip(src.columns["text"], src.columns["label"]):
      assert label == int(text[1:]) % 3
  named = ip.load_text_classification(path, text_key="t", label_key="y", classes=["a", "b", "c"])
  assert named.num_classes == 3


@pytest.mark.parametrize(
  "name, content, kwargs, line, message",
  [
    ("a.csv", "", {}, None, "no records"),
    ("a.csv", "text,label\n", {}, None, "no records"),
    ("a.jsonl", "\n", {}, None, "no records"),
    ("a.csv", "text,lbl\nhi,1\n", {}, 1, "missing column 'label'"),
    ("a.csv", "text,label\nhi,1\nlonely\n", {}, 3, "missing value for column 'label'"),
    ("a.jsonl", '{"text": "a", "label": 0}\n{"text": "b"}\n', {}, 2, "missing field 'label'"),
    ("a.csv", "text,label\nhi,pos\nho,meh\n", {"classes": ["neg", "pos"]}, 3, "'meh'"),
    ("a.jsonl", '{"text": "a", "label": 0}\n{"text": "b", "label": 5}\n',
     {"classes": ["neg", "pos"]}, 2, "label 5 is not one of"),
    ("a.csv", b"text,label\nok,0\nna\xefve,1\n", {}, 3, "not valid UTF-8"),
    ("a.jsonl", b'{"text": "a", "label": 0}\n{"text": "\xff", "label": 1}\n', {}, 2,
     "not valid UTF-8"),
    ("a.jsonl", '{"text": "a", "label": 0}\n{"text": "a", \n', {}, 2, "not valid JSON"),
    ("a.jsonl", '{"text": 3, "label": 0}\n', {}, 1, "not a string"),
  ],
)  # fmt: skip
def test_bad_files_name_file_and_line(tmp_path, name, content, kwargs, line, message):
  path = tmp_path / name
  path.write_bytes(content if isinstance(content, bytes) else content.encode())
  where = f"{path}:{line}:" if line else f"{path}:"
  with pytest.raises(ValueError) as e:
    ip.load_text_classification(path, **kwargs)
  assert str(e.value).startswith(where) and message in str(e.value), str(e.value)


def test_bad_validation_label_names_validation_file(tmp_path):
  train = tmp_path / "t.csv"
  train.write_text("text,label\na,x\nb,y\n")
  val = tmp_path / "v.csv"
  val.write_text("text,label\nc,x\nd,z\n")
  with pytest.raises(ValueError, match=f"^{val}:3: label 'z'"):
    ip.load_text_classification(train, validation_file=val)


# ----------------------------------------------------------------------------------------
# The batch iterator.
# ----------------------------------------------------------------------------------------


def _source(n=23):
  texts = np.asarray([f"t{i}" for i in range(n)], dtype=object)
  return ip.ArraySource({"x": np.arange(n), "text": texts})


def _take(it, k):
  return [next(it)["x"].tolist() for _ in range(k)]


def test_iterator_deterministic_epochs_and_remainder():
  kw = dict(batch_size=5, seed=3, num_epochs=2)
  a = _take(ip.BatchIterator(_source(), **kw), 8)
  assert a == _take(ip.BatchIterator(_source(), **kw), 8)
  assert all(len(b) == 5 for b in a)
  epoch0, epoch1 = sum(a[:4], []), sum(a[4:], [])
  assert len(set(epoch0)) == 20 and epoch0 != epoch1  # 3 of 23 dropped; reshuffled.
  done = ip.BatchIterator(_source(), **kw)
  assert len(list(done)) == 8
  with pytest.raises(StopIteration):
    next(done)
  kept = ip.BatchIterator(_source(), batch_size=5, shuffle=False, drop_remainder=False,
                          num_epochs=1)  # fmt: skip
  batches = [b["x"].tolist() for b in kept]
  assert batches[-1] == [20, 21, 22] and sum(batches, []) == list(range(23))
  assert kept.batches_per_epoch == 5


def test_iterator_resume_matches_uninterrupted():
  kw = dict(batch_size=4, seed=7, drop_remainder=False)
  full = ip.BatchIterator(_source(), **kw)
  expected = _take(full, 15)
  it = ip.BatchIterator(_source(), **kw)
  _take(it, 9)
  state = json.loads(json.dumps(it.get_state()))
  assert set(state) == {"epoch", "index"}
  resumed = ip.BatchIterator(_source(), **kw)
  resumed.set_state(state)
  assert _take(resumed, 6) == expected[9:]


def test_processes_read_disjoint_slices_of_each_global_batch():
  for drop in (True, False):
    kw = dict(batch_size=6, seed=1, drop_remainder=drop, num_epochs=2, process_count=3)
    its = [ip.BatchIterator(_source(), process_index=p, **kw) for p in range(3)]
    reference = ip.BatchIterator(_source(), **{**kw, "process_count": 1})
    for global_batch in reference:
      parts = [next(it) for it in its]
      xs = [p["x"].tolist() for p in parts]
      assert sum(xs, []) == global_batch["x"].tolist()
      assert len(set(sum(xs, []))) == len(global_batch["x"])
      assert all(len(p["text"]) == len(p["x"]) for p in parts)
    for it in its:
      with pytest.raises(StopIteration):
        next(it)


def test_iterator_rejects_bad_arguments():
  with pytest.raises(ValueError, match="divisible"):
    ip.BatchIterator(_source(), batch_size=5, process_count=2)
  with pytest.raises(ValueError, match="no batch"):
    ip.BatchIterator(_source(3), batch_size=5)


# Files that trained on wrong data before: each is refused, naming where the problem starts.
_BASE = "".join(f"t{i},{i % 2}\n" for i in range(30))  # 30 rows, labels 0 / 1 (line 2..31)
_NAMES = "".join(f"t{i},{['neg', 'pos'][i % 2]}\n" for i in range(30))


@pytest.mark.parametrize("name, content, line, message", [
    ("dup.csv", "text,label,text\n" + "a,0,b\n" * 30, 1, "column 'text' appears 2 times"),
    ("dup.csv", "text,label,label\n" + "a,0,1\n" * 30, 1, "column 'label' appears 2 times"),
    ("comma.csv", "text,label\n" + _BASE + "bad, with a comma,1\n", 32,
     "3 fields, the header has 2 (column 3 onward, '1', is extra); a field containing the "
     "delimiter"),
    ("spaces.csv", "text, label\n" + _BASE, 1, "column 2 of the header is ' label', with "
     "spaces around 'label'"),
    ("dupspace.csv", "text,label,label \n" + "a,0,1\n" * 30, 1, "column 'label' appears 2 "
     "times in the header (columns [2, 3])"),
    ("word.csv", "text,label\n" + _BASE + "x,one\n", 32, "'one' is not an integer id"),
    ("float.csv", "text,label\n" + _BASE + "x,1.0\n", 32, "'1.0' is not an integer id"),
    ("space.csv", "text,label\n" + _NAMES + "x, pos\n", 32, "' pos' has spaces around it"),
    ("typo.csv", "text,label\n" + _BASE + "x,100000\n", None, "ids 2..99999 never occur"),
    ("single.csv", "text,label\n" + "t,1\n" * 30, None, "every record has the label '1'"),
    ("once.csv", "text,label\n" + _BASE + "x,2\n", 32, "label '2' occurs only once"),
    ("quote.csv", "text,label\n" + "t,0\n" * 5 + '"open quote,1\n' + _BASE, 7,
     "the record starting on this line is not valid CSV"),
    ("float.jsonl", '{"text": "a", "label": 0}\n{"text": "c", "label": 1.0}\n', 2,
     "label 1.0 is a float"),
])  # fmt: skip
def test_suspicious_files_are_refused_where_the_problem_starts(tmp_path, name, content, line,
                                                               message):
  path = tmp_path / name
  path.write_text(content)
  where = f"{path}:{line}:" if line else f"{path}:"
  with pytest.raises(ValueError) as e:
    ip.load_text_classification(path)
  assert str(e.value).startswith(where) and message in str(e.value), str(e.value)


def test_odd_classes_are_accepted_on_request_and_odd_text_is_read(tmp_path):
  path = tmp_path / "once.csv"
  path.write_text("text,label\n" + _BASE + "x,2\n")
  data = ip.load_text_classification(path, accept_odd_labels=True)
  assert data.classes == ("0", "1", "2")
  huge = tmp_path / "huge.csv"  # a 5 MB field is a field
  huge.write_text('text,label\n"' + "x" * 5_000_000 + '",1\n' + _BASE)
  data = ip.load_text_classification(huge, validation_fraction=0.5)
  texts = set(data.train.columns["text"]) | set(data.validation.columns["text"])
  assert "x" * 5_000_000 in texts and len(texts) == 31
  sep = tmp_path / "sep.jsonl"  # U+2028 inside a JSON string is valid JSON, not a line break
  sep.write_text('{"text": "a\u2028b", "label": 0}\n{"text": "c", "label": 1}\n')
  data = ip.load_text_classification(sep, validation_fraction=0.5)
  assert {"a\u2028b", "c"} == set(data.train.columns["text"]) | set(data.validation.columns["text"])
