"""Captions from labels and measured attributes, and captions read from image folders.

Measurements are checked against hand-built images whose answers are known exactly (float64,
rtol 1e-12); captions against the measurements they came from.
"""

import json
import re

import numpy as np
import pytest

from jaxdiff.data import captions

SIZE = 28
ATTRIBUTES = ("brightness", "fill", "width", "height")


def rectangle(top, left, height, width, value=255, channels=1, size=SIZE):
  """uint8 [size, size, channels]: a rectangle of ``value`` on black."""
  image = np.zeros((size, size, channels), np.uint8)
  image[top : top + height, left : left + width] = value
  return image


def random_images(n, seed=0):
  """uint8 [n, 28, 28, 1]: rectangles of random size, place and grey level on black."""
  rng = np.random.default_rng(seed)
  images = []
  for _ in range(n):
    h, w = rng.integers(4, SIZE + 1, 2)
    top, left = rng.integers(0, SIZE - h + 1), rng.integers(0, SIZE - w + 1)
    images.append(rectangle(top, left, h, w, value=rng.integers(40, 256)))
  return np.stack(images)


def test_supported_datasets_and_synonyms():
  assert captions.supported_datasets() == ("fashion_mnist", "mnist")
  for dataset in captions.supported_datasets():
    names = captions.synonyms(dataset)
    assert len(names) == 10
    assert all(2 <= len(n) <= 4 for n in names)
    everything = [n for group in names for n in group]
    assert len(everything) == len(set(everything)), "a synonym shared by two classes"
  assert captions.synonyms("fashion_mnist")[9][0] == "ankle boot"
  assert captions.synonyms("mnist")[7] == ("seven", "7", "digit 7")
  with pytest.raises(ValueError, match=r"'cifar10'.*fashion_mnist, mnist"):
    captions.synonyms("cifar10")


@pytest.mark.parametrize("channels", [1, 3])
def test_measure_rectangle(channels):
  # 10 rows x 14 columns at (9, 7): white, then mid grey.
  images = np.stack(
    [rectangle(9, 7, 10, 14, 255, channels), rectangle(0, 0, SIZE, 3, 128, channels)]
  )
  got = captions.measure(images)
  want = {
    "brightness": [1.0, 128 / 255],
    "fill": [140 / 784, 84 / 784],
    "width": [14 / 28, 3 / 28],
    "height": [10 / 28, 1.0],
  }
  for name in ATTRIBUTES:
    assert got[name].dtype == np.float64
    np.testing.assert_allclose(got[name], want[name], rtol=1e-12, err_msg=name)


def test_measure_luminance_and_foreground_level():
  images = np.zeros((4, SIZE, SIZE, 3), np.uint8)
  images[0, :2, :2] = (255, 0, 0)  # luminance 0.299
  images[1, :2, :2] = (0, 0, 255)  # 0.114: just above the foreground level
  images[2, :2, :2] = (25, 25, 25)  # 25/255 = 0.098: background
  images[3, :2, :2] = (26, 26, 26)  # 26/255 = 0.102: foreground
  got = captions.measure(images)
  np.testing.assert_allclose(got["brightness"], [0.299, 0.114, 0.0, 26 / 255], rtol=1e-12)
  np.testing.assert_allclose(got["fill"], [4 / 784, 4 / 784, 0.0, 4 / 784], rtol=1e-12)


def test_measure_blank_image_and_bounding_box():
  images = np.zeros((2, SIZE, SIZE, 1), np.uint8)
  images[1, 0, 0] = images[1, -1, -1] = 255  # two corner pixels span the whole frame
  got = captions.measure(images)
  for name in ATTRIBUTES:
    assert np.all(np.isfinite(got[name]))
    assert got[name][0] == 0.0, name  # documented: a blank image measures 0 everywhere
  np.testing.assert_allclose([got[n][1] for n in ATTRIBUTES], [1, 2 / 784, 1, 1], rtol=1e-12)


