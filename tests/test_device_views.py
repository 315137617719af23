"""views.py's device view sampler (--views-on gpu), on the CPU: box distributions against torchvision's
RandomResizedCrop, per-view frequencies, each photometric op against torchvision's functional op, the crop
against TF.resized_crop, the whole pipeline against torchvision ops applied in the recorded order, determinism."""
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms as T
import torchvision.transforms.functional as TF

import views
import views as dv

RATIO = (3 / 4, 4 / 3)


def smooth_image(h, w, cells=8, seed=0):
    """uint8 (3, h, w): bicubically enlarged noise, so that interpolation errors stay small and comparable."""
    noise = torch.rand(1, 3, cells, cells, generator=torch.Generator().manual_seed(seed))
    return (F.interpolate(noise, size=(h, w), mode="bicubic", align_corners=False)[0].clamp(0, 1) * 255).round().byte()


def ks_distance(a, b):
    """Two-sample Kolmogorov-Smirnov statistic: the largest gap between the two empirical CDFs."""
    grid = torch.cat([a, b]).sort().values
    cdf = lambda s: torch.searchsorted(s.sort().values.contiguous(), grid, right=True) / len(s)
    return (cdf(a) - cdf(b)).abs().max().item()


def ks_limit(n, m):
    return 1.95 * math.sqrt((n + m) / (n * m))  # rejects equal distributions with probability 0.001


def tiny(recipe, **changes):
    """The recipe at 16 px global / 8 px local crops, so that thousands of views take a moment."""
    return dataclasses.replace(recipe, global_size=16, local_size=8, **changes)


def test_collate_pads_with_edges_and_keeps_true_sizes():
    images = [smooth_image(20, 30, seed=1), smooth_image(25, 18, seed=2), smooth_image(8, 8, seed=3)]
    batch, sizes, labels = dv.collate_images(list(zip(images, [3, 1, 4])))
    assert batch.shape == (3, 3, 25, 30) and batch.dtype == torch.uint8
    assert sizes.tolist() == [[20, 30], [25, 18], [8, 8]] and labels.tolist() == [3, 1, 4]
    for image, padded, (h, w) in zip(images, batch, sizes.tolist()):
        assert torch.equal(padded[:, :h, :w], image)
        assert torch.equal(padded[:, :h, w:], image[:, :, -1:].expand(-1, -1, 30 - w))  # last column repeated
        assert torch.equal(padded[:, h:], padded[:, h - 1:h].expand(-1, 25 - h, -1))  # last row repeated


@pytest.mark.parametrize("scale", [(0.3, 1.0), (0.05, 0.3)])
def test_boxes_follow_torchvision_random_resized_crop(scale):
    """Area fraction, aspect ratio and position of the boxes, one padded batch of 4 image shapes (square, wide,
    tall, very tall = often torchvision's fallback), against T.RandomResizedCrop.get_params."""
    shapes, n = [(112, 112), (80, 150), (150, 80), (200, 60)], 3000
    sizes = torch.tensor(shapes).repeat_interleave(n, 0)
    boxes = dv.crop_boxes(sizes, scale, generator=torch.Generator().manual_seed(0))
    left, top, w, h = boxes.unbind(1)
    height, width = sizes.float().unbind(1)
    assert (left >= 0).all() and (top >= 0).all() and (left + w <= width).all() and (top + h <= height).all()
    assert (boxes == boxes.round()).all() and (w >= 1).all() and (h >= 1).all()
    torch.manual_seed(0)
    for k, (H, W) in enumerate(shapes):
        ref = torch.tensor([T.RandomResizedCrop.get_params(torch.empty(1, H, W), scale, RATIO) for _ in range(n)],
                           dtype=torch.float)  # (top, left, h, w)
        mine = boxes[k * n:(k + 1) * n]
        pairs = {"area": (mine[:, 2] * mine[:, 3] / (H * W), ref[:, 2] * ref[:, 3] / (H * W)),
                 "log aspect": ((mine[:, 2] / mine[:, 3]).log(), (ref[:, 3] / ref[:, 2]).log()),
                 "left": (mine[:, 0], ref[:, 1]), "top": (mine[:, 1], ref[:, 0])}
        for name, (a, b) in pairs.items():
            assert ks_distance(a, b) < ks_limit(n, n), f"{(H, W)} {name}: KS {ks_distance(a, b):.3f}"
        if (H, W) == (112, 112):  # no fallback here: the area spans the scale range, the ratio is log-uniform
            area, log_aspect = pairs["area"][0], pairs["log aspect"][0]
            rounding = 2 * 1.5 / math.sqrt(scale[0] * H * W)  # relative area change from rounding w and h
            assert scale[0] * (1 - rounding) <= area.min() < scale[0] * (1 + rounding)
            assert scale[1] * (1 - rounding) < area.max() <= scale[1] * (1 + rounding)
            assert abs(log_aspect.mean()) < 4 * math.log(4 / 3) / math.sqrt(3 * n) + 0.01
            assert log_aspect.abs().max() < math.log(4 / 3) + rounding


