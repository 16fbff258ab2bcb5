"""`python -m training fashion-mnist` and `python -m training mnist`: the served image classifiers.

Reads top to bottom: data (verified sources, a fixed split: `training/image_data.py`) → models
(every graph takes uint8 pixels [N, 1, 28, 28] and scales them itself) → training loop (AdamW +
one-cycle, augmentation on the batch) → export to ONNX, parity, evaluation of the served graph
through the service's image codec → model card, config.toml and the model-zoo rows of the
comparison architectures.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from service.codecs.image import to_pixels
from service.core.model_config import Batching, ImagePreprocessing, ModelConfig, TensorSpec
from training import report, zoo
from training.data_cache import keep_fp32_graph
from training.export import WithProbabilities, check_parity, cpu_session, export, onnx_predict
from training.image_data import ImageData, load_digits, load_fashion, mnist_style, thumbnail
from training.loop import fit
from training.nets import conv_bn, parameter_count
from training.quantize import quantize_static_int8

# -------------------------------------------------------------------------------------------- models

class Pixels(nn.Module):
    """uint8 pixels → normalised floats, inside the graph so serving cannot forget it."""

    def __init__(self, mean: float, std: float) -> None:
        super().__init__()
        self.mean, self.std = mean, std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() / 255.0 - self.mean) / self.std


class CNN(nn.Module):
    """Three conv stages (28→14→7→3 pixels) with BatchNorm, then a dropout MLP head."""

    summary = ("conv3×3(32)-BN-ReLU-maxpool, [conv3×3(64)-BN-ReLU]×2-maxpool, [conv3×3(128)-BN-ReLU]×2-"
               "maxpool, dropout 0.25, FC 1152→256-ReLU, dropout 0.25, FC 256→10")

    def __init__(self, pixels: Pixels, dropout: float = 0.25) -> None:
        super().__init__()
        self.pixels = pixels
        self.features = nn.Sequential(
            *conv_bn(1, 32), nn.MaxPool2d(2),
            *conv_bn(32, 64), *conv_bn(64, 64), nn.MaxPool2d(2),
            *conv_bn(64, 128), *conv_bn(128, 128), nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(
            nn.Flatten(), nn.Dropout(dropout), nn.Linear(128 * 9, 256), nn.ReLU(inplace=True),
            nn.Dropout(dropout), nn.Linear(256, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(self.pixels(x)))


class MLP(nn.Module):
    """The multilayer perceptrons of the Keras examples: Flatten → Dense(relu) [→ Dropout] → Dense."""

    def __init__(self, pixels: Pixels, hidden: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.pixels = pixels
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(784, hidden), nn.ReLU(), nn.Dropout(dropout),
                                 nn.Linear(hidden, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.pixels(x))


class RowGRU(nn.Module):
    """Reads the image top to bottom as 28 steps of 28-pixel rows; the last state classifies."""

    def __init__(self, pixels: Pixels, hidden: int = 128) -> None:
        super().__init__()
        self.pixels = pixels
        self.gru = nn.GRU(28, hidden, batch_first=True)
        self.out = nn.Linear(hidden, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = self.pixels(x).flatten(1, 2)  # [N, 1, 28, 28] → [N, 28 rows, 28 pixels]
        _, last = self.gru(rows)
        return self.out(last[0])


# ------------------------------------------------------------------------------------------ training

@dataclass(frozen=True)
class Recipe:
    epochs: int
    lr: float  # peak of the one-cycle schedule
    batch: int = 128
    weight_decay: float = 5e-4
    label_smoothing: float = 0.0
    augment: bool = True
    bf16: bool = False  # bfloat16 autocast for the convolutions (fast on AVX-512 CPUs); eval stays FP32
    ema: float = 0.0  # the weights' moving average per step (training.loop.fit); 0: off


@dataclass(frozen=True)
class Augment:
    """Random affine jitter applied to each training batch (and horizontal flips for clothes); for
    digits optionally elastic distortion, stroke thickness, proportions and blur, as other writers,
    pens and scanners vary."""

    shift: float  # pixels
    rotate: float = 0.0  # degrees
    scale: float = 0.0  # ± fraction
    flip: bool = False
    elastic: float = 0.0  # largest displacement of a smooth random field, in pixels
    thicken: float = 0.0  # share of images whose strokes are dilated by one pixel (3×3 max)
    thin: float = 0.0  # share of the others whose strokes are eroded by one pixel (3×3 min)
    aspect: float = 0.0  # widths scaled by a factor log-uniform in [1 / (1 + aspect), 1 + aspect]
    blur: float = 0.0  # share of images blurred by a Gaussian, then stretched back to a peak of 255
    blur_sigma: tuple[float, float] = (0.6, 1.4)  # the Gaussian's standard deviation, uniform, pixels
    lowres: float = 0.0  # share of images redrawn from an 8×8 thumbnail of their ink (a coarse scan)

    def __call__(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        if self.lowres:
            x = self._lowres(x, gen)
        if self.thicken or self.thin:
            x = self._thickness(x, gen)
        warp = self.rotate or self.scale or self.elastic or self.aspect
        x = self._warp(x, gen) if warp else self._crop(x, gen)
        return self._blur(x, gen) if self.blur else x

    def _warp(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        n = len(x)

        def uniform(lo: float, hi: float) -> torch.Tensor:
            return lo + (hi - lo) * torch.rand(n, generator=gen)

        angle = uniform(-self.rotate, self.rotate) * math.pi / 180
        scale = 1 + uniform(-self.scale, self.scale)
        cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
        tx, ty = (uniform(-self.shift, self.shift) * 2 / 28 for _ in range(2))  # one pixel is 2/28
        mirror = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0) if self.flip else torch.ones(n)
        theta = torch.stack([torch.stack([cos * mirror, -sin, tx], 1),
                             torch.stack([sin * mirror, cos, ty], 1)], 1)
        if self.aspect:  # the output's x axis stretched by `wide`: the first column divided by it
            wide = torch.exp((2 * torch.rand(n, generator=gen) - 1) * math.log(1 + self.aspect))
            theta[:, :, 0] = theta[:, :, 0] / wide[:, None]
        grid = F.affine_grid(theta, [n, 1, 28, 28], align_corners=False)
        if self.elastic:
            # A smooth field: uniform noise on a 4×4 lattice, upsampled bicubically to 28×28.
            coarse = torch.rand(n, 2, 4, 4, generator=gen) * 2 - 1
            field = F.interpolate(coarse, size=(28, 28), mode="bicubic", align_corners=True)
            grid = grid + field.permute(0, 2, 3, 1) * self.elastic * 2 / 28
        moved = F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        return moved.round().clamp(0, 255).to(torch.uint8)

    def _blur(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """A share of the images blurred (a separable 7-tap Gaussian, its sigma drawn per image), their
        brightest pixel then scaled back to 255 as a scanner's contrast would."""
        chosen = torch.rand(len(x), generator=gen) < self.blur
        m = int(chosen.sum())
        if not m:
            return x
        lo, hi = self.blur_sigma
        sigma = lo + (hi - lo) * torch.rand(m, generator=gen)
        taps = torch.arange(-3, 4, dtype=torch.float32)
        kernel = torch.exp(-taps[None] ** 2 / (2 * sigma[:, None] ** 2))
        kernel = kernel / kernel.sum(1, keepdim=True)  # [m, 7]
        img = x[chosen].float().reshape(1, m, 28, 28)  # one group per image: each its own kernel
        img = F.conv2d(F.pad(img, (3, 3, 0, 0)), kernel.reshape(m, 1, 1, 7), groups=m)
        img = F.conv2d(F.pad(img, (0, 0, 3, 3)), kernel.reshape(m, 1, 7, 1), groups=m).reshape(m, 1, 28, 28)
        img = img * (255 / img.amax((1, 2, 3), keepdim=True).clamp(min=1))
        out = x.clone()
        out[chosen] = img.round().clamp(0, 255).to(x.dtype)
        return out

    def _lowres(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """A share of the images seen at 8×8 and drawn again as MNIST was prepared."""
        chosen = (torch.rand(len(x), generator=gen) < self.lowres).nonzero().flatten().tolist()
        if not chosen:
            return x
        out = x.clone()
        for i in chosen:
            out[i, 0] = torch.from_numpy(mnist_style(thumbnail(x[i, 0].numpy())))
        return out

    def _thickness(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        draw = torch.rand(len(x), generator=gen)
        thick, thin = draw < self.thicken, (draw >= self.thicken) & (draw < self.thicken + self.thin)
        out = x.clone()
        if thick.any():
            out[thick] = F.max_pool2d(x[thick].float(), 3, stride=1, padding=1).to(x.dtype)
        if thin.any():
            out[thin] = (-F.max_pool2d(-x[thin].float(), 3, stride=1, padding=1)).to(x.dtype)
        return out

    def _crop(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Whole-pixel shifts (a random 28×28 crop of the zero-padded image): no interpolation blur."""
        n, pad = len(x), round(self.shift)
        padded = F.pad(x, (pad, pad, pad, pad))
        dy, dx = (torch.randint(0, 2 * pad + 1, (n, 1), generator=gen) for _ in range(2))
        rows, cols = dy + torch.arange(28), dx + torch.arange(28)
        out = padded[torch.arange(n)[:, None, None], 0, rows[:, :, None], cols[:, None, :]][:, None]
        if self.flip:
            flipped = torch.rand(n, generator=gen) < 0.5
            out[flipped] = out[flipped].flip(-1)
        return out


@torch.no_grad()
def predict(model: nn.Module, x: np.ndarray, batch: int = 1000) -> np.ndarray:
    model.eval()
    return np.concatenate([model(torch.from_numpy(x[i:i + batch, None])).argmax(1).numpy()
                           for i in range(0, len(x), batch)])


def train(model: nn.Module, data: ImageData, recipe: Recipe, augment: Augment, seed: int,
          title: str) -> tuple[nn.Module, dict[str, list[float]], float]:
    """Train with the shared loop; return the epoch with the best validation accuracy."""
    # oneDNN runs bfloat16 convolutions far faster on channels-last tensors; the export goes back below.
    model.to(memory_format=torch.channels_last if recipe.bf16 else torch.contiguous_format)
    model, history, seconds = fit(
        model, torch.from_numpy(data.x_train[:, None]), torch.from_numpy(data.y_train),
        validate=lambda m: float((predict(m, data.x_val) == data.y_val).mean()),
        recipe=recipe, seed=seed, title=title, augment=augment if recipe.augment else None, pct_start=0.25)
    model.to(memory_format=torch.contiguous_format).eval()
    return model, history, seconds


# ------------------------------------------------------------------------------ export and evaluation

def export_pixels_model(model: nn.Module, path: Path) -> nn.Module:
    """Export `model` as a graph pixels(uint8 [N,1,28,28]) → logits, probabilities; return the wrapper."""
    wrapped = WithProbabilities(model).eval()
    example = torch.zeros(2, 1, 28, 28, dtype=torch.uint8)
    export(wrapped, (example,), path, input_names=["pixels"], dynamic_axes={"pixels": {0: "batch"}})
    return wrapped


def served_pixels(images: np.ndarray, spec: ImagePreprocessing) -> np.ndarray:
    """The test images prepared exactly as the service prepares an upload: through the image codec."""
    return np.stack([to_pixels(Image.fromarray(img), spec) for img in images])


@dataclass(frozen=True)
class Spec:
    """What differs between the two commands."""

    load: Callable[[], ImageData]
    description: str
    image: ImagePreprocessing
    pixels: tuple[float, float]  # mean, std of the training pixels in [0, 1]
    augment: Augment
    cnn: Recipe
    mlp: Recipe
    rnn: Recipe
    bar: float


SPECS = {
    "fashion-mnist": Spec(
        load_fashion,
        "Fashion-MNIST clothing classifier (10 classes) for 28x28 greyscale pictures",
        ImagePreprocessing(width=28, height=28, color="L", invert="never"),
        (0.286, 0.353),
        Augment(shift=2.0, flip=True),
        cnn=Recipe(epochs=20, lr=4e-3, batch=128, label_smoothing=0.1, bf16=True),
        mlp=Recipe(epochs=10, lr=2e-3, batch=128, augment=False),
        rnn=Recipe(epochs=6, lr=4e-3, batch=128),
        bar=0.93,
    ),
    "mnist": Spec(
        load_digits,
        "MNIST handwritten digit classifier (0-9) for 28x28 greyscale pictures",
        ImagePreprocessing(width=28, height=28, color="L", invert="auto"),
        (0.131, 0.308),
        Augment(shift=2.5, rotate=12.0, scale=0.1),
        cnn=Recipe(epochs=15, lr=4e-3, batch=128, label_smoothing=0.1, bf16=True),
        mlp=Recipe(epochs=10, lr=2e-3, batch=128, augment=False),
        rnn=Recipe(epochs=8, lr=4e-3, batch=128),
        bar=0.985,
    ),
}


def fast_subset(data: ImageData) -> ImageData:
    """The --fast smoke test: a few hundred images of each part."""
    return ImageData(data.name, data.labels, data.x_train[:1000], data.y_train[:1000], data.x_val[:300],
                     data.y_val[:300], data.x_test[:300], data.y_test[:300], data.sources, data.split)


def measure(model: nn.Module, path: Path, data: ImageData, test_pixels: np.ndarray,
            title: str) -> tuple[report.Evaluation, np.ndarray, str]:
    """Export, check parity, and evaluate the graph on the codec-prepared test images."""
    wrapped = export_pixels_model(model, path)
    batches = [{"pixels": test_pixels[i:i + 256]} for i in range(0, min(len(test_pixels), 2048), 256)]
    parity = check_parity(wrapped, path, batches)
    parity_text = (f"max \\|Δlogit\\| {parity.max_abs_logit_diff:.2e} on {parity.samples:,} test images, "
                   f"argmax agreement {parity.argmax_agreement:.2%}")
    predicted = onnx_predict(cpu_session(path), {"pixels": test_pixels}).argmax(1)
    ev = report.evaluate(data.y_test, predicted, len(data.labels))
    print(f"{title}: ONNX test accuracy {ev.accuracy:.2%} on {ev.samples:,} images; parity: "
          f"max |Δlogit| {parity.max_abs_logit_diff:.2e}, argmax agreement {parity.argmax_agreement:.2%}")
    return ev, predicted, parity_text


CALIBRATION_IMAGES = 1024  # training images whose activation ranges set the int8 scales


@dataclass(frozen=True)
class Quantized:
    """The served int8 graph, measured against the FP32 graph it was made from."""

    evaluation: report.Evaluation
    fp32_accuracy: float
    agreement: float  # argmax agreement with the FP32 graph on the test images
    batch_difference: float  # max |Δlogit| of rows run alone vs in one batch


def quantize(fp32_path: Path, served_path: Path, data: ImageData, test_pixels: np.ndarray,
             fp32: np.ndarray, seed: int) -> Quantized:
    """Static int8 quantization of the FP32 graph, calibrated on training images; then the served
    graph's accuracy, its agreement with the FP32 graph (whose test predictions are `fp32`), and
    that a row's answer ignores its batch."""
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(len(data.x_train), min(CALIBRATION_IMAGES, len(data.x_train)), replace=False))
    quantize_static_int8(fp32_path, served_path,
                         [{"pixels": data.x_train[idx[i:i + 64], None]} for i in range(0, len(idx), 64)])
    session = cpu_session(served_path)
    served = onnx_predict(session, {"pixels": test_pixels}).argmax(1)
    probe = test_pixels[:16]
    batched = session.run(["logits"], {"pixels": probe})[0]
    alone = np.concatenate([session.run(["logits"], {"pixels": row[None]})[0] for row in probe])
    q = Quantized(report.evaluate(data.y_test, served, len(data.labels)),
                  float((fp32 == data.y_test).mean()), float((served == fp32).mean()),
                  float(np.abs(batched - alone).max()))
    print(f"{data.name}: served int8 graph test accuracy {q.evaluation.accuracy:.2%} (FP32 graph "
          f"{q.fp32_accuracy:.2%}), argmax agreement {q.agreement:.2%}, rows alone vs batched max "
          f"|Δlogit| {q.batch_difference:.1e}; {fp32_path.stat().st_size / 1e6:.2f} MB → "
          f"{served_path.stat().st_size / 1e6:.2f} MB")
    assert q.batch_difference <= 1e-4, q.batch_difference
    return q


def zoo_row(architecture: str, model: nn.Module, path: Path, ev: report.Evaluation, seconds: float,
            test_pixels: np.ndarray, served: bool = False) -> zoo.ZooRow:
    return zoo.graph_row(architecture, parameter_count(model), ev.accuracy, seconds, path,
                         lambda n: {"pixels": test_pixels[:n]}, served=served)


# ------------------------------------------------------------------------------------------------ main

def main(args: argparse.Namespace) -> None:
    spec = SPECS[args.command]
    if args.threads:
        torch.set_num_threads(args.threads)
    data = fast_subset(spec.load()) if args.fast else spec.load()
    print(f"{data.name}: {len(data.y_train):,} train / {len(data.y_val):,} val / {len(data.y_test):,} test")
    test_pixels = served_pixels(data.x_test, spec.image)

    def recipe(r: Recipe) -> Recipe:
        return replace(r, epochs=1) if args.fast else r

    # The served model: the CNN exported in FP32 (checked against PyTorch, kept out of git), then
    # quantized to int8.
    model_dir = args.models / data.name
    onnx_path = model_dir / "1" / "model.onnx"
    onnx_path.parent.mkdir(parents=True, exist_ok=True)
    cnn = CNN(Pixels(*spec.pixels))
    cnn, history, seconds = train(cnn, data, recipe(spec.cnn), spec.augment, args.seed, f"{data.name} CNN")
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        workdir = Path(tmp)
        fp32_path = workdir / "model_fp32.onnx"
        fp32_ev, fp32_predicted, parity_text = measure(cnn, fp32_path, data, test_pixels,
                                                       f"{data.name} CNN (FP32 graph)")
        if not args.fast:
            keep_fp32_graph(fp32_path, data.name, args.seed, args.models)
        quantized = quantize(fp32_path, onnx_path, data, test_pixels, fp32_predicted, args.seed)
        ev = quantized.evaluation
        if not args.fast and ev.accuracy < spec.bar:
            print(f"warning: {data.name} test accuracy {ev.accuracy:.2%} is below the bar {spec.bar:.1%}")
        write_model_dir(model_dir, data, spec, cnn, quantized, history, seconds, onnx_path, fp32_path,
                        parity_text, args)
        if args.no_zoo:
            return

        # The comparison architectures: same data, split, pixel contract and measurements.
        rows = [zoo_row(f"CNN: {CNN.summary}, int8 (static quantization)", cnn, onnx_path, ev, seconds,
                        test_pixels, served=True),
                zoo_row("CNN: the same, FP32 graph (not served)", cnn, fp32_path, fp32_ev, seconds,
                        test_pixels)]
        candidates = [
            ("MLP 784→64→10, ReLU (Keras example)", MLP(Pixels(*spec.pixels), 64), spec.mlp),
            ("MLP 784→128→Dropout 0.2→10, ReLU (Keras example)", MLP(Pixels(*spec.pixels), 128, 0.2),
             spec.mlp),
            ("GRU 128 reading the 28 rows → linear", RowGRU(Pixels(*spec.pixels)), spec.rnn),
        ]
        # The GRU takes no initial state input, so its graph serves any batch size (parity checks it).
        warnings.filterwarnings("ignore", message="Exporting a model to ONNX with a batch_size other than 1")
        for architecture, model, zoo_recipe in candidates:
            model, _, zoo_seconds = train(model, data, recipe(zoo_recipe), spec.augment, args.seed,
                                          architecture)
            path = workdir / f"{len(rows)}.onnx"  # zoo graphs are measured, not kept
            zoo_ev, _, _ = measure(model, path, data, test_pixels, architecture)
            rows.append(zoo_row(architecture, model, path, zoo_ev, zoo_seconds, test_pixels))
    for r in rows:
        print(f"zoo {data.name}: {r.architecture}: {r.test_accuracy:.2%}, {r.parameters:,} params, "
              f"{r.training_seconds:.0f} s, {r.onnx_bytes / 1e6:.2f} MB, "
              f"{r.latency_b1_ms:.3f} / {r.latency_b32_ms:.3f} ms at batch 1 / 32")
    if not args.fast:  # the smoke test must not touch docs/
        zoo.save_rows(f"image-{data.name}", rows)


def write_model_dir(model_dir: Path, data: ImageData, spec: Spec, model: nn.Module, quantized: Quantized,
                    history: dict[str, list[float]], seconds: float, onnx_path: Path, fp32_path: Path,
                    parity_text: str, args: argparse.Namespace) -> None:
    ev = quantized.evaluation
    (model_dir / "labels.txt").write_text("\n".join(data.labels) + "\n", encoding="utf-8")
    report.write_config(model_dir, ModelConfig(
        name=data.name,
        task="image",
        description=spec.description,
        inputs=[TensorSpec(name="pixels", datatype="UINT8", shape=[-1, 1, 28, 28])],
        outputs=[TensorSpec(name="logits", datatype="FP32", shape=[-1, 10]),
                 TensorSpec(name="probabilities", datatype="FP32", shape=[-1, 10])],
        labels="labels.txt",
        scores_output="probabilities",
        image=spec.image,
        batching=Batching(max_batch_size=16, max_queue_delay_ms=0.0, max_queue_size=512, instances=1,
                          max_queue_wait_ms=100.0),
    ))
    title = "Fashion-MNIST" if data.name == "fashion-mnist" else "MNIST digits"
    report.plot_confusion(ev, data.labels, model_dir / "confusion_matrix.png",
                          f"{title} CNN (int8 ONNX graph, test)")
    report.plot_curves(history, model_dir / "training_curves.png", f"{title} CNN")
    r, aug = spec.cnn, spec.augment
    aug_text = (f"random shifts of up to ±{aug.shift:g} px"
                + (f", rotations of up to ±{aug.rotate:g}°" if aug.rotate else "")
                + (f", scaling by up to ±{aug.scale:.0%}" if aug.scale else "")
                + (f", widths scaled by a factor from 1/{1 + aug.aspect:g} to {1 + aug.aspect:g}"
                   if aug.aspect else "")
                + (f", a Gaussian blur (σ {aug.blur_sigma[0]:g} to {aug.blur_sigma[1]:g} px, peak stretched "
                   f"back to 255) on {aug.blur:.0%} of the images" if aug.blur else "")
                + (", horizontal flips" if aug.flip else ""))
    invert = ("dark-on-light pictures are inverted (`invert = \"auto\"`), as people draw digits in dark ink"
              if spec.image.invert == "auto" else
              "pictures are not inverted (`invert = \"never\"`): the data shows light clothes on black")
    report.ModelCard(
        name=data.name,
        title=f"{data.name}: {spec.description}",
        summary=(f"A small convolutional network, quantized to int8, served by neuroserve. The graph "
                 f"takes uint8 pixels "
                 f"`pixels` [N, 1, 28, 28] and scales them itself (/255, then normalised with mean "
                 f"{spec.pixels[0]} and std {spec.pixels[1]}); it returns `logits` and `probabilities` "
                 f"[N, 10]. The service fits uploads into 28×28 greyscale; {invert}."),
        architecture=CNN.summary,
        parameters=parameter_count(model),
        data_sources=data.sources,
        split=data.split,
        evaluation=ev,
        labels=data.labels,
        training_seconds=seconds,
        onnx_bytes=onnx_path.stat().st_size,
        parity=(f"FP32 graph vs PyTorch: {parity_text}. Served int8 graph vs FP32 graph: argmax "
                f"agreement {quantized.agreement:.2%} on all {ev.samples:,} test images; a row's logits "
                f"alone vs in a batch of 16 differ by at most {quantized.batch_difference:.1e}"),
        training_command=f"python -m training {data.name} --seed {args.seed}" + (" --fast" * args.fast),
        notes=[
            "Test accuracy is that of the served int8 ONNX graph under ONNX Runtime (CPU), on the test "
            "images passed through the service's image codec (`service.codecs.image.to_pixels`), as the "
            "service would.",
            "Quantization (`training/quantize.py`): the FP32 graph "
            f"({fp32_path.stat().st_size / 1e6:.2f} MB, test accuracy {quantized.fp32_accuracy:.2%}, "
            "not shipped) with BatchNorm folded into the convolutions, then convolutions and matrix "
            "products in int8: weights per output channel in 7 bits (|w| ≤ 64), "
            f"activation ranges fixed from {CALIBRATION_IMAGES:,} training images, so every scale is a "
            "constant and a row's answer does not depend on its batch. With 7-bit weights no pair of "
            "uint8 × int8 products overflows the 16-bit sums of the AVX2 kernels, so the graph computes "
            "exactly the same on AVX2, AVX-512 and VNNI CPUs. The latencies of both graphs: "
            "docs/model-zoo.md.",
            f"Training: {r.epochs} epochs, AdamW (weight decay {r.weight_decay:g}) with a one-cycle "
            f"schedule peaking at lr {r.lr:g}, batch {r.batch}, label smoothing {r.label_smoothing:g}"
            + (", bfloat16 autocast in the forward pass (weights and evaluation FP32)" if r.bf16 else "")
            + f"; the epoch with the best validation accuracy is kept. Augmentation: {aug_text}.",
            f"Training time measured with {torch.get_num_threads()} PyTorch thread(s) on a 2-core CPU "
            "machine.",
            "Comparison architectures (MLPs, a recurrent model over rows): docs/model-zoo.md.",
        ],
    ).write(model_dir)
    print(f"wrote {model_dir}")