def test_measure_in_chunks_matches_one_at_a_time(monkeypatch):
  images = random_images(10)
  whole = captions.measure(images)
  monkeypatch.setattr(captions, "_CHUNK", 3)
  chunked = captions.measure(images)
  single = [captions.measure(images[i : i + 1]) for i in range(10)]
  for name in ATTRIBUTES:
    np.testing.assert_array_equal(chunked[name], whole[name])
    np.testing.assert_array_equal([s[name][0] for s in single], whole[name])


@pytest.mark.parametrize(
  "images", [np.zeros((2, 8, 8, 1), np.float32), np.zeros((2, 8, 8), np.uint8)], ids=str
)
def test_measure_rejects_other_arrays(images):
  with pytest.raises(ValueError, match=r"uint8 \[N, H, W, C\]"):
    captions.measure(images)


def test_thresholds_are_tertiles():
  images = np.concatenate([random_images(60), np.zeros((5, SIZE, SIZE, 1), np.uint8)])
  values = captions.measure(images)
  cuts = captions.thresholds(images)
  assert set(cuts) == set(captions.ATTRIBUTE_WORDS)
  for name in captions.ATTRIBUTE_WORDS:
    want = np.quantile(values[name][:60], [1 / 3, 2 / 3])  # blank images left out
    np.testing.assert_allclose(cuts[name], want[None], rtol=1e-12)
  # Continuous values: about a third of the images below the low cut, a third above the high.
  words = captions.attribute_words(values, cuts)[:60]
  for name, (low, high) in captions.ATTRIBUTE_WORDS.items():
    named = [w.get(name) for w in words]
    assert 17 <= named.count(low) <= 20 and 17 <= named.count(high) <= 20, (name, named)


def test_thresholds_per_class():
  images = random_images(60)
  labels = np.arange(60) % 2
  values = captions.measure(images)
  cuts = captions.thresholds(images, labels, num_classes=3)
  everyone = captions.thresholds(images)
  for name in captions.ATTRIBUTE_WORDS:
    assert cuts[name].shape == (3, 2)
    for c in (0, 1):
      want = np.quantile(values[name][labels == c], [1 / 3, 2 / 3])
      np.testing.assert_allclose(cuts[name][c], want, rtol=1e-12)
    np.testing.assert_allclose(cuts[name][2], everyone[name][0], rtol=1e-12)  # class absent
  with pytest.raises(ValueError, match="every image is blank"):
    captions.thresholds(np.zeros((3, 8, 8, 1), np.uint8))
  with pytest.raises(ValueError, match=r"labels must lie in \[0, 1\)"):
    captions.thresholds(images, labels, num_classes=1)


def test_attribute_words():
  values = {
    "brightness": np.array([0.1, 0.5, 0.9, 0.3, 0.0]),
    "fill": np.array([0.2, 0.2, 0.2, 0.2, 0.0]),
    "width": np.array([0.2, 0.6, 0.8, 0.7, 0.0]),
  }
  cuts = {"brightness": [[0.3, 0.6]], "fill": [[0.2, 0.2]], "width": [[0.4, 0.7]]}
  words = captions.attribute_words(values, cuts)
  # A value equal to a cut gets no word; the blank image (fill 0) gets none.
  assert words == [
    {"brightness": "dark", "width": "narrow"},
    {},
    {"brightness": "light", "width": "wide"},
    {},
    {},
  ]
  per_class = {k: np.array([v[0], [0.0, 0.05]]) for k, v in cuts.items()}
  words = captions.attribute_words(values, per_class, labels=[1, 0, 0, 0, 0])
  assert words[0] == {"brightness": "light", "fill": "large", "width": "wide"}
  with pytest.raises(ValueError, match="need the images' labels"):
    captions.attribute_words(values, per_class)
  with pytest.raises(ValueError, match=r"\[K, 2\] rows of \(low <= high\)"):
    captions.attribute_words(values, {**cuts, "width": [[0.7, 0.4]]})
  with pytest.raises(ValueError, match="with one K"):
    captions.attribute_words(values, {**cuts, "width": [0.4, 0.7]})
  with pytest.raises(ValueError, match="fill, width, brightness"):
    captions.attribute_words(values, {"fill": cuts["fill"]})