def test_fallback_is_torchvision_centre_crop():
    for H, W in [(300, 40), (40, 300), (50, 50)]:
        scale = (0.3, 1.0) if H != W else (1.0, 1.0)
        box = dv.crop_boxes(torch.tensor([[H, W]]), scale)[0].tolist()
        top, left, h, w = T.RandomResizedCrop.get_params(torch.empty(1, H, W), scale, RATIO)
        assert box == [left, top, w, h]


def test_views_stay_inside_each_image_of_a_padded_batch():
    images = [smooth_image(*shape, seed=k) for k, shape in enumerate([(40, 60), (64, 30), (20, 20), (90, 90)])]
    batch, sizes, _ = dv.collate_images([(image, 0) for image in images])
    sampler = dv.DeviceMultiCrop(views.get_recipe("dino", "light", global_size=32))
    for _ in range(20):
        for view, info in sampler.sample(batch, sizes):
            left, top, w, h = info["box"].unbind(1)
            assert (left >= 0).all() and (top >= 0).all()
            assert (left + w <= sizes[:, 1]).all() and (top + h <= sizes[:, 0]).all()


def test_crop_matches_resized_crop():
    """roi_align (aligned, adaptive sub-samples) against TF.resized_crop(bilinear, antialias) on a tensor, and
    a crop from a padded batch against the same crop of the image alone."""
    image = smooth_image(120, 100)
    crop = lambda source, box, size: dv.resized_crops(source, torch.tensor([0]), torch.tensor([box], dtype=torch.float),
                                                      size)[0]
    for box in [(0, 0, 100, 120), (10, 5, 60, 70), (30, 40, 25, 20), (50, 70, 50, 50), (3, 7, 97, 113)]:
        left, top, w, h = box
        for size in (112, 64, 32):
            mine = crop(image[None], box, size)
            ref = TF.resized_crop(image.float(), top, left, h, w, [size, size], T.InterpolationMode.BILINEAR,
                                  antialias=True)
            assert (mine - ref).abs().mean() < 1.0, (box, size)  # of 255: the filters differ when shrinking
            if size >= max(w, h):  # enlarging: plain bilinear, equal but within half a source pixel of the border
                m = math.ceil(0.5 * size / min(w, h))  # where roi_align reads beyond the box, resized_crop clamps
                assert (mine - ref)[:, m:-m, m:-m].abs().max() < 1e-3
            padded, _, _ = dv.collate_images([(image, 0), (smooth_image(150, 140, seed=5), 0)])
            assert (crop(padded[:1], box, size) - mine).abs().max() < 1e-3  # the padding is never read
    # geometry: on a ramp (value = column), output column j samples column left + (j + 0.5) * w / size - 0.5
    ramp = torch.arange(100.0).expand(3, 50, 100)
    out = crop(ramp[None], (20, 10, 48, 30), 16)[0, 0]
    assert torch.allclose(out, 20 + (torch.arange(16) + 0.5) * 48 / 16 - 0.5, atol=1e-4)


def test_each_photometric_op_equals_torchvision():
    """Same factor, same result as torchvision.transforms.functional's tensor op (float in [0, 1]):
    blends, grayscale, solarize, blur within 1e-5, hue within 1e-5 (HSV -> RGB in closed form)."""
    x = torch.randint(0, 256, (8, 3, 20, 24), generator=torch.Generator().manual_seed(0)).byte()
    x[:, :, :3] = 128  # grey pixels (no hue)
    x[:, 1, 3:6] = x[:, 0, 3:6]  # ties between the largest channels
    x = x.float() / 255
    cases = [(dv.adjust_brightness, TF.adjust_brightness, torch.linspace(0.6, 1.4, 8)),
             (dv.adjust_contrast, TF.adjust_contrast, torch.linspace(0.0, 1.8, 8)),
             (dv.adjust_saturation, TF.adjust_saturation, torch.linspace(0.0, 1.8, 8)),
             (dv.adjust_hue, TF.adjust_hue, torch.linspace(-0.5, 0.5, 8)),
             (lambda x, s: dv.gaussian_blur(x, s), lambda x, s: TF.gaussian_blur(x, [13, 13], [s, s]),
              torch.linspace(0.1, 2.0, 8))]
    for mine, theirs, factors in cases:
        ref = torch.stack([theirs(image, f.item()) for image, f in zip(x, factors)])
        assert (mine(x, factors) - ref).abs().max() < 1e-5, theirs.__name__
    assert (dv.rgb_to_grayscale(x) - TF.rgb_to_grayscale(x)).abs().max() < 1e-6
    assert torch.equal(dv.solarize(x), TF.solarize(x, 128 / 255))
    assert dv.gaussian_blur(x[:0], torch.ones(0)).shape == (0, 3, 20, 24)


