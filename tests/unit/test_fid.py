"""FID: the Frechet distance against closed forms and scipy, the pipeline, the Inception."""

import numpy as np
import pytest
import torch
from PIL import Image

from medim.evaluation import FIDInceptionV3, feature_statistics, fid, frechet_distance


def test_frechet_distance_closed_form():
    # N(m1, diag(a)) vs N(m2, diag(b)): |m1 - m2|^2 + sum (sqrt(a) - sqrt(b))^2.
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 0.25])
    m1, m2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    expected = 5.0 + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_distance(m1, np.diag(a), m2, np.diag(b)) == pytest.approx(expected, rel=1e-12)
    assert frechet_distance(m1, np.diag(a), m1, np.diag(a)) == pytest.approx(0.0, abs=1e-10)


def test_frechet_distance_matches_scipy_sqrtm():
    linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(0)
    f1 = rng.normal(size=(300, 16))
    f2 = rng.normal(size=(300, 16)) @ rng.normal(size=(16, 16)) * 0.5 + 0.3
    mu1, s1 = feature_statistics(f1)
    mu2, s2 = feature_statistics(torch.from_numpy(f2).float())
    covmean = linalg.sqrtm(s1 @ s2).real
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-6)


def test_frechet_distance_singular_covariance_is_finite():
    rng = np.random.default_rng(1)
    mu1, s1 = feature_statistics(rng.normal(size=(5, 32)))  # rank 4 of 32
    mu2, s2 = feature_statistics(rng.normal(size=(5, 32)))
    value = frechet_distance(mu1, s1, mu2, s2)
    assert np.isfinite(value) and value > 0


def test_frechet_distance_bad_shapes():
    with pytest.raises(ValueError, match="shapes do not match"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(2), np.eye(2))
    with pytest.raises(ValueError, match="N >= 2"):
        feature_statistics(np.zeros((1, 4)))


def _images(folder, n, seed, size=(20, 16), mode="RGB"):
    folder.mkdir()
    rng = np.random.default_rng(seed)
    for i in range(n):
        shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
        Image.fromarray(rng.integers(0, 255, size=shape, dtype=np.uint8)).convert(mode).save(
            folder / f"{i}.png"
        )
    return folder


class TinyExtractor(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.proj = torch.nn.Linear(3 * 4 * 4, 8)

    def forward(self, images):
        assert images.shape[1:] == (3, 299, 299) and 0 <= images.min() and images.max() <= 1
        return self.proj(torch.nn.functional.adaptive_avg_pool2d(images, 4).flatten(1))


def test_fid_pipeline_with_custom_extractor(tmp_path):
    real = _images(tmp_path / "real", 6, seed=0)
    fake = _images(tmp_path / "fake", 5, seed=1, size=(33, 40), mode="L")  # other size and mode
    extractor = TinyExtractor()
    with pytest.warns(UserWarning, match="under 2000"):
        out = fid(real, fake, feature_extractor=extractor, batch_size=4, device="cpu")
    assert (out.num_real, out.num_generated, out.feature_dim) == (6, 5, 8)
    with pytest.warns(UserWarning):
        same = fid(real, sorted(real.iterdir()), feature_extractor=extractor, device="cpu")
    assert same.fid == pytest.approx(0.0, abs=1e-6) and out.fid > same.fid


def test_fid_bad_inputs(tmp_path):
    real = _images(tmp_path / "real", 2, seed=0)
    with pytest.raises(ValueError, match="exactly one of weights"):
        fid(real, real)
    with pytest.raises(ValueError, match="batch_size"):
        fid(real, real, feature_extractor=TinyExtractor(), batch_size=0)
    with pytest.raises(FileNotFoundError, match="not a folder"):
        fid(tmp_path / "nope", real, feature_extractor=TinyExtractor())
    with pytest.raises(ValueError, match="at least 2"):
        fid([next(real.iterdir())], real, feature_extractor=TinyExtractor())


@pytest.fixture(scope="module")
def inception():
    torch.manual_seed(0)
    return FIDInceptionV3()


def test_inception_shape_and_weights_roundtrip(inception, tmp_path):
    x = torch.rand(1, 3, 64, 48)
    with torch.no_grad():
        feats = inception(x)
    assert feats.shape == (1, 2048) and torch.isfinite(feats).all()
    # pytorch-fid's file also holds the 1008-way classifier, which is ignored.
    state = {k: v for k, v in inception.state_dict().items() if not k.endswith("num_batches_tracked")}
    state["fc.weight"], state["fc.bias"] = torch.zeros(1008, 2048), torch.zeros(1008)
    torch.save(state, tmp_path / "pt_inception.pth")
    loaded = FIDInceptionV3.from_weights(tmp_path / "pt_inception.pth")
    with torch.no_grad():
        assert torch.equal(loaded(x), feats)
    del state["Mixed_7c.branch_pool.conv.weight"]
    torch.save(state, tmp_path / "broken.pth")
    with pytest.raises(ValueError, match="Mixed_7c.branch_pool.conv.weight"):
        FIDInceptionV3.from_weights(tmp_path / "broken.pth")


def test_inception_module_names_follow_pytorch_fid(inception):
    names = set(inception.state_dict())
    for key in (
        "Conv2d_1a_3x3.conv.weight",
        "Conv2d_1a_3x3.bn.running_var",
        "Mixed_5b.branch5x5_2.conv.weight",
        "Mixed_6a.branch3x3.conv.weight",
        "Mixed_6e.branch7x7dbl_5.bn.bias",
        "Mixed_7a.branch7x7x3_4.conv.weight",
        "Mixed_7c.branch3x3dbl_3b.conv.weight",
    ):
        assert key in names
    # 21.8 M parameters without the classifier, as torchvision's Inception3 body.
    assert sum(p.numel() for p in inception.parameters()) == pytest.approx(21.8e6, rel=0.01)