@pytest.mark.parametrize("dataset", ["fashion_mnist", "mnist"])
def test_captions_are_fixed_by_seed_and_index(dataset):
  images = random_images(40)
  labels = np.arange(40) % 10
  cuts = captions.thresholds(images, labels, num_classes=10)
  whole = captions.make_captions(dataset, labels, images, seed=3, thresholds=cuts)
  assert whole == captions.make_captions(dataset, labels, images, seed=3, thresholds=cuts)
  assert whole != captions.make_captions(dataset, labels, images, seed=4, thresholds=cuts)
  # The same examples in another batch (reversed, other company) get the same captions.
  part = np.array([31, 7, 12, 0])
  alone = captions.make_captions(
    dataset, labels[part], images[part], seed=3, thresholds=cuts, indices=part
  )
  assert alone == [whole[i] for i in part]


@pytest.mark.parametrize("dataset", ["fashion_mnist", "mnist"])
def test_captions_name_the_class_and_measured_attributes(dataset):
  images = random_images(300, seed=1)
  labels = np.random.default_rng(2).integers(0, 10, 300)
  cuts = captions.thresholds(images, labels, num_classes=10)
  words = captions.attribute_words(captions.measure(images), cuts, labels)
  texts = captions.make_captions(dataset, labels, images, seed=0, thresholds=cuts)
  counts = {0: 0, 1: 0, 2: 0}
  for text, label, measured in zip(texts, labels, words, strict=True):
    assert captions.parse_label(dataset, text) == label, text
    named = captions.parse_attributes(text)
    assert named.items() <= measured.items(), (text, measured)
    counts[len(named)] += 1
    assert len(text.split()) < 20
  assert min(counts.values()) >= 20, counts  # sometimes none, sometimes one, sometimes two
  every_word = {w for text in texts for w in captions.parse_attributes(text).values()}
  assert every_word == {w for pair in captions.ATTRIBUTE_WORDS.values() for w in pair}
  openings = {text.split()[0] for text in texts}
  assert {"a", "an"} <= openings and len({t for t in texts if " that " in t}) > 5


def test_captions_without_images_name_only_the_class():
  texts = captions.make_captions("fashion_mnist", list(range(10)) * 5, None, seed=0)
  assert all(captions.parse_attributes(t) == {} for t in texts)
  assert [captions.parse_label("fashion_mnist", t) for t in texts] == list(range(10)) * 5
  with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\), not \[0, 10\]"):
    captions.make_captions("mnist", [0, 10], None, seed=0)
  with pytest.raises(ValueError, match="2 images but 3 labels"):
    captions.make_captions("mnist", [0, 1, 2], random_images(2), seed=0)
  with pytest.raises(ValueError, match="'svhn'"):
    captions.make_captions("svhn", [0], None, seed=0)


@pytest.mark.parametrize(
  "phrase, want",
  [
    ("ankle boot", "an"),
    ("pullover", "a"),
    ("8", "an"),
    ("eight", "an"),
    ("one", "a"),
    ("1", "a"),
    ("open-toed shoe", "an"),
    ("dark, wide trousers", ""),
    ("pants", ""),
    ("large, dark coat", "a"),
  ],
)
def test_article(phrase, want):
  assert captions.article(phrase) == want


@pytest.mark.parametrize("dataset", ["fashion_mnist", "mnist"])
def test_articles_in_captions(dataset):
  labels = np.arange(400) % 10
  texts = captions.make_captions(dataset, labels, random_images(400, seed=5), seed=1)
  vowel_sound = re.compile(r"^(?:[aeiou8]|eight)(?!ne)")  # "one" sounds like "won"
  for text in texts:
    for art, word in re.findall(r"\b(a|an) ([\w-]+)", text):
      assert (art == "an") == bool(vowel_sound.match(word)), text
    assert not re.search(r"\b(a|an) (\w+, )*(\w+ )?(trousers|pants)\b", text), text
    assert not re.search(r"\b(trousers|pants) that is\b", text), text


