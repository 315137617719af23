"""backbones.py (archs, torchvision compatibility, the ViT, device facts) and views.py (the paper's recipes, the
multi-crop transform, device normalisation, the data sets, the picture)."""
import math
import os
import subprocess
import sys
import urllib.error
import warnings

import pytest
import torch
import torch.nn as nn
import torchvision
from PIL import Image

import backbones
import views

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CNNS = ["mobilenet_v2", "resnet18", "resnet34", "resnet50"]
CLASSIFIER_KEYS = {"mobilenet_v2": {"classifier.1.weight", "classifier.1.bias"},
                   "resnet18": {"fc.weight", "fc.bias"}, "resnet34": {"fc.weight", "fc.bias"},
                   "resnet50": {"fc.weight", "fc.bias"}}


def random_image(size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray(torch.randint(0, 256, (size, size, 3), generator=g, dtype=torch.uint8).numpy())


# ----------------------------------------------------------------------------------------------
# Backbones
# ----------------------------------------------------------------------------------------------

FEAT_DIMS = {"mobilenet_v2": 1280, "resnet18": 512, "resnet34": 512, "resnet50": 2048,
             "vit_tiny": 192, "vit_small": 384}


def test_archs_list_is_complete():
    assert sorted(backbones.ARCHS) == sorted(FEAT_DIMS)


@pytest.mark.parametrize("arch", sorted(FEAT_DIMS))
def test_feature_dims(arch):
    torch.manual_seed(0)
    model = backbones.build_backbone(arch).eval()
    size = 32 if arch in CNNS else 64
    with torch.no_grad():
        out = model(torch.randn(2, 3, size, size))
    assert model.feat_dim == FEAT_DIMS[arch]
    assert out.shape == (2, FEAT_DIMS[arch])
    assert model.is_vit == backbones.is_vit(arch) == arch.startswith("vit")


def test_unknown_arch_lists_valid_names():
    with pytest.raises(ValueError) as info:
        backbones.build_backbone("resnet19")
    for arch in FEAT_DIMS:
        assert arch in str(info.value)


def test_vit_resolutions_pos_embed_and_last_cls_tokens():
    torch.manual_seed(0)
    vit = backbones.build_backbone("vit_tiny").eval()
    assert vit.pos_embed.shape == (1, 1 + 14 * 14, 192)
    # The stored 14x14 grid is used as is at 224 px; other grids are interpolated.
    assert vit.interpolate_pos_embed(14, 14) is vit.pos_embed
    assert vit.interpolate_pos_embed(8, 8).shape == (1, 1 + 64, 192)
    assert vit.interpolate_pos_embed(6, 6).shape == (1, 1 + 36, 192)
    assert torch.equal(vit.interpolate_pos_embed(6, 6)[:, 0], vit.pos_embed[:, 0])  # CLS kept
    grid = vit.pos_embed[:, 1:].reshape(1, 14, 14, 192).permute(0, 3, 1, 2)
    bicubic = torch.nn.functional.interpolate(grid, size=(6, 6), mode="bicubic", align_corners=False)
    torch.testing.assert_close(vit.interpolate_pos_embed(6, 6)[:, 1:], bicubic.flatten(2).transpose(1, 2))
    with torch.no_grad():
        for size in (224, 128, 96):
            x = torch.randn(1, 3, size, size)
            out = vit(x)
            assert out.shape == (1, 192)
            assert torch.isfinite(out).all()
        x = torch.randn(1, 3, 96, 96)
        last4 = vit.last_cls_tokens(x, 4)
        assert last4.shape == (1, 768)
        torch.testing.assert_close(last4[:, -192:], vit(x))
        assert not torch.allclose(last4[:, :192], last4[:, -192:])  # different blocks
    with pytest.raises(ValueError):
        vit(torch.randn(1, 3, 100, 100))


def test_vit_drop_path_is_linear_and_off_in_eval():
    vit = backbones.build_backbone("vit_tiny", drop_path_rate=0.1)
    rates = [b.drop_path.drop_prob for b in vit.blocks]
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.1) and len(rates) == 12
    vit.eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(vit(x), vit(x))


