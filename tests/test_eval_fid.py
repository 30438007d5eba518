"""FID / KID maths against independent numpy/scipy computations; the FID Inception-v3 layout,
strict loading and forward against a torchvision-built reference."""
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
import torchvision

import eval.fid as fid
from eval.fid import (distance_from_features, feature_statistics, frechet_distance,
                      kernel_inception_distance, trace_sqrt_product)
from eval.inception import (INCEPTION_FILE_NAME, FIDInceptionV3, InceptionWeightsNotFound,
                            build_fid_inception, find_inception_weights)

FIXTURES = Path(__file__).parent / "fixtures"


def _features(n, d, seed, shift=0.0):
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(d, d)) / np.sqrt(d)
    return rng.normal(size=(n, d)) @ mixing + shift


def _fd_scipy_sqrtm(mu1, s1, mu2, s2):
    """pytorch-fid's sqrtm form, written with scipy (the test-only oracle)."""
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    covmean = np.real(covmean)
    diff = mu1 - mu2
    return diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)


def _fd_eigvals(mu1, s1, mu2, s2):
    """The eigenvalue form: Tr sqrt(S1 S2) = sum sqrt(eig(S1 S2)) (S1 S2 has real eigenvalues >= 0)."""
    eig = np.linalg.eigvals(s1 @ s2)
    diff = mu1 - mu2
    return diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.clip(eig.real, 0, None)).sum()


@pytest.mark.parametrize("n,d", [(400, 16), (300, 64)])
def test_frechet_matches_sqrtm_and_eigenvalue_forms(n, d):
    mu1, s1 = feature_statistics(_features(n, d, 1))
    mu2, s2 = feature_statistics(_features(n, d, 2, shift=0.3))
    ours = frechet_distance(mu1, s1, mu2, s2)
    assert ours == pytest.approx(_fd_scipy_sqrtm(mu1, s1, mu2, s2), rel=1e-6)
    assert ours == pytest.approx(_fd_eigvals(mu1, s1, mu2, s2), rel=1e-6)
    assert ours > 0.1


def test_frechet_rank_deficient_covariances_match_eigenvalue_form():
    # N < d, as with 100 samples of 2048-d features: both covariances are singular.
    mu1, s1 = feature_statistics(_features(20, 48, 3))
    mu2, s2 = feature_statistics(_features(25, 48, 4, shift=0.1))
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(_fd_eigvals(mu1, s1, mu2, s2), rel=1e-6)


def test_trace_sqrt_product_of_commuting_diagonals():
    a, b = np.diag([1.0, 4.0, 9.0]), np.diag([4.0, 1.0, 0.0])
    assert trace_sqrt_product(a, b) == pytest.approx(2.0 + 2.0 + 0.0, abs=1e-12)


def test_fid_of_a_set_with_itself_is_zero():
    feats = _features(300, 32, 5)
    result = distance_from_features(feats, feats.copy(), kid=True, kid_subsets=5, kid_subset_size=50)
    assert abs(result.value) < 1e-8 * np.trace(np.cov(feats, rowvar=False))
    assert (result.n_real, result.n_fake) == (300, 300)
    assert "N real 300" in result.summary() and result.summary().startswith("FID ")


def test_eps_fallback_adds_eps_to_both_diagonals(monkeypatch):
    calls = []
    real = fid.trace_sqrt_product

    def flaky(s1, s2):
        calls.append((s1.copy(), s2.copy()))
        return float("nan") if len(calls) == 1 else real(s1, s2)

    monkeypatch.setattr(fid, "trace_sqrt_product", flaky)
    mu, s = feature_statistics(_features(50, 4, 6))
    with pytest.warns(UserWarning, match="singular product"):
        value = frechet_distance(mu, s, mu, s, eps=1e-6)
    assert len(calls) == 2
    np.testing.assert_allclose(calls[1][0] - calls[0][0], np.eye(4) * 1e-6, atol=1e-15)
    np.testing.assert_allclose(calls[1][1] - calls[0][1], np.eye(4) * 1e-6, atol=1e-15)
    assert abs(value) < 1e-5


def test_frechet_rejects_mismatched_and_nonfinite_inputs():
    with pytest.raises(ValueError, match="shapes"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    bad = np.eye(2)
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="sigma1"):
        frechet_distance(np.zeros(2), bad, np.zeros(2), np.eye(2))


