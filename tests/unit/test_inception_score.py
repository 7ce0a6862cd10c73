"""Inception Score: torchvision's key layout, the release's procedure, known softmax outputs."""

import json
from pathlib import Path
from unittest.mock import ANY

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from medim.cli import main
from medim.evaluation import InceptionV3, inception_score, inception_score_from_probs
from medim.evaluation.inception import TORCHVISION_INCEPTION_FILE

# Names and shapes of torchvision's inception_v3(aux_logits=True).state_dict(), dumped from
# torchvision 0.28.0 (the file's "source").
TORCHVISION_KEYS = Path(__file__).parent / "fixtures" / "torchvision_inception_v3_keys.json"


def _random_torchvision_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors under torchvision's names: He-scaled weights and near-identity batch norms
    so 95 layers keep activations (and the softmax) in a useful range."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in json.loads(TORCHVISION_KEYS.read_text())["keys"]:
        if name.endswith("num_batches_tracked"):
            state[name] = torch.tensor(0)
        elif name.endswith(("running_var", "bn.weight")):
            state[name] = 0.8 + 0.4 * torch.rand(shape, generator=gen)
        elif name.endswith(("running_mean", "bn.bias", "fc.bias")):
            state[name] = 0.1 * torch.randn(shape, generator=gen)
        else:  # conv and linear weights
            fan_in = int(np.prod(shape[1:]))
            gain = 2.0 if name.endswith("conv.weight") else 1000.0
            state[name] = torch.randn(shape, generator=gen) * (gain / fan_in) ** 0.5
    return state


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """The random state in torch's hub cache layout (`<hub>/checkpoints/<file>`)."""
    state = _random_torchvision_state()
    # Pooled features of a random network point mostly one way for every input; a classifier
    # blind to that direction sees what differs between images, so IS is well above 1.
    net = InceptionV3()
    net.load_state_dict(state, strict=False)
    with torch.no_grad():
        m = net.pool3(torch.zeros(1, 3, 299, 299))[0]
    state["fc.weight"] -= (state["fc.weight"] @ m)[:, None] * m[None] / m.dot(m)
    path = tmp_path_factory.mktemp("torch_home") / "hub" / "checkpoints" / TORCHVISION_INCEPTION_FILE
    path.parent.mkdir(parents=True)
    torch.save(state, path)
    return path


def test_torchvision_layout_loads_strictly(weights, tmp_path):
    state = torch.load(weights, weights_only=True)
    net = InceptionV3.from_weights(weights)
    own = net.state_dict()
    # The same names and shapes as torchvision's, the auxiliary head included.
    assert {k: tuple(v.shape) for k, v in own.items()} == {k: tuple(v.shape) for k, v in state.items()}
    assert all(torch.equal(own[k], v) for k, v in state.items())
    broken = dict(state)
    del broken["AuxLogits.fc.weight"]
    broken["fc.extra"] = torch.zeros(1)
    torch.save(broken, tmp_path / "broken.pth")
    with pytest.raises(ValueError, match=r"AuxLogits\.fc\.weight.*fc\.extra"):
        InceptionV3.from_weights(tmp_path / "broken.pth")
    # Files without num_batches_tracked (older PyTorch) load too.
    torch.save({k: v for k, v in state.items() if "num_batches" not in k}, tmp_path / "old.pth")
    InceptionV3.from_weights(tmp_path / "old.pth")


def _release_inception_score(paths, net, splits):
    """is_score.py's procedure, step by step: RGB, bicubic 256x256, [-1, 1], bilinear 299x299,
    softmax, N // splits per part, exp(mean scipy entropy(p(y|x), p(y))), mean and std."""
    entropy = pytest.importorskip("scipy.stats").entropy
    xs = []
    for p in paths:
        image = Image.open(p).convert("RGB").resize((256, 256), Image.BICUBIC)
        x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
        xs.append((x - 0.5) / 0.5)
    x = F.interpolate(torch.stack(xs), size=(299, 299), mode="bilinear", align_corners=False)
    with torch.no_grad():
        preds = F.softmax(net(x), dim=1).double().numpy()
    part = len(paths) // splits
    scores = []
    for k in range(splits):
        rows = preds[k * part : (k + 1) * part]
        py = np.mean(rows, axis=0)
        scores.append(np.exp(np.mean([entropy(row, py) for row in rows])))
    return np.mean(scores), np.std(scores), preds