def test_parse_attributes_and_label():
  assert captions.parse_attributes("a dark, wide pullover") == {
    "brightness": "dark",
    "width": "wide",
  }
  assert captions.parse_attributes("A BRIGHT broad coat, little") == {
    "brightness": "light",
    "width": "wide",
    "fill": "small",
  }
  assert captions.parse_attributes("a lightweight, widescreen bag") == {}
  with pytest.raises(ValueError, match="'dark' and 'light' for brightness"):
    captions.parse_attributes("a dark coat with light sleeves")
  assert captions.parse_label("fashion_mnist", "a photo of a t-shirt") == 0
  assert captions.parse_label("fashion_mnist", "a button-up shirt") == 6
  assert captions.parse_label("fashion_mnist", "an Ankle Boot") == 9
  assert captions.parse_label("fashion_mnist", "a laptop") is None
  assert captions.parse_label("mnist", "an image of an 8") == 8
  with pytest.raises(ValueError, match=r"several fashion_mnist classes: \[6, 8\]"):
    captions.parse_label("fashion_mnist", "a shirt in a bag")


# Image folders.

IMAGES = ["a/001.png", "a/002.png", "b/003.jpg"]


def write_jsonl(root, lines):
  (root / "captions.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")


def entry(file, caption):
  return json.dumps({"file": file, "caption": caption})


def test_folder_captions_from_jsonl(tmp_path):
  write_jsonl(
    tmp_path,
    [
      entry("b/003.jpg", "a red\n  car"),
      "",
      entry("./a/001.png", "a cat"),
      entry("a/002.png", "é"),
    ],
  )
  (tmp_path / "a").mkdir()
  (tmp_path / "a" / "001.txt").write_text("ignored: the jsonl comes first")
  assert captions.folder_captions(tmp_path, IMAGES) == ["a cat", "é", "a red car"]
  assert captions.folder_captions(str(tmp_path), IMAGES[:1]) == ["a cat"]


def test_folder_captions_from_txt(tmp_path):
  for i, path in enumerate(IMAGES):
    (tmp_path / path).parent.mkdir(exist_ok=True)
    (tmp_path / path).with_suffix(".txt").write_text(f" caption\n{i} \n", encoding="utf-8")
  assert captions.folder_captions(tmp_path, IMAGES) == ["caption 0", "caption 1", "caption 2"]


def test_folder_without_captions(tmp_path):
  (tmp_path / "README.txt").write_text("not a caption of any image")
  assert captions.folder_captions(tmp_path, IMAGES) is None


@pytest.mark.parametrize(
  "lines, message",
  [
    ([entry("a/001.png", "x"), entry("a/002.png", "y")], r"b/003\.jpg: no caption in .*1 of 3"),
    ([entry(p, " \n ") for p in IMAGES], r"captions\.jsonl:1: empty caption"),
    (["{not json"], r"captions\.jsonl:1: '\{not json' is not a JSON object"),
    ([entry("a/001.png", "x"), '{"file": "a/002.png"}'], r"captions\.jsonl:2: .* is not a JSON"),
    (['["a/001.png", "x"]'], r"captions\.jsonl:1: .* with string 'file' and 'caption'"),
    ([entry("a/001.png", "x"), entry("a/./001.png", "y")], r":2: a second caption for 'a/001"),
  ],
)
def test_folder_captions_jsonl_errors(tmp_path, lines, message):
  write_jsonl(tmp_path, lines)
  with pytest.raises(ValueError, match=message) as error:
    captions.folder_captions(tmp_path, IMAGES)
  assert "\n" not in str(error.value)


def test_folder_captions_txt_errors(tmp_path):
  (tmp_path / "a").mkdir()
  (tmp_path / "a" / "001.txt").write_text("a cat")
  with pytest.raises(ValueError, match=r"a/002\.png: no caption in the \.txt files .*2 of 3"):
    captions.folder_captions(tmp_path, IMAGES)
  (tmp_path / "a" / "001.txt").write_text("  \n")
  with pytest.raises(ValueError, match=r"a/001\.txt: empty caption; give every image"):
    captions.folder_captions(tmp_path, IMAGES[:1])