def _kid_reference(x, y, num_subsets, m, seed):
    """Independent loop-based unbiased MMD^2 with the cubic kernel, same seeded subsets."""
    rng = np.random.default_rng(seed)
    d = x.shape[1]
    k = lambda a, b: (float(np.dot(a, b)) / d + 1.0) ** 3
    values = []
    for _ in range(num_subsets):
        xs = x[rng.choice(x.shape[0], m, replace=False)]
        ys = y[rng.choice(y.shape[0], m, replace=False)]
        kxx = sum(k(xs[i], xs[j]) for i in range(m) for j in range(m) if i != j)
        kyy = sum(k(ys[i], ys[j]) for i in range(m) for j in range(m) if i != j)
        kxy = sum(k(xs[i], ys[j]) for i in range(m) for j in range(m))
        values.append(kxx / (m * (m - 1)) + kyy / (m * (m - 1)) - 2 * kxy / m ** 2)
    return np.mean(values), np.std(values)


def test_kid_matches_loop_reference_and_caps_subset_size():
    x, y = _features(30, 8, 7), _features(12, 8, 8, shift=0.5)
    result = kernel_inception_distance(x, y, num_subsets=4, subset_size=1000, seed=3)
    assert result.subset_size == 12 and result.num_subsets == 4  # capped by the smaller set
    mean, std = _kid_reference(x, y, 4, 12, 3)
    assert result.mean == pytest.approx(mean, rel=1e-6)
    assert result.std == pytest.approx(std, rel=1e-6)
    assert result.mean > 0
    again = kernel_inception_distance(x, y, num_subsets=4, subset_size=1000, seed=3)
    assert again == result  # seeded


def test_inception_layout_matches_published_file_layout():
    doc = json.loads((FIXTURES / "pt_inception_layout.json").read_text())
    expected = doc["layout"]
    with torch.device("meta"):
        model = FIDInceptionV3()
    ours = {k: [list(v.shape), str(v.dtype).replace("torch.", "")] for k, v in model.state_dict().items()}
    assert sorted(ours) == sorted(expected)
    assert ours == expected
    assert sum(np.prod(s) for s, dtype in expected.values() if dtype == "float32") == 23_885_392


def _reference_fid_forward(tv, x):
    """The FID network built from torchvision's Inception3 modules, pool patches applied here."""
    avg = lambda t: F.avg_pool2d(t, 3, 1, 1, count_include_pad=False)
    x = 2 * F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False) - 1
    x = tv.maxpool1(tv.Conv2d_2b_3x3(tv.Conv2d_2a_3x3(tv.Conv2d_1a_3x3(x))))
    x = tv.maxpool2(tv.Conv2d_4a_3x3(tv.Conv2d_3b_1x1(x)))
    for blk in (tv.Mixed_5b, tv.Mixed_5c, tv.Mixed_5d):
        x = torch.cat([blk.branch1x1(x), blk.branch5x5_2(blk.branch5x5_1(x)),
                       blk.branch3x3dbl_3(blk.branch3x3dbl_2(blk.branch3x3dbl_1(x))), blk.branch_pool(avg(x))], 1)
    x = tv.Mixed_6a(x)
    for blk in (tv.Mixed_6b, tv.Mixed_6c, tv.Mixed_6d, tv.Mixed_6e):
        b7 = blk.branch7x7_3(blk.branch7x7_2(blk.branch7x7_1(x)))
        b7d = blk.branch7x7dbl_5(blk.branch7x7dbl_4(blk.branch7x7dbl_3(blk.branch7x7dbl_2(blk.branch7x7dbl_1(x)))))
        x = torch.cat([blk.branch1x1(x), b7, b7d, blk.branch_pool(avg(x))], 1)
    x = tv.Mixed_7a(x)
    for blk, pool in ((tv.Mixed_7b, avg), (tv.Mixed_7c, lambda t: F.max_pool2d(t, 3, 1, 1))):
        b3 = blk.branch3x3_1(x)
        b3d = blk.branch3x3dbl_2(blk.branch3x3dbl_1(x))
        x = torch.cat([blk.branch1x1(x), blk.branch3x3_2a(b3), blk.branch3x3_2b(b3),
                       blk.branch3x3dbl_3a(b3d), blk.branch3x3dbl_3b(b3d), blk.branch_pool(pool(x))], 1)
    return x.mean(dim=(2, 3))