@pytest.mark.parametrize("arch", CNNS)
def test_cnn_state_dict_loads_into_torchvision(arch):
    torch.manual_seed(0)
    ours = backbones.build_backbone(arch).eval()
    reference = getattr(torchvision.models, arch)(weights=None)
    result = reference.load_state_dict(ours.state_dict(), strict=False)
    assert set(result.missing_keys) == CLASSIFIER_KEYS[arch]
    assert result.unexpected_keys == []
    if arch == "mobilenet_v2":
        reference.classifier = nn.Identity()
    else:
        reference.fc = nn.Identity()
    reference.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), reference(x))


class CountingBackbone(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls = inner, []

    def forward(self, x):
        self.calls.append(tuple(x.shape))
        return self.inner(x)


def test_multicrop_features_groups_by_resolution():
    torch.manual_seed(0)
    backbone = CountingBackbone(backbones.build_backbone("resnet18").eval())
    B = 2
    crops = [torch.randn(B, 3, 48, 48) for _ in range(2)] + [torch.randn(B, 3, 32, 32) for _ in range(3)]
    with torch.no_grad():
        out = backbones.multicrop_features(backbone, crops)
        assert backbone.calls == [(2 * B, 3, 48, 48), (3 * B, 3, 32, 32)]  # one call per group
        expected = torch.cat([backbone.inner(c) for c in crops])  # view-major order
    assert out.shape == (5 * B, 512)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)
    # Only *consecutive* equal resolutions are grouped.
    backbone.calls = []
    with torch.no_grad():
        backbones.multicrop_features(backbone, [crops[0], crops[2], crops[1]])
    assert len(backbone.calls) == 3


# ----------------------------------------------------------------------------------------------
# Recipes (SSLight's src/config/exp_yamls), written out literally
# ----------------------------------------------------------------------------------------------

DINO_PHOTO = dict(jitter=(0.4, 0.4, 0.2, 0.1), blur_p=(1.0, 0.1, 0.5), solarize_p=0.2)
SWAV_PHOTO = dict(jitter=(0.8, 0.8, 0.8, 0.2), blur_p=(0.5, 0.5, 0.5), solarize_p=0.0)
# (method, arch, recipe): global scale, local scale, global px, local px, #local, (alpha, beta), photometric
SPEC_TABLE = {
    ("dino", "mobilenet_v2", "baseline"): ((0.14, 1.0), (0.05, 0.14), 224, 96, 6, (1 / 7, 6 / 7), DINO_PHOTO),
    ("dino", "mobilenet_v2", "light"): ((0.3, 1.0), (0.05, 0.3), 224, 128, 6, (0.4, 0.6), DINO_PHOTO),
    ("dino", "resnet18", "baseline"): ((0.14, 1.0), (0.05, 0.14), 224, 96, 6, (1 / 7, 6 / 7), DINO_PHOTO),
    ("dino", "resnet18", "light"): ((0.3, 1.0), (0.05, 0.3), 224, 128, 6, (0.4, 0.6), DINO_PHOTO),
    ("dino", "resnet34", "baseline"): ((0.14, 1.0), (0.05, 0.14), 224, 96, 6, (1 / 7, 6 / 7), DINO_PHOTO),
    ("dino", "resnet34", "light"): ((0.3, 1.0), (0.05, 0.3), 224, 128, 6, (0.4, 0.6), DINO_PHOTO),
    ("dino", "vit_tiny", "baseline"): ((0.25, 1.0), (0.05, 0.25), 224, 96, 10, (1 / 11, 10 / 11), DINO_PHOTO),
    ("dino", "vit_tiny", "light"): ((0.3, 1.0), (0.05, 0.3), 224, 128, 10, (0.4, 0.6), DINO_PHOTO),
    ("moco", "mobilenet_v2", "baseline"): ((0.14, 1.0), (0.05, 0.14), 224, 96, 6, (1 / 7, 6 / 7), DINO_PHOTO),
    ("moco", "mobilenet_v2", "light"): ((0.3, 1.0), (0.05, 0.3), 224, 128, 6, (0.4, 0.6), DINO_PHOTO),
    ("swav", "mobilenet_v2", "baseline"): ((0.14, 1.0), (0.05, 0.14), 224, 96, 6, (1 / 7, 6 / 7), SWAV_PHOTO),
    ("swav", "mobilenet_v2", "light"): ((0.3, 1.0), (0.05, 0.3), 224, 128, 6, (0.4, 0.6), SWAV_PHOTO),
}