@pytest.mark.parametrize("method", ["dino", "swav"])
def test_per_view_frequencies(method):
    """Each view's blur / solarize and every view's grayscale / jitter / flip rates within 4 sigma of the
    recipe's; sigma ~ U(0.1, 2.0); jitter factors in torchvision's ranges and its 4 ops in a uniform order."""
    recipe = views.get_recipe(method, "light")
    n = 2000
    views_info = [info for _, info in dv.DeviceMultiCrop(tiny(recipe)).sample(
        torch.zeros(n, 3, 24, 24, dtype=torch.uint8), generator=torch.Generator().manual_seed(1))]
    assert len(views_info) == 2 + recipe.local_crops
    blur_p = [recipe.blur_p[0], recipe.blur_p[1]] + [recipe.blur_p[2]] * recipe.local_crops
    solarize_p = [0.0, recipe.solarize_p] + [0.0] * recipe.local_crops
    close = lambda mask, p: abs(mask.float().mean().item() - p) <= 4 * math.sqrt(p * (1 - p) / n)
    for k, info in enumerate(views_info):
        assert close(info["blurred"], blur_p[k]) and close(info["solarized"], solarize_p[k]), k
        assert close(info["grayscale"], recipe.grayscale_p) and close(info["jittered"], recipe.jitter_p), k
        assert close(info["flipped"], recipe.flip_p), k
        sigma = info["sigma"]
        assert 0.1 <= sigma.min() and sigma.max() <= 2.0 and abs(sigma.mean() - 1.05) < 4 * 1.9 / math.sqrt(12 * n)
        b, c, s, h = recipe.jitter
        low = torch.tensor([max(0, 1 - b), max(0, 1 - c), max(0, 1 - s), -h])
        high = torch.tensor([1 + b, 1 + c, 1 + s, h])
        factors = info["factors"]
        assert (factors >= low).all() and (factors <= high).all()
        assert ((factors - low) / (high - low)).mean(0).sub(0.5).abs().max() < 4 / math.sqrt(12 * n)
        order = info["order"]
        assert torch.equal(order.sort(1).values, torch.arange(4).expand(n, 4))  # a permutation per image
        for step in range(4):
            assert all(close(order[:, step] == op, 0.25) for op in range(4))


def test_pipeline_applies_the_recorded_ops_in_order():
    """Rebuild every view of a padded batch from its record with torchvision's own functional ops (hflip,
    adjust_* in the recorded order, rgb_to_grayscale, gaussian_blur, solarize, normalize)."""
    images = [smooth_image(*shape, seed=k) for k, shape in enumerate([(40, 60), (64, 30), (30, 30), (50, 50)] * 2)]
    batch, sizes, _ = dv.collate_images([(image, 0) for image in images])
    recipe = dataclasses.replace(views.get_recipe("dino", "light", global_size=24), solarize_p=0.5)
    ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    sampled = dv.DeviceMultiCrop(recipe).sample(batch, sizes, torch.Generator().manual_seed(3))
    for name in ("flipped", "jittered", "grayscale", "blurred", "solarized"):  # every branch is exercised
        assert 0 < sum(info[name].sum() for _, info in sampled) < len(sampled) * len(images), name
    for view, info in sampled:
        for i, image in enumerate(images):
            left, top, w, h = info["box"][i].tolist()
            x = dv.resized_crops(image[None], torch.tensor([0]), info["box"][i:i + 1], view.shape[-1])[0] / 255
            if info["flipped"][i]:
                x = TF.hflip(x)
            if info["jittered"][i]:
                for op in info["order"][i].tolist():
                    x = ops[op](x, info["factors"][i, op].item())
            if info["grayscale"][i]:
                x = TF.rgb_to_grayscale(x, num_output_channels=3)
            if info["blurred"][i]:
                x = TF.gaussian_blur(x, [13, 13], [info["sigma"][i].item()] * 2)
            if info["solarized"][i]:
                x = TF.solarize(x, 128 / 255)
            assert (view[i] - TF.normalize(x, views.IMAGENET_MEAN, views.IMAGENET_STD)).abs().max() < 1e-4