def test_inception_forward_matches_torchvision_reference_and_loads_strictly(tmp_path):
    ours = build_fid_inception(random_init_seed=1)
    state = ours.state_dict()
    tv = torchvision.models.inception_v3(weights=None, aux_logits=False, num_classes=1008, init_weights=False)
    tv.load_state_dict(state, strict=True)
    tv.eval()
    x = torch.rand(1, 3, 96, 128)
    with torch.no_grad():
        got, want = ours(x), _reference_fid_forward(tv, x)
    assert got.shape == (1, 2048)
    assert (got - want).abs().max().item() < 1e-4 * want.abs().max().item()

    # A file without BatchNorm counters (old PyTorch) loads; an extra key is an error naming the file.
    path = tmp_path / INCEPTION_FILE_NAME
    torch.save({k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}, path)
    loaded = build_fid_inception(tmp_path)  # a folder holding the file works too
    with torch.no_grad():
        assert torch.equal(loaded(x), got)
    torch.save({**state, "AuxLogits.fc.weight": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match=INCEPTION_FILE_NAME):
        build_fid_inception(path)


def test_inception_features_match_pytorch_fid(monkeypatch):
    """pytorch-fid (test-only oracle, the reference FID implementation) builds its InceptionV3 with
    the same state dict as ours: the same pool3 features. Its weight download is replaced by our
    random state dict, so nothing is fetched; tolerance as above (summation order over 2048 x 8 x 8)."""
    from pytorch_fid import inception as pytorch_fid_inception

    ours = build_fid_inception(random_init_seed=1)
    state = ours.state_dict()
    fetched = []
    monkeypatch.setattr(pytorch_fid_inception, "load_state_dict_from_url",
                        lambda url, *args, **kwargs: fetched.append(url) or state)
    reference = pytorch_fid_inception.InceptionV3([pytorch_fid_inception.InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()
    assert fetched and fetched[0].endswith(INCEPTION_FILE_NAME)  # it asked for the published file
    x = torch.rand(2, 3, 96, 128, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got, want = ours(x), reference(x)[0].flatten(1)  # (B, 2048, 1, 1) -> (B, 2048)
    assert got.shape == want.shape == (2, 2048) and want.abs().max() > 0
    assert (got - want).abs().max().item() < 1e-4 * want.abs().max().item()


def test_missing_weights_message_names_the_file(tmp_path, monkeypatch, capsys):
    with pytest.raises(InceptionWeightsNotFound) as err:
        find_inception_weights(tmp_path / "nowhere.pth")
    assert INCEPTION_FILE_NAME in str(err.value) and "nowhere.pth" in str(err.value)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    code = fid.cli(["--real", str(tmp_path), "--fake", str(tmp_path),
                    "--inception-weights", str(tmp_path / "missing")])
    assert code == 2
    message = capsys.readouterr().err
    assert str(tmp_path / "hub" / "checkpoints" / INCEPTION_FILE_NAME) in message


def _write_images(folder, n, seed, bright=0):
    import cv2
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        img = rng.integers(0, 150, size=(40 + i, 48, 3), dtype=np.uint8) + bright
        cv2.imwrite(str(folder / f"{i}.png"), img)


def test_cli_on_folders_with_a_labelled_non_fid_extractor(tmp_path):
    _write_images(tmp_path / "real", 6, 0)
    _write_images(tmp_path / "fake", 5, 1, bright=100)
    out = tmp_path / "fd.json"
    cfg = fid.FidConfig(real=str(tmp_path / "real"), fake=str(tmp_path / "fake"), feature_extractor="pixels",
                        kid=True, kid_subsets=3, out=str(out))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = fid.main(cfg)
    assert result.label == "FD-pixels" and result.n_real == 6 and result.n_fake == 5
    assert result.kid.subset_size == 5 and result.value > 0
    assert json.loads(out.read_text())["result"]["label"] == "FD-pixels"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        same = fid.main(fid.FidConfig(real=str(tmp_path / "real"), fake=str(tmp_path / "real"),
                                      feature_extractor="pixels", batch_size=4))
    assert same.n_real == same.n_fake == 6 and abs(same.value) < 1e-9 * result.value