@pytest.mark.parametrize("key", sorted(SPEC_TABLE))
def test_recipe_matches_spec_table(key):
    method, arch, name = key
    g_scale, l_scale, g_px, l_px, n_local, weights, photo = SPEC_TABLE[key]
    r = views.get_recipe(method, name, backbones.is_vit(arch))
    assert tuple(r.global_scale) == g_scale and tuple(r.local_scale) == l_scale
    assert (r.global_size, r.local_size, r.local_crops) == (g_px, l_px, n_local)
    assert r.alpha_beta == pytest.approx(weights, abs=1e-12)
    assert tuple(r.jitter) == photo["jitter"] and tuple(r.blur_p) == photo["blur_p"]
    assert r.solarize_p == photo["solarize_p"]
    assert (r.flip_p, r.jitter_p, r.grayscale_p) == (0.5, 0.8, 0.2)
    assert r.interpolation == "bicubic"
    specs = views.MultiCropTransform(r).view_specs()
    assert len(specs) == 2 + n_local
    assert [s[0] for s in specs] == [g_px, g_px] + [l_px] * n_local
    assert [s[2] for s in specs] == [photo["blur_p"][0], photo["blur_p"][1]] + [photo["blur_p"][2]] * n_local
    assert [s[3] for s in specs] == [0.0, photo["solarize_p"]] + [0.0] * n_local  # solarize: g2 only


def test_recipe_derived_values_and_overrides():
    assert views.get_recipe("dino", "baseline", local_crops=4).alpha_beta == pytest.approx((1 / 5, 4 / 5))
    assert views.get_recipe("dino", "light", local_crops=4).alpha_beta == (0.4, 0.6)
    assert views.get_recipe("dino", "baseline", global_size=112).local_size == 48
    assert views.get_recipe("dino", "light", global_size=112).local_size == 64
    assert views.get_recipe("dino", "light", True, global_size=112).local_size == 64
    r = views.get_recipe("swav", "light", global_size=112, local_size=40, local_scale=[0.1, 0.2],
                         loss_weights=[0.5, 0.5])
    assert (r.global_size, r.local_size, r.local_scale, r.alpha_beta) == (112, 40, (0.1, 0.2), (0.5, 0.5))
    assert views.get_recipe("dino", "light", local_crops=None).local_crops == 6  # None = no override
    with pytest.raises(views.UserError) as info:
        views.get_recipe("dino", "heavy")
    assert "baseline" in str(info.value) and "light" in str(info.value)
    with pytest.raises(views.UserError) as info:
        views.get_recipe("moco", "heavy")
    assert "classic" in str(info.value)


@pytest.mark.parametrize("weights", [[0.0, 0.0], [-0.1, 1.0], [float("nan"), 1.0],
                                     [float("inf"), 1.0]])
def test_loss_weights_must_be_non_negative_and_not_both_zero(weights, tmp_path):
    """--loss-weights 0 0 once trained a whole epoch at loss 0.0000, and nan passed every check:
    refused before training."""
    with pytest.raises(views.UserError, match="ALPHA BETA .* finite, >= 0 and not both 0"):
        views.get_recipe("dino", "light", loss_weights=weights)
    assert views.get_recipe("dino", "light", loss_weights=[0.0, 1.0]).alpha_beta == (0.0, 1.0)
    import dino  # through a script: a UserError (one line, exit 2) before any folder or step
    with pytest.raises(views.UserError, match="--loss-weights"):
        dino.main(["--loss-weights", *map(str, weights), "--output-dir", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flags", [dict(global_size=100000), dict(local_size=5000),
                                   dict(local_crops=1000)])
def test_view_sizes_and_counts_far_above_any_recipe_are_refused(flags):
    """--global-size 100000 was accepted, to run out of memory in the first batch."""
    with pytest.raises(views.UserError, match="at most|--local-crops must be in"):
        views.get_recipe("dino", "light", **flags)


def test_moco_classic_recipe():
    r = views.get_recipe("moco", "classic")
    assert tuple(r.global_scale) == (0.2, 1.0) and r.local_crops == 0
    assert r.interpolation == "bilinear" and tuple(r.blur_p)[:2] == (0.5, 0.5) and r.solarize_p == 0.0
    out = views.MultiCropTransform(dataclass_replace(r, global_size=32))(random_image(48))
    assert len(out) == 2 and all(v.shape == (3, 32, 32) for v in out)


