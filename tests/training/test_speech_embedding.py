"""The pretrained speech-embedding front end rebuilt in PyTorch (training/speech_embedding.py)
against the package's own ONNX graphs under ONNX Runtime, window by window, as openWakeWord runs
them; and the two ways it departs from them on purpose."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

from training import fetch, speech_corpus, speech_embedding
from training.data_cache import DataMissing


@pytest.fixture(scope="module")
def package_sessions() -> tuple[ort.InferenceSession, ort.InferenceSession]:
    return tuple(ort.InferenceSession(speech_embedding.graph(name).SerializeToString())
                 for name in ("melspectrogram.onnx", "embedding_model.onnx"))


@pytest.fixture(scope="module")
def frontend() -> speech_embedding.Frontend:
    return speech_embedding.Frontend().eval()


@pytest.fixture(scope="module")
def clips() -> np.ndarray:
    """Six validation clips (three voices, words and silence), float in [-1, 1)."""
    return speech_corpus.load("val", limit=6)["audio"].astype(np.float32) / 32768.0


def package_embeddings(sessions: tuple[ort.InferenceSession, ort.InferenceSession],
                       clip: np.ndarray) -> np.ndarray:
    """openWakeWord's way: the padded clip's spectrogram alone, x/10 + 2, then every 76-frame window
    8 frames apart through the embedding graph."""
    mel_session, embedding_session = sessions
    pad = int(speech_embedding.PAD_S * speech_embedding.SAMPLE_RATE)
    samples = np.pad(clip * 32768.0, (pad, pad))[None].astype(np.float32)
    mel = mel_session.run(None, {"input": samples})[0][0, 0] / 10 + 2
    starts = range(0, mel.shape[0] - speech_embedding.WINDOW_FRAMES + 1, speech_embedding.WINDOW_STEP)
    windows = np.stack([mel[s:s + speech_embedding.WINDOW_FRAMES] for s in starts])[..., None]
    return embedding_session.run(None, {"input_1": windows})[0].reshape(len(starts), -1)


def test_embeddings_equal_the_package_graphs_window_by_window(package_sessions, frontend, clips):
    with torch.no_grad():
        ours = frontend(torch.from_numpy(clips)).numpy()
    assert ours.shape == (len(clips), speech_embedding.windows(len(clips[0])), speech_embedding.EMBEDDING)
    for clip, mine in zip(clips, ours, strict=True):
        theirs = package_embeddings(package_sessions, clip)
        assert theirs.shape == mine.shape
        # Values run to about 100; what is left is float rounding of a different summation order.
        np.testing.assert_allclose(mine, theirs, atol=1e-3, rtol=1e-4)


def test_a_clips_embeddings_do_not_depend_on_its_batch(package_sessions, frontend, clips):
    quiet = clips[:1] * 0.001  # 60 dB down
    loud = clips[1:2]
    with torch.no_grad():
        alone = frontend(torch.from_numpy(quiet)).numpy()
        batched = frontend(torch.from_numpy(np.concatenate([quiet, loud])))[:1].numpy()
    np.testing.assert_allclose(batched, alone, atol=1e-4)
    # The package's spectrogram graph takes its 80 dB floor over the whole batch, which is why
    # the front end takes it per clip: batched with a loud clip, a quiet clip's spectrogram changes.
    mel_session = package_sessions[0]
    pair = np.concatenate([quiet, loud]).astype(np.float32) * 32768.0
    assert not np.allclose(mel_session.run(None, {"input": pair})[0][0],
                           mel_session.run(None, {"input": pair[:1]})[0][0], atol=1e-3)


def test_a_changed_graph_fails_its_checksum(monkeypatch):
    monkeypatch.setitem(speech_embedding.GRAPHS, "embedding_model.onnx", "0" * 64)
    with pytest.raises(DataMissing, match=r"openwakeword==0\.4\.0"):
        speech_embedding.graph("embedding_model.onnx")
    assert fetch.ARCHIVES[speech_embedding.PACKAGE].filename == "openwakeword-0.4.0-py3-none-any.whl"