def _patterns(folder, n, seed=0):
    """Stripes and checkerboards of varied period, colour, size and mode: inputs a random network
    tells apart."""
    folder.mkdir()
    rng = np.random.default_rng(seed)
    for i in range(n):
        h, w = rng.integers(50, 90, size=2)
        yy, xx = np.mgrid[0:h, 0:w]
        period = int(rng.integers(1, 12))
        pattern = (xx // period + (yy // period if i % 2 else 0)) % 2
        a = (pattern[..., None] * rng.integers(0, 256, size=3)).astype(np.uint8)
        (Image.fromarray(a) if i % 3 else Image.fromarray(a[..., 0])).save(folder / f"image_{i}.png")
    Image.fromarray(a).save(folder / "ignored.jpg")  # the release reads PNGs only
    return folder


def test_inception_score_follows_release(weights, monkeypatch):
    folder = _patterns(weights.parents[2] / "images", 5)
    paths = sorted(folder.glob("*.png"))  # string order, as the release
    # 5 images, 2 splits: parts of 2, the last image dropped.
    mean, std, preds = _release_inception_score(paths[:4], InceptionV3.from_weights(weights), splits=2)
    assert 1.2 < mean and len(set(preds.argmax(1))) > 1  # a test that can tell KL errors apart
    out = inception_score(folder, weights=weights, splits=2, batch_size=4, device="cpu")
    assert out.mean == pytest.approx(mean, rel=1e-6) and out.std == pytest.approx(std, rel=1e-6)
    assert (out.num_images, out.num_scored, len(out.split_scores)) == (5, 4, 2)
    # The command line, with the weights found in torch's hub cache.
    monkeypatch.setenv("TORCH_HOME", str(weights.parents[2]))
    monkeypatch.setattr(torch.hub, "_hub_dir", None, raising=False)
    output = weights.parents[2] / "is.json"
    assert main(["evaluate", "is", "--images", str(folder), "--splits", "2", "--device", "cpu",
                 "--output", str(output)]) == 0
    assert json.loads(output.read_text()) == out.to_dict() | {"classifier": ANY, "medim": "evaluate is"}


def test_weights_from_torch_hub_cache(weights, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(weights.parents[2]))
    monkeypatch.setattr(torch.hub, "_hub_dir", None, raising=False)
    assert Path(torch.hub.get_dir()) == weights.parent.parent
    net = InceptionV3.from_weights()
    assert torch.equal(net.fc.weight, torch.load(weights, weights_only=True)["fc.weight"])


def test_known_softmax_outputs():
    one_class = np.tile(np.eye(5)[2], (20, 1))
    out = inception_score_from_probs(one_class, splits=4)
    assert out.mean == pytest.approx(1.0) and out.std == pytest.approx(0.0)
    for k in (2, 3, 7):
        probs = np.eye(10)[np.arange(6 * k) % k]  # every part: an equal share of k one-hot classes
        out = inception_score_from_probs(torch.from_numpy(probs).float(), splits=2)
        assert out.mean == pytest.approx(k, rel=1e-12) and out.std == pytest.approx(0.0, abs=1e-12)
    # Rows are normalised (scipy's entropy does the same), the remainder is dropped.
    out = inception_score_from_probs(np.r_[3 * np.eye(4), np.ones((1, 4))], splits=2)
    assert out.mean == pytest.approx(2.0) and out.num_scored == 4 and out.num_images == 5


def test_known_outputs_through_the_folder_pipeline(tmp_path):
    """A classifier that reads the colour: k colours in equal share per part -> IS k."""
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    for i in range(12):
        Image.new("RGB", (30, 20), colours[i % 3]).save(tmp_path / f"{i:06d}.png")

    def by_colour(x):
        assert x.shape[1:] == (3, 299, 299) and x.min() >= -1 and x.max() <= 1
        logits = torch.zeros(x.shape[0], 1000)
        logits[torch.arange(x.shape[0]), x.mean(dim=(2, 3)).argmax(1)] = 200.0
        return logits

    out = inception_score(tmp_path, splits=4, classifier=by_colour, device="cpu")
    assert out.mean == pytest.approx(3.0, rel=1e-6) and out.classifier == "by_colour"


def test_bad_inputs(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None, raising=False)
    for i in range(3):
        Image.new("RGB", (8, 8)).save(tmp_path / f"{i}.png")
    with pytest.raises(FileNotFoundError, match=TORCHVISION_INCEPTION_FILE):
        inception_score(tmp_path, splits=3)
    with pytest.raises(ValueError, match="cannot be cut into splits=10"):
        inception_score(tmp_path, weights="x.pth")
    with pytest.raises(ValueError, match="not both"):
        inception_score(tmp_path, weights="x.pth", classifier=lambda x: x)
    with pytest.raises(ValueError, match="batch_size"):
        inception_score(tmp_path, batch_size=0)
    (tmp_path / "jpegs").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "jpegs" / "0.jpg")
    with pytest.raises(ValueError, match=r"holds no images \(\.png\)"):
        inception_score(tmp_path / "jpegs", splits=1, classifier=lambda x: x)
    with pytest.raises(ValueError, match="non-negative"):
        inception_score_from_probs(-np.ones((4, 3)), splits=2)