def dataclass_replace(recipe, **changes):
    import dataclasses
    return dataclasses.replace(recipe, **changes)


# ----------------------------------------------------------------------------------------------
# MultiCropTransform: geometry, per-view probabilities, determinism
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method,vit,name", [("dino", False, "baseline"), ("dino", False, "light"),
                                             ("dino", True, "baseline")])
def test_crop_areas_within_recipe_scales(method, vit, name):
    recipe = views.get_recipe(method, name, vit, global_size=32)
    transform = views.MultiCropTransform(recipe)
    W = 400
    image = Image.new("RGB", (W, W), (120, 80, 40))
    torch.manual_seed(0)
    areas = {"global": [], "local": []}
    for _ in range(60):
        for i, (tensor, info) in enumerate(transform.sample(image)):
            kind = "global" if i < 2 else "local"
            size = recipe.global_size if i < 2 else recipe.local_size
            assert tensor.shape == (3, size, size)
            left, top, w, h = info["box"]
            assert 0 <= left and 0 <= top and left + w <= W and top + h <= W
            areas[kind].append(w * h / (W * W))
    for kind, scale in (("global", recipe.global_scale), ("local", recipe.local_scale)):
        lo, hi = scale
        assert min(areas[kind]) >= lo * 0.97 and max(areas[kind]) <= hi * 1.03, kind
        # and the range is actually used (not a narrower one)
        assert min(areas[kind]) < lo + 0.25 * (hi - lo) and max(areas[kind]) > hi - 0.25 * (hi - lo), kind


def test_full_size_view_shapes():
    torch.manual_seed(0)
    out = views.MultiCropTransform(views.get_recipe("dino", "light"))(random_image(64))
    assert [tuple(v.shape) for v in out] == [(3, 224, 224)] * 2 + [(3, 128, 128)] * 6
    assert all(v.dtype == torch.uint8 for v in out)  # 1 byte per pixel over the wire; normalised on the device


def _check_rate(flags, p, name):
    n, k = len(flags), sum(flags)
    if p in (0.0, 1.0):
        assert k == n * p, f"{name}: {k}/{n}, expected exactly p={p}"
        return
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(k / n - p) <= 4 * sigma, f"{name}: rate {k / n:.3f}, expected {p} +- {4 * sigma:.3f}"


@pytest.mark.parametrize("method,rates", [
    # (blur g1, g2, local), (solarize g1, g2, local)
    ("dino", ((1.0, 0.1, 0.5), (0.0, 0.2, 0.0))),
    ("swav", ((0.5, 0.5, 0.5), (0.0, 0.0, 0.0))),
])
def test_blur_and_solarize_frequencies(method, rates):
    recipe = views.get_recipe(method, "light", global_size=32, local_size=16, local_crops=2)
    transform = views.MultiCropTransform(recipe)
    image = random_image(32)
    torch.manual_seed(1)
    blurred = {"g1": [], "g2": [], "local": []}
    solarized = {"g1": [], "g2": [], "local": []}
    for _ in range(700):
        for i, (_, info) in enumerate(transform.sample(image)):
            kind = ["g1", "g2"][i] if i < 2 else "local"
            blurred[kind].append(info["blurred"])
            solarized[kind].append(info["solarized"])
    for kind, p_blur, p_sol in zip(("g1", "g2", "local"), *rates):
        _check_rate(blurred[kind], p_blur, f"{method} blur {kind}")
        _check_rate(solarized[kind], p_sol, f"{method} solarize {kind}")