def test_output_shapes_dtype_and_normalisation_match_the_pil_path():
    """A plain colour with every photometric op off: the device views equal views.normalize(PIL-path views)."""
    recipe = dataclasses.replace(views.get_recipe("dino", "light", global_size=32), flip_p=0, jitter_p=0,
                                 grayscale_p=0, blur_p=(0, 0, 0), solarize_p=0)
    colour = torch.tensor([200, 30, 90], dtype=torch.uint8).view(3, 1, 1).expand(3, 40, 50)
    out = dv.DeviceMultiCrop(recipe)(colour.expand(4, -1, -1, -1).contiguous())
    pil = views.MultiCropTransform(recipe)(TF.to_pil_image(colour))
    assert len(out) == len(pil) == 2 + recipe.local_crops
    for mine, theirs in zip(out, pil):
        assert mine.dtype == torch.float32 and mine.shape == (4, *theirs.shape)
        assert (mine - views.normalize(theirs[None], "cpu")).abs().max() < 1e-5
    classic = dv.DeviceMultiCrop(views.get_recipe("moco", "classic", global_size=32))  # no local crops
    channels_last = classic(colour[None].contiguous(), memory_format=torch.channels_last)
    assert len(channels_last) == 2 and channels_last[0].is_contiguous(memory_format=torch.channels_last)


def test_seeded_generator_is_deterministic():
    batch, sizes, _ = dv.collate_images([(smooth_image(40, 60), 0), (smooth_image(50, 30, seed=1), 1)])
    sampler = dv.DeviceMultiCrop(views.get_recipe("dino", "light", global_size=32))
    run = lambda seed: sampler(batch, sizes, torch.Generator().manual_seed(seed))
    first, again, other = run(7), run(7), run(8)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(torch.equal(a, b) for a, b in zip(first, other))


def test_prefetcher_passes_batches_through_off_cuda():
    batches = [([torch.full((2, 3, 4, 4), k, dtype=torch.uint8)], torch.tensor([k, k])) for k in range(3)]
    prefetched = list(views.Prefetcher(batches, torch.device("cpu")))
    assert len(views.Prefetcher(batches, torch.device("cpu"))) == 3
    assert [b is a for a, b in zip(batches, prefetched)] == [True] * 3


def test_prefetcher_copies_the_next_batch_before_handing_out_the_current(monkeypatch):
    """The CUDA path's order, with the CUDA calls recorded instead of run: batch i + 1's copy is issued on the
    side stream before batch i is handed out, and batch i is handed out only after the default stream waited
    for the copies and every tensor of it was recorded on the default stream."""
    events = []

    class FakeTensor:
        def __init__(self, name, on_device=False):
            self.name, self.on_device = name, on_device

        def to(self, device, non_blocking=False):
            events.append(("copy", self.name, torch.cuda.is_side_stream, non_blocking))
            return FakeTensor(self.name, on_device=True)

        def record_stream(self, stream):
            events.append(("record", self.name, stream))

    class FakeStream:
        def wait_stream(self, other):
            events.append(("wait", other))

    side, compute = object(), FakeStream()

    class StreamContext:
        def __init__(self, stream):
            assert stream is side

        def __enter__(self):
            torch.cuda.is_side_stream = True

        def __exit__(self, *exc):
            torch.cuda.is_side_stream = False

    monkeypatch.setattr(torch.cuda, "is_side_stream", False, raising=False)
    monkeypatch.setattr(torch.cuda, "Stream", lambda device: side)
    monkeypatch.setattr(torch.cuda, "stream", StreamContext)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device: compute)
    loader = [([FakeTensor(f"crops{k}")], FakeTensor(f"labels{k}")) for k in range(3)]
    out = []
    for crops, labels in views.Prefetcher(loader, torch.device("cuda")):
        assert crops[0].on_device and labels.on_device
        events.append(("step", crops[0].name))
        out.append(labels.name)
    assert out == ["labels0", "labels1", "labels2"]
    copy = lambda k: [("copy", f"crops{k}", True, True), ("copy", f"labels{k}", True, True)]
    ready = lambda k: [("wait", side), ("record", f"crops{k}", compute), ("record", f"labels{k}", compute)]
    assert events == (copy(0) + copy(1) + ready(0) + [("step", "crops0")] + copy(2) + ready(1)
                      + [("step", "crops1")] + ready(2) + [("step", "crops2")])
