"""views.py's device view sampler (--views-on device), on the CPU: box distributions against torchvision's
RandomResizedCrop, per-view frequencies, each photometric op against torchvision's functional op, the crop
against TF.resized_crop, the whole pipeline against torchvision ops applied in the recorded order, determinism,
no host sync; and the prefetcher's order. Marked cuda (skipped without a GPU): the same on CUDA."""
import collections
import dataclasses
import math

import PIL.ImageFile
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image

import views
import views as dv

RATIO = (3 / 4, 4 / 3)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
CUDA = pytest.param("cuda", marks=[pytest.mark.cuda, needs_cuda])


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


def test_big_jpegs_are_decoded_small_so_that_a_batch_is_bounded(tmp_path, monkeypatch):
    """--views-on device at 224 px: the loader decodes every image to at most 512 px on its longer
    side, so a batch with a 2,400 x 1,800 and a 5,000 x 4,000 JPEG is at most B x 3 x 512 x 512
    bytes (it was B x 3 x 4,000 x 5,000). The JPEG decoder itself works at 1/2 and 1/4 scale, the
    picture keeps its aspect and content; images handed over decoded are capped too, and the
    loader path (the paper's) still gets the full-size image."""
    shapes = [(2400, 1800), (5000, 4000), (500, 375), (300, 200), (375, 500)]  # (w, h)
    for k, (w, h) in enumerate(shapes):
        image = Image.new("RGB", (w, h), (220, 20, 20))
        image.paste((20, 20, 220), (w // 2, 0, w, h))  # left half red, right half blue
        image.save(tmp_path / f"{k}.jpg", quality=90)
    transform, collate, _ = views.view_pipeline(views.get_recipe("dino", "light"), "device")
    decoded, load = {}, PIL.ImageFile.ImageFile.load  # path: size decoded at
    monkeypatch.setattr(PIL.ImageFile.ImageFile, "load",
                        lambda image: decoded.update({image.filename: image.size}) or load(image))
    dataset = views.ImageFiles(str(tmp_path), transform)
    images, sizes, _ = collate([dataset[k] for k in range(len(shapes))])
    assert images.dtype == torch.uint8 and images.numel() <= len(shapes) * 3 * 512 * 512
    assert sizes.tolist() == [[384, 512], [410, 512], [375, 500], [200, 300], [500, 375]]
    assert list(decoded.values()) == [(1200, 900), (1250, 1000)] + shapes[2:]
    for image, (h, w) in zip(images.int(), sizes.tolist()):
        left, right = image[:, :h, :w // 2 - 2], image[:, :h, w // 2 + 2:w]
        assert (left - torch.tensor([220, 20, 20]).view(3, 1, 1)).abs().max() <= 6
        assert (right - torch.tensor([20, 20, 220]).view(3, 1, 1)).abs().max() <= 6
    assert transform(Image.new("RGB", (1000, 600))).shape == (3, 307, 512)
    assert views.ImageFiles(str(tmp_path))[0][0].size == (2400, 1800)
    recipe_112 = views.get_recipe("dino", "light", global_size=112)
    assert views.view_pipeline(recipe_112, "device")[0].max_side == 256


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


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("method", ["dino", "swav"])
def test_per_view_frequencies(method, device):
    """Each view's blur / solarize and every view's grayscale / jitter / flip rates within 4 sigma of the
    recipe's; sigma ~ U(0.1, 2.0); jitter factors in torchvision's ranges and its 4 ops in a uniform order.
    On CUDA too, drawn there by a CUDA generator."""
    recipe = views.get_recipe(method, "light")
    n = 2000
    sampled = dv.DeviceMultiCrop(tiny(recipe)).sample(
        torch.zeros(n, 3, 24, 24, dtype=torch.uint8, device=device),
        generator=torch.Generator(device).manual_seed(1))
    views_info = [{key: value.cpu() for key, value in info.items()} for _, info in sampled]
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


SYNCS = ("aten::nonzero", "aten::_local_scalar_dense", "aten::item", "aten::is_nonzero")


def aten_ops(fn):
    """How often `fn` runs each aten op, by name (CPU profiler)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        fn()
    return collections.Counter(e.name for e in profile.events() if e.name.startswith("aten::"))


def test_device_views_never_make_the_host_wait():
    """Once the constants are made, no op that makes the host wait for the device (boolean-mask indexing
    = aten::nonzero, .item(), `if tensor:`) and no tensor made from Python numbers (aten::lift_fresh, a
    blocking host-to-device copy); and the same ops for 4 images as for 16. Likewise for normalize."""
    sampler = dv.DeviceMultiCrop(views.get_recipe("dino", "light", global_size=16))
    for with_sizes in (True, False):
        counts = []
        for n in (4, 16):
            images = torch.zeros(n, 3, 24, 20, dtype=torch.uint8)
            sizes = torch.tensor([[24, 20], [20, 12]]).repeat(n // 2, 1) if with_sizes else None
            sampler(images, sizes)
            counts.append(aten_ops(lambda: sampler(images, sizes)))
        assert all(counts[0][name] == 0 for name in SYNCS + ("aten::lift_fresh",)), counts[0]
        assert counts[0] == counts[1]
    images = torch.zeros(4, 3, 8, 8, dtype=torch.uint8)
    views.normalize(images, "cpu")
    assert aten_ops(lambda: views.normalize(images, "cpu"))["aten::lift_fresh"] == 0


@pytest.mark.cuda
@needs_cuda
def test_device_views_on_cuda_never_synchronize():
    """CUDA's sync debug mode, set to raise, sees no synchronising call once the constants are made:
    with and without sizes, and in normalize from a pinned batch."""
    sampler = dv.DeviceMultiCrop(views.get_recipe("dino", "light", global_size=32))
    images = torch.randint(0, 256, (8, 3, 48, 40), dtype=torch.uint8, device="cuda")
    sizes = torch.tensor([[48, 40], [30, 20]], device="cuda").repeat(4, 1)
    pinned = torch.zeros(8, 3, 16, 16, dtype=torch.uint8).pin_memory()
    run = lambda: (sampler(images, sizes), sampler(images), views.normalize(pinned, "cuda"))
    run()
    torch.cuda.set_sync_debug_mode("error")
    try:
        run()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


@pytest.mark.cuda
@needs_cuda
def test_cuda_views_equal_the_cpu_views_for_the_same_draws(monkeypatch):
    """The random choices drawn once (on the CPU), then applied on the CPU and on CUDA: the same views.
    TF32 is off, so that the blur is float32 on both. Float rounding may still move a pixel across the
    solarize threshold: by 2 * 128/255 - 1 = 0.004, 0.02 after normalisation, hence the largest gap."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    images = [smooth_image(*shape, seed=k) for k, shape in enumerate([(40, 60), (64, 30), (30, 30), (50, 50)])]
    batch, sizes, _ = dv.collate_images([(image, 0) for image in images])
    recipe = dataclasses.replace(views.get_recipe("dino", "light", global_size=24), solarize_p=0.5)
    sampler = dv.DeviceMultiCrop(recipe)
    drawn = sampler.draw(sizes, torch.Generator().manual_seed(3))
    on_cpu = sampler.apply(batch, drawn)
    on_cuda = sampler.apply(batch.cuda(), [{key: value.cuda() for key, value in d.items()} for d in drawn])
    assert len(on_cuda) == len(on_cpu) == 2 + recipe.local_crops
    for (mine, _), (theirs, _) in zip(on_cuda, on_cpu):
        assert mine.is_cuda and mine.shape == theirs.shape
        gap = (mine.cpu() - theirs).abs()
        assert gap.max() < 0.02 and gap.mean() < 1e-4


def test_prefetcher_passes_batches_through_off_cuda():
    batches = [([torch.full((2, 3, 4, 4), k, dtype=torch.uint8)], torch.tensor([k, k])) for k in range(3)]
    prefetched = list(views.Prefetcher(batches, torch.device("cpu")))
    assert len(views.Prefetcher(batches, torch.device("cpu"))) == 3
    assert [b is a for a, b in zip(batches, prefetched)] == [True] * 3


@pytest.fixture
def fake_cuda(monkeypatch):
    """The CUDA calls the prefetcher makes, recorded instead of run: -> (the record, a tensor class
    whose .to and .record_stream are recorded, the default stream)."""
    record = []

    class FakeTensor(torch.Tensor):
        def __new__(cls, tag, on_device=False):
            tensor = torch.Tensor._make_subclass(cls, torch.empty(0))
            tensor.tag, tensor.on_device = tag, on_device
            return tensor

        def to(self, device, non_blocking=False):
            record.append(("copy", self.tag, torch.cuda.is_side_stream, non_blocking))
            return FakeTensor(self.tag, on_device=True)

        def record_stream(self, stream):
            record.append(("record", self.tag, stream))

    class SideStream:
        def record_event(self):
            event = f"event{sum(entry[0] == 'event' for entry in record)}"
            record.append(("event", event))
            return event

    class ComputeStream:
        def wait_event(self, event):
            record.append(("wait", event))

        def wait_stream(self, stream):
            record.append(("wait for the whole stream", stream))

    side, compute = SideStream(), ComputeStream()

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
    return record, FakeTensor, compute


def test_prefetcher_copies_the_next_batch_before_handing_out_the_current(fake_cuda):
    """The CUDA path's order: batch i + 1's copies are issued on the side stream, then an event recorded
    after them, before batch i is handed out; batch i is handed out only after the default stream waited
    for batch i's event (not for the side stream, which by then also holds batch i + 1's copies) and
    every tensor of it was recorded on the default stream."""
    events, FakeTensor, compute = fake_cuda
    loader = [([FakeTensor(f"crops{k}")], FakeTensor(f"labels{k}")) for k in range(3)]
    out = []
    for crops, labels in views.Prefetcher(loader, torch.device("cuda")):
        assert crops[0].on_device and labels.on_device
        events.append(("step", crops[0].tag))
        out.append(labels.tag)
    assert out == ["labels0", "labels1", "labels2"]
    copy = lambda k: [("copy", f"crops{k}", True, True), ("copy", f"labels{k}", True, True),
                      ("event", f"event{k}")]
    ready = lambda k: [("wait", f"event{k}"), ("record", f"crops{k}", compute),
                       ("record", f"labels{k}", compute)]
    assert events == (copy(0) + copy(1) + ready(0) + [("step", "crops0")] + copy(2) + ready(1)
                      + [("step", "crops1")] + ready(2) + [("step", "crops2")])


def test_prefetcher_passes_leaves_that_are_not_tensors_through(fake_cuda):
    """Strings, ints and None in a batch are handed out as they are, off CUDA and on (where only the
    tensors are copied and recorded)."""
    batches = [(torch.zeros(2), ["a.png", "b.png"], [k, None]) for k in range(2)]
    assert [b is a for a, b in zip(batches, views.Prefetcher(batches, torch.device("cpu")))] == [True] * 2
    events, FakeTensor, compute = fake_cuda
    loader = [(FakeTensor(f"images{k}"), ["a.png", "b.png"], [k, None]) for k in range(2)]
    out = list(views.Prefetcher(loader, torch.device("cuda")))
    assert [(images.on_device, names, rest) for images, names, rest in out] == [
        (True, ["a.png", "b.png"], [k, None]) for k in range(2)]
    assert [entry[:2] for entry in events if entry[0] in ("copy", "record")] == [
        ("copy", "images0"), ("copy", "images1"), ("record", "images0"), ("record", "images1")]


@pytest.mark.cuda
@needs_cuda
def test_prefetcher_on_cuda_hands_out_the_loaders_batches_without_waiting_for_the_next(monkeypatch):
    """On a real GPU: the batches handed out equal the loader's, on the GPU, and step 0 does not wait
    for batch 1's copy: that copy is queued behind a long sleep on the side stream, and step 0's work
    finishes while the side stream still sleeps."""
    side = torch.cuda.Stream()
    monkeypatch.setattr(torch.cuda, "Stream", lambda device: side)  # the prefetcher's side stream
    batches = [([torch.full((64, 3, 16, 16), k, dtype=torch.uint8).pin_memory(), ["x.png", k]],
                (torch.arange(4) + k).pin_memory()) for k in range(3)]

    def loader():
        for k, batch in enumerate(batches):
            if k == 1:  # batch 1's copy will wait for about a second of sleep on the side stream
                with torch.cuda.stream(side):
                    torch.cuda._sleep(10 ** 9)
            yield batch

    out, side_busy_after_step_0 = [], None
    for k, (crops, labels) in enumerate(views.Prefetcher(loader(), torch.device("cuda"))):
        crops[0].float().sum()  # step k's work, on the default stream
        done = torch.cuda.Event()
        done.record()
        done.synchronize()
        if k == 0:
            side_busy_after_step_0 = not side.query()
        out.append((crops, labels))
    assert side_busy_after_step_0
    assert len(out) == len(batches)
    for ((images, names), labels), (crops, labels_out) in zip(batches, out):
        assert crops[0].is_cuda and labels_out.is_cuda and crops[1] == names
        assert torch.equal(crops[0].cpu(), images) and torch.equal(labels_out.cpu(), labels)