def test_flags_match_what_was_done():
    # Solarize: a uniform (200, 50, 30) image comes back as (55, 50, 30) on g2 only.
    recipe = views.get_recipe("dino", "light", global_size=16, local_size=16, local_crops=1, flip_p=0.0,
                              jitter_p=0.0, grayscale_p=0.0, blur_p=(0.0, 0.0, 0.0), solarize_p=1.0)
    torch.manual_seed(0)
    out = views.MultiCropTransform(recipe).sample(Image.new("RGB", (32, 32), (200, 50, 30)))
    colours = [t.float().flatten(1).mean(1).tolist() for t, _ in out]
    assert [info["solarized"] for _, info in out] == [False, True, False]
    assert colours[0] == pytest.approx([200, 50, 30], abs=1) and colours[2] == pytest.approx([200, 50, 30], abs=1)
    assert colours[1] == pytest.approx([55, 50, 30], abs=1)
    # Blur: blurred views of a noise image are smoother than unblurred ones.
    recipe = dataclass_replace(recipe, blur_p=(1.0, 0.0, 0.5), solarize_p=0.0, global_scale=(1.0, 1.0),
                               local_scale=(1.0, 1.0), global_size=32, local_size=32)
    torch.manual_seed(0)
    roughness = {True: [], False: []}
    for _ in range(10):
        for tensor, info in views.MultiCropTransform(recipe).sample(random_image(32)):
            roughness[info["blurred"]].append((tensor[:, :, 1:].float() - tensor[:, :, :-1]).abs().mean().item())
    assert roughness[True] and roughness[False]
    assert max(roughness[True]) < min(roughness[False])


def test_transform_is_deterministic_under_seed():
    transform = views.MultiCropTransform(views.get_recipe("dino", "light", global_size=32, local_crops=2))
    image = random_image(48)

    def run(seed):
        torch.manual_seed(seed)
        return transform(image)

    a, b, c = run(3), run(3), run(4)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


def test_eval_transform_sizes():
    image = random_image(300)
    assert views.eval_transform()(image).shape == (3, 224, 224)
    assert views.eval_transform(112)(image).shape == (3, 112, 112)


def test_views_script_writes_the_picture(tmp_path):
    source = tmp_path / "shape.png"
    views.SyntheticTextures(10, size=96).render(3)[0].save(source)
    out = tmp_path / "views.png"
    result = subprocess.run([sys.executable, os.path.join(REPO, "views.py"), str(source), "--method", "dino",
                             "--compare", "--out", str(out)], cwd=tmp_path, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert out.exists()
    with Image.open(out) as picture:
        picture.load()
        size = picture.size
    row = views.draw_views(Image.open(source), views.get_recipe("dino", "light"))
    assert size[1] == 2 * row.height  # baseline row + light row
    assert size[0] >= row.width


# ----------------------------------------------------------------------------------------------
# Data sets
# ----------------------------------------------------------------------------------------------

def _pixels(image):
    return torch.as_tensor(bytearray(image.tobytes()))


def test_synthetic_textures():
    ds = views.SyntheticTextures(100, size=32)
    # No per-image colour (it would be a better instance cue than the class): two grey levels everywhere.
    grey_levels = {views.SyntheticTextures.BACKGROUND, views.SyntheticTextures.FOREGROUND}
    assert all(set(zip(*[iter(ds[i][0].tobytes())] * 3)) <= grey_levels for i in range(20))
    assert len(ds) == 100 and len(ds.classes) == 10
    labels = [ds[i][1] for i in range(100)]
    assert labels == [i % 10 for i in range(100)]
    assert torch.bincount(torch.tensor(labels)).tolist() == [10] * 10
    assert torch.equal(_pixels(ds[7][0]), _pixels(views.SyntheticTextures(100, size=32)[7][0]))
    assert ds[7][0].size == (32, 32)
    assert not torch.equal(_pixels(ds[7][0]), _pixels(ds[17][0]))  # same class, different image
    assert not torch.equal(_pixels(ds[7][0]), _pixels(ds[8][0]))
    assert not torch.equal(_pixels(ds[7][0]), _pixels(views.SyntheticTextures(100, size=32, seed=1)[7][0]))
    tensor, label = views.SyntheticTextures(10, size=32, transform=torchvision.transforms.ToTensor())[3]
    assert tensor.shape == (3, 32, 32) and label == 3


def _write_images(folder, names, size=8):
    os.makedirs(folder, exist_ok=True)
    for k, name in enumerate(names):
        Image.new("RGB", (size, size), (k % 256, 7, 9)).save(os.path.join(folder, name))


def test_image_files_layouts(tmp_path):
    root = tmp_path / "folder"
    _write_images(root / "cat", ["a.png", "b.jpg"])
    _write_images(root / "dog", ["c.png"])
    (root / "dog" / "notes.txt").write_text("not an image")
    ds = views.ImageFiles(str(root))
    assert ds.classes == ["cat", "dog"]
    assert [label for _, label in ds.samples] == [0, 0, 1]
    assert [os.path.basename(p) for p, _ in ds.samples] == ["a.png", "b.jpg", "c.png"]
    image, label = ds[2]
    assert isinstance(image, Image.Image) and label == 1

    flat = tmp_path / "flat"
    _write_images(flat, ["x.png", "y.jpeg"])
    (flat / "notes.txt").write_text("not an image")
    ds = views.ImageFiles(str(flat), transform=torchvision.transforms.ToTensor())
    assert len(ds) == 2 and [ds[i][1] for i in range(2)] == [0, 0]
    assert ds[0][0].shape == (3, 8, 8)


def test_image_files_missing_and_empty(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(views.UserError) as info:
        views.ImageFiles(str(missing))
    assert str(missing) in str(info.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not an image")
    with pytest.raises(views.UserError, match="no image files"):
        views.ImageFiles(str(empty))


def test_image_files_skips_one_corrupt_image(tmp_path):
    root = tmp_path / "imgs"
    _write_images(root, [f"img_{k:03d}.png" for k in range(200)])
    (root / "img_050_bad.jpg").write_bytes(b"this is not a jpeg")
    ds = views.ImageFiles(str(root))
    assert len(ds) == 201
    bad = [os.path.basename(p) for p, _ in ds.samples].index("img_050_bad.jpg")
    with pytest.warns(UserWarning, match="img_050_bad.jpg"):
        image, _ = ds[bad]
    assert torch.equal(_pixels(image), _pixels(ds[bad + 1][0]))  # the next image instead
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once only, then silently skipped
        ds[bad]
        for i in range(len(ds)):
            ds[i]


def test_image_files_too_many_corrupt_images(tmp_path):
    root = tmp_path / "imgs"
    _write_images(root, [f"img_{k:03d}.png" for k in range(200)])
    for k in range(5):
        (root / f"bad_{k}.jpg").write_bytes(b"garbage")
    ds = views.ImageFiles(str(root))
    with warnings.catch_warnings(), pytest.raises(views.UserError, match="1%"):
        warnings.simplefilter("ignore")
        for i in range(len(ds)):
            ds[i]


def test_build_dataset(tmp_path, monkeypatch):
    train, val = views.build_eval_datasets("synthetic", None)
    assert isinstance(train, views.SyntheticTextures) and (len(train), len(val)) == (640, 500)
    assert not torch.equal(_pixels(train[0][0]), _pixels(val[0][0]))
    _write_images(tmp_path / "ev" / "train" / "a", ["1.png"])
    _write_images(tmp_path / "ev" / "val" / "a", ["2.png"])
    train, val = views.build_eval_datasets(str(tmp_path / "ev"), None)
    assert (len(train), len(val)) == (1, 1)
    assert isinstance(views.build_dataset(str(tmp_path / "ev" / "train")), views.ImageFiles)

    # CIFAR-10 not in ./data and no network: a clear error telling how to get it. The download is
    # replaced by an offline failure so that the test never downloads anything.
    monkeypatch.chdir(tmp_path)
    calls = []

    def offline(url, root, **kwargs):
        calls.append((url, root))
        raise urllib.error.URLError("offline")

    monkeypatch.setattr(torchvision.datasets.cifar, "download_and_extract_archive", offline)
    with pytest.raises(views.UserError) as info:
        views.build_dataset("cifar10")
    assert calls and calls[0][1] == "data"
    message = str(info.value)
    assert "cifar10" in message and "internet" in message and "ImageFolder" in message
    calls.clear()  # download=False (every rank but 0 under torchrun) never tries to download
    with pytest.raises(views.UserError):
        views.build_dataset("cifar10", download=False)
    assert calls == []


def test_decompression_bombs_are_skipped_and_named(tmp_path, monkeypatch):
    root = tmp_path / "imgs"
    _write_images(root, [f"img_{k:03d}.png" for k in range(200)])
    Image.new("RGB", (64, 64)).save(root / "img_100_huge.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 64 x 64 > 2 x 1000: PIL raises DecompressionBombError
    ds = views.ImageFiles(str(root))
    bomb = [os.path.basename(p) for p, _ in ds.samples].index("img_100_huge.png")
    with pytest.warns(UserWarning, match="img_100_huge.png"):
        image, _ = ds[bomb]
    assert image.size == (8, 8)  # the next image instead


def test_bad_image_count_is_per_run_across_loader_processes(tmp_path):
    """3 distinct bad files of 203 (more than 1%): with 3 loader processes each sees one only, yet the run stops,
    as it does with --workers 0, because the count lives in shared memory."""
    root = tmp_path / "imgs"
    _write_images(root, [f"img_{k:03d}.png" for k in range(200)])
    for k in range(3):
        (root / f"img_{60 * k + 10:03d}_bad.jpg").write_bytes(b"garbage")
    ds = views.ImageFiles(str(root), transform=torchvision.transforms.PILToTensor())
    bad = [i for i, (p, _) in enumerate(ds.samples) if p.endswith("_bad.jpg")]
    order = torch.utils.data.Subset(ds, bad + list(range(len(ds))))  # worker w gets batch w: one bad file each
    batches = iter(torch.utils.data.DataLoader(order, batch_size=1, num_workers=3))
    with warnings.catch_warnings(), pytest.raises(views.UserError, match="1%"):
        warnings.simplefilter("ignore")
        for _ in batches:
            pass
    for worker in batches._workers:  # stopped now: left to the garbage collector, their join takes 3 x 5 s
        worker.terminate()


def test_device_normalisation_equals_the_float_pipeline():
    """uint8 crops normalised on the device = ToTensor + Normalize in the worker, for the same crop parameters."""
    recipe = views.get_recipe("dino", "light", global_size=32, local_crops=2)
    image = random_image(48)
    torch.manual_seed(5)
    uint8_views = views.MultiCropTransform(recipe)(image)
    torch.manual_seed(5)
    normalise = torchvision.transforms.Normalize(views.IMAGENET_MEAN, views.IMAGENET_STD)
    float_views = [normalise(v.float() / 255) for v in views.MultiCropTransform(recipe)(image)]
    for u, f in zip(uint8_views, float_views):
        torch.testing.assert_close(views.normalize(u[None], "cpu")[0], f, atol=1e-5, rtol=1e-5)
    reference = torchvision.transforms.Compose([torchvision.transforms.ToTensor(), normalise])
    pil = torchvision.transforms.functional.to_pil_image(uint8_views[0])
    torch.testing.assert_close(views.normalize(uint8_views[0][None], "cpu")[0], reference(pil), atol=1e-5, rtol=1e-5)
    out = views.normalize(torch.stack(uint8_views[:2]), "cpu", torch.channels_last)
    assert out.dtype == torch.float32 and out.is_contiguous(memory_format=torch.channels_last)


def test_device_facts_of_the_archs():
    assert backbones.is_vit("vit_tiny") and not backbones.is_vit("resnet18")
    assert backbones.memory_format("resnet18", "cuda") == torch.channels_last
    assert backbones.memory_format("vit_tiny", "cuda") == torch.contiguous_format
    assert backbones.memory_format("resnet18", "cpu") == torch.contiguous_format
    assert backbones.memory_format("mobilenet_v2", "cpu") == torch.channels_last  # measured faster on the CPU
    model = backbones.build_backbone("resnet18")
    assert backbones.sync_batchnorm(model, "cpu", 2) is model  # SyncBatchNorm needs CUDA
    assert backbones.sync_batchnorm(model, "cuda", 1) is model  # one process: nothing to sync
    synced = backbones.sync_batchnorm(model, "cuda", 2)  # converted, not run (no GPU here)
    assert any(isinstance(m, nn.SyncBatchNorm) for m in synced.modules())


def test_recipe_from_flags_checks_vit_patches_for_every_method():
    import argparse
    flags = argparse.Namespace(recipe="light", global_size=32, local_size=None, local_crops=None, global_scale=None,
                               local_scale=None, loss_weights=None)
    for method in ("dino", "moco", "swav"):
        with pytest.raises(views.UserError, match="multiples of its 16 px patches, not 32 / 18 px"):
            views.recipe_from_flags(method, flags, vit=True)
        recipe = views.recipe_from_flags(method, flags)  # a CNN takes any size
        resolved = views.resolved_view_flags(recipe)
        assert views.recipe_from_flags(method, argparse.Namespace(recipe="light", **resolved)) == recipe
