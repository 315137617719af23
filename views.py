"""Images in, views out: the paper's multi-crop view sampling (SSLight, Tan, Saleh, Martinez, ICLR 2023).

The paper changes no SSL objective. For small networks it changes only how views are sampled and
how the loss pairs are weighted (paper Sec. 3.3; SSLight's src/config/exp_yamls/*_{baseline,sslight}.yaml):

    global crops   scale (0.14 or 0.25, 1)    ->  (0.3, 1)
    local crops    scale (0.05, 0.14 or 0.25) ->  (0.05, 0.3)
    local size     96 px                      ->  128 px
    loss weights   plain average over pairs   ->  0.4 * mean(global-global) + 0.6 * mean(global-local)

This file holds the recipes as data (`RECIPES`), the transform that turns one image into
[global_1, global_2, local_1 .. local_n] uint8 tensors, `normalize` (done on the device, so the loader
ships 1 byte per pixel instead of 4), the evaluation transform, the data sets and a picture:

    python views.py photo.jpg --method dino --compare --out views.png
"""
import argparse
import dataclasses
import math
import os
import warnings

import torch
import torch.nn.functional as F
import torchvision
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image, ImageDraw, ImageFilter, ImageOps

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
REFERENCE_GLOBAL_SIZE = 224  # crop sizes in the recipes are for 224 px global crops


class UserError(Exception):
    """A mistake in the command line or the data: the scripts print it in one line and exit with code 2."""


@dataclasses.dataclass(frozen=True)
class ViewRecipe:
    global_scale: tuple            # RandomResizedCrop area range of the 2 global crops
    local_scale: tuple             # ... and of the local crops
    local_crops: int               # number of local crops (6 for CNNs, 10 for ViT-Tiny)
    local_size: int                # local crop side, for 224 px global crops (96 or 128)
    global_size: int = 224
    loss_weights: tuple = None     # (alpha, beta); None = plain average over all pairs (baseline)
    flip_p: float = 0.5
    jitter: tuple = (0.4, 0.4, 0.2, 0.1)  # brightness, contrast, saturation, hue
    jitter_p: float = 0.8
    grayscale_p: float = 0.2
    blur_p: tuple = (1.0, 0.1, 0.5)  # global_1, global_2, every local crop
    solarize_p: float = 0.2        # second global crop only (PIL threshold 128)
    interpolation: str = "bicubic"  # SSLight's src/data/transforms.py: bicubic crops for all three methods

    @property
    def alpha_beta(self):
        """Weights of the averaged global-global and global-local loss terms.

        Baseline = the original methods' plain average over all pairs. In DINO and SwAV each of the 2
        global views is paired with the other global view (2 gg pairs) and with every local (2 * n gl
        pairs); in MoCo the key g1 is paired with g2 (1) and every local (n). Either way
        alpha = n_gg / (n_gg + n_gl) = 1 / (1 + n_local): 1/7 for 6 locals, 1/11 for 10."""
        if self.loss_weights is not None:
            return tuple(self.loss_weights)
        n = self.local_crops
        return (1.0 / (1 + n), n / (1.0 + n))


# DINO's photometric augmentation, used by SSLight for DINO and MoCo: colour jitter, blur p 1.0 / 0.1 / 0.5
# (global_1 / global_2 / locals) and solarize on global_2.
DINO_AUGMENT = dict(jitter=(0.4, 0.4, 0.2, 0.1), blur_p=(1.0, 0.1, 0.5), solarize_p=0.2)
# SwAV's own: strong jitter, blur 0.5 on every view, no solarize.
SWAV_AUGMENT = dict(jitter=(0.8, 0.8, 0.8, 0.2), blur_p=(0.5, 0.5, 0.5), solarize_p=0.0)

# Keys: (method, recipe). DINO has a CNN and a ViT variant (SSLight's src/config/exp_yamls).
RECIPES = {
    ("dino_cnn", "baseline"): ViewRecipe((0.14, 1.0), (0.05, 0.14), 6, 96, **DINO_AUGMENT),
    ("dino_cnn", "light"): ViewRecipe((0.3, 1.0), (0.05, 0.3), 6, 128, loss_weights=(0.4, 0.6), **DINO_AUGMENT),
    ("dino_vit", "baseline"): ViewRecipe((0.25, 1.0), (0.05, 0.25), 10, 96, **DINO_AUGMENT),
    ("dino_vit", "light"): ViewRecipe((0.3, 1.0), (0.05, 0.3), 10, 128, loss_weights=(0.4, 0.6), **DINO_AUGMENT),
    ("moco", "baseline"): ViewRecipe((0.14, 1.0), (0.05, 0.14), 6, 96, **DINO_AUGMENT),
    ("moco", "light"): ViewRecipe((0.3, 1.0), (0.05, 0.3), 6, 128, loss_weights=(0.4, 0.6), **DINO_AUGMENT),
    # The original 2-view MoCo-v2 "aug+" (official MoCo main_moco.py): RandomResizedCrop(0.2, 1) bilinear,
    # jitter (0.4, 0.4, 0.4, 0.1), blur p 0.5 on both views, no solarize, no local crops.
    ("moco", "classic"): ViewRecipe((0.2, 1.0), (0.05, 0.2), 0, 96, loss_weights=(1.0, 0.0),
                                    jitter=(0.4, 0.4, 0.4, 0.1), blur_p=(0.5, 0.5, 0.5),
                                    solarize_p=0.0, interpolation="bilinear"),
    ("swav", "baseline"): ViewRecipe((0.14, 1.0), (0.05, 0.14), 6, 96, **SWAV_AUGMENT),
    ("swav", "light"): ViewRecipe((0.3, 1.0), (0.05, 0.3), 6, 128, loss_weights=(0.4, 0.6), **SWAV_AUGMENT),
}


def get_recipe(method, recipe="light", vit=False, **overrides):
    """The recipe of `method` (dino / moco / swav) and `recipe` (light / baseline / classic), with any
    field overridden (None = keep). Overriding global_size alone rescales local_size by the same ratio,
    so 112 px global crops get 48 (baseline) or 64 (light) px local crops."""
    key = ("dino_vit" if vit else "dino_cnn") if method == "dino" else method
    if (key, recipe) not in RECIPES:
        valid = sorted(r for m, r in RECIPES if m == key)
        raise UserError(f"no recipe {recipe!r} for {method}; valid: {', '.join(valid) or 'none'}")
    base = RECIPES[(key, recipe)]
    overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items() if v is not None}
    if "global_size" in overrides and "local_size" not in overrides:
        overrides["local_size"] = max(1, round(base.local_size * overrides["global_size"] / REFERENCE_GLOBAL_SIZE))
    recipe = dataclasses.replace(base, **overrides)
    for name, (low, high) in (("global", recipe.global_scale), ("local", recipe.local_scale)):
        if not 0 < low <= high <= 1:
            raise UserError(f"--{name}-scale {low} {high}: need 0 < MIN <= MAX <= 1")
    if recipe.global_size < 16 or (recipe.local_crops and recipe.local_size < 8):
        raise UserError(f"crops of {recipe.global_size} px (global) / {recipe.local_size} px (local) are too small "
                        "for any backbone here: use --global-size >= 16 (locals >= 8 px)")
    if recipe.local_crops < 0 or min(recipe.alpha_beta) < 0:
        raise UserError("--local-crops and --loss-weights must not be negative")
    return recipe


VIEW_FLAGS = ("global_size", "local_size", "local_crops", "global_scale", "local_scale", "loss_weights")


def recipe_from_flags(method, flags, vit=False, patch_size=16):
    """The recipe of --recipe with the view flags of `flags` (the parsed args, or a run's resolved config) applied.
    A ViT's crops must be whole multiples of its patches."""
    recipe = get_recipe(method, flags.recipe, vit, **{name: getattr(flags, name) for name in VIEW_FLAGS})
    if vit and (recipe.global_size % patch_size or recipe.local_crops and recipe.local_size % patch_size):
        raise UserError(f"a ViT needs crops in multiples of its {patch_size} px patches, not {recipe.global_size} / "
                        f"{recipe.local_size} px: use --global-size 224 or 112 (locals 128 / 64), or set --local-size")
    return recipe


def resolved_view_flags(recipe):
    """The values the recipe's view flags resolved to, for a run's config (and its resume check)."""
    return dict(global_size=recipe.global_size, local_size=recipe.local_size, local_crops=recipe.local_crops,
                global_scale=recipe.global_scale, local_scale=recipe.local_scale, loss_weights=recipe.alpha_beta)


def add_view_args(parser):
    v = parser.add_argument_group("views (paper Sec. 3.3; --recipe light is the paper's, baseline the original's)")
    v.add_argument("--recipe", default="light",
                   help="light: global (0.3,1), local (0.05,0.3) at 128 px, loss weights 0.4/0.6. baseline: the "
                        "original crops (CNN (0.14,1)/(0.05,0.14), ViT (0.25,1)/(0.05,0.25), 96 px), plain average. "
                        "MoCo also: classic = the 2-view MoCo-v2 as published")
    v.add_argument("--global-size", type=int, default=None,
                   help="224; smaller sizes scale the local size by the same ratio (112 -> 48 / 64)")
    v.add_argument("--local-size", type=int, default=None, help="light 128, baseline 96 (for 224 px global crops)")
    v.add_argument("--local-crops", type=int, default=None, help="6 for CNNs, 10 for ViT-Tiny (the paper keeps it)")
    v.add_argument("--global-scale", type=float, nargs=2, default=None, metavar=("MIN", "MAX"), help="light 0.3 1")
    v.add_argument("--local-scale", type=float, nargs=2, default=None, metavar=("MIN", "MAX"), help="light 0.05 0.3")
    v.add_argument("--loss-weights", type=float, nargs=2, default=None, metavar=("ALPHA", "BETA"),
                   help="weights of the averaged global-global / global-local terms: light 0.4 0.6; "
                        "baseline 1/(1+n_local), n_local/(1+n_local) = a plain average over pairs")
    v.add_argument("--views-on", default="loader", choices=["loader", "device"],
                   help="loader: PIL crops in the loader processes (the paper's pipeline). device: the loader only "
                        "decodes and the views are sampled in batches on the GPU (or CPU); not yet measured on a "
                        "GPU. Departures: " + DEVICE_VIEWS_DEPARTURES)
    return parser


class MultiCropTransform:
    """PIL image -> [global_1, global_2, local_1, ..., local_n] uint8 (3, H, W) tensors (`normalize` them).

    One pipeline for all views; only blur (g1 / g2 / locals) and solarize (g2 only) differ per view.
    Order inside a view (SSLight's src/data/transforms.py): crop -> flip -> colour jitter (with p) ->
    grayscale -> Gaussian blur -> solarize. All randomness is torch's, so seeds make it reproducible."""

    def __init__(self, recipe: ViewRecipe):
        self.recipe = recipe
        self.interpolation = T.InterpolationMode(recipe.interpolation)
        self.color_jitter = T.ColorJitter(*recipe.jitter)

    def view_specs(self):
        """(size, scale, blur_p, solarize_p) of each view, in output order."""
        r = self.recipe
        blur_g1, blur_g2, blur_local = r.blur_p
        specs = [(r.global_size, r.global_scale, blur_g1, 0.0), (r.global_size, r.global_scale, blur_g2, r.solarize_p)]
        return specs + [(r.local_size, r.local_scale, blur_local, 0.0)] * r.local_crops

    def __call__(self, image):
        return [view for view, _ in self.sample(image)]

    def sample(self, image):
        """Like __call__, and also what was done per view: the crop box (left, top, width, height) in
        source pixels and whether it was blurred / solarised."""
        image = image.convert("RGB")
        return [self.one_view(image, *spec) for spec in self.view_specs()]

    def one_view(self, image, size, scale, blur_p, solarize_p):
        r = self.recipe
        top, left, h, w = T.RandomResizedCrop.get_params(image, scale=scale, ratio=(3 / 4, 4 / 3))
        view = TF.resized_crop(image, top, left, h, w, [size, size], self.interpolation)
        if torch.rand(()) < r.flip_p:
            view = TF.hflip(view)
        if torch.rand(()) < r.jitter_p:
            view = self.color_jitter(view)
        if torch.rand(()) < r.grayscale_p:
            view = TF.rgb_to_grayscale(view, num_output_channels=3)
        blurred = bool(torch.rand(()) < blur_p)
        if blurred:  # PIL Gaussian blur, radius ~ U(0.1, 2.0), as DINO / SwAV
            view = view.filter(ImageFilter.GaussianBlur(radius=0.1 + 1.9 * torch.rand(()).item()))
        solarized = bool(torch.rand(()) < solarize_p)
        if solarized:
            view = ImageOps.solarize(view, threshold=128)
        return TF.pil_to_tensor(view), dict(box=(left, top, w, h), blurred=blurred, solarized=solarized)


def eval_transform(global_size=224):
    """Resize(256) + CenterCrop(224), bicubic, scaled for other sizes (SSLight's classification code) -> uint8."""
    return T.Compose([T.Resize(round(global_size * 256 / 224), interpolation=T.InterpolationMode.BICUBIC),
                      T.CenterCrop(global_size), T.PILToTensor()])


def probe_transform(global_size=224):
    """The linear probe's training augmentation (SSLight's classification code): RandomResizedCrop (bicubic) + flip
    -> uint8."""
    return T.Compose([T.RandomResizedCrop(global_size, interpolation=T.InterpolationMode.BICUBIC),
                      T.RandomHorizontalFlip(), T.PILToTensor()])


def normalize(images, device, memory_format=torch.contiguous_format):
    """uint8 (B, 3, H, W) from the loader -> float32 ImageNet-normalised on `device`: one copy of 1 byte
    per pixel, then (x / 255 - mean) / std = x * a + b as one fused multiply-add."""
    images = images.to(device, non_blocking=True)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    scale, shift = 1 / (255 * std), -torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1) / std
    return torch.addcmul(shift, images, scale).contiguous(memory_format=memory_format)


# ----------------------------------------------------------------------------------------------
# Views on the device (--views-on gpu): the loader only decodes, the views are sampled here, batched
# ----------------------------------------------------------------------------------------------

DEVICE_VIEWS_DEPARTURES = (
    "crops are bilinear, averaging ceil(crop / size)^2 samples per pixel when shrinking (roi_align), not PIL's "
    "bicubic; the blur is a true Gaussian (13 taps, reflect padding), not PIL's box-blur approximation (edge "
    "padding); colour jitter, grayscale and solarize are torchvision's float tensor ops and nothing is rounded "
    "to uint8, where the PIL path rounds after each op, takes contrast against an integer grey mean, uses "
    "(299, 587, 114) / 1000 grey weights and shifts hue in 8-bit HSV by whole 1/256 turns")


def collate_images(batch):
    """DataLoader collate_fn for (uint8 (C, h, w) image, label) pairs of any sizes -> (uint8 (B, C, H, W)
    padded to the largest h and w, long (B, 2) true (h, w), labels). The padding repeats each image's last
    row and column, so a bilinear crop at an image's edge reads what it would read on the image alone."""
    images, labels = zip(*batch)
    sizes = torch.tensor([image.shape[1:] for image in images])
    out = torch.empty((len(images), images[0].shape[0], *sizes.max(0).values.tolist()), dtype=torch.uint8)
    for k, (image, (h, w)) in enumerate(zip(images, sizes.tolist())):
        out[k, :, :h, :w] = image
        out[k, :, :h, w:] = image[:, :, w - 1:]
        out[k, :, h:] = out[k, :, h - 1:h]
    return out, sizes, torch.utils.data.default_collate(labels)


def crop_boxes(sizes, scale, ratio=(3 / 4, 4 / 3), generator=None, tries=10):
    """torchvision's RandomResizedCrop.get_params for N images at once: sizes (N, 2) = (h, w) -> float
    (N, 4) boxes (left, top, width, height) in whole pixels. Per image 10 tries of area ~ U(scale) * h * w
    and a log-uniform aspect ratio; the first that fits wins."""
    rand = lambda *shape: torch.rand(shape, generator=generator, device=sizes.device)
    height, width = sizes.float().unbind(1)
    area = (height * width)[:, None] * (scale[0] + (scale[1] - scale[0]) * rand(len(sizes), tries))
    log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_low + (log_high - log_low) * rand(len(sizes), tries))
    w, h = (area * aspect).sqrt().round(), (area / aspect).sqrt().round()
    fits = (w > 0) & (w <= width[:, None]) & (h > 0) & (h <= height[:, None])
    first, found = fits.int().argmax(1, keepdim=True), fits.any(1)
    in_ratio = width / height  # if no try fits: the whole image cut to the nearest allowed ratio, centred
    fallback_w = torch.where(in_ratio > ratio[1], (height * ratio[1]).round(), width)
    fallback_h = torch.where(in_ratio < ratio[0], (width / ratio[0]).round(), height)
    w = torch.where(found, w.gather(1, first)[:, 0], fallback_w)
    h = torch.where(found, h.gather(1, first)[:, 0], fallback_h)
    top = torch.where(found, (rand(len(sizes)) * (height - h + 1)).floor().minimum(height - h), (height - h) // 2)
    left = torch.where(found, (rand(len(sizes)) * (width - w + 1)).floor().minimum(width - w), (width - w) // 2)
    return torch.stack([left, top, w, h], 1)


def resized_crops(images, index, boxes, size):
    """images[index[k]] cut to boxes[k] (left, top, width, height) and resized to (size, size), float: bilinear,
    averaging ceil(box side / size)^2 samples per output pixel when shrinking (torchvision's roi_align)."""
    rois = torch.cat([index[:, None].float(), boxes[:, :2], boxes[:, :2] + boxes[:, 2:]], 1)
    return torchvision.ops.roi_align(images.float(), rois, size, aligned=True)


# torchvision.transforms.functional's tensor ops on float (N, 3, H, W) in [0, 1], one factor per image
def rgb_to_grayscale(x):
    r, g, b = x.unbind(1)
    return (0.2989 * r + 0.587 * g + 0.114 * b).unsqueeze(1)


def blend(x, other, factor):
    factor = factor.view(-1, 1, 1, 1)
    return (factor * x + (1 - factor) * other).clamp(0, 1)


def adjust_brightness(x, factor):
    return blend(x, 0.0, factor)


def adjust_contrast(x, factor):
    return blend(x, rgb_to_grayscale(x).mean((1, 2, 3), keepdim=True), factor)


def adjust_saturation(x, factor):
    return blend(x, rgb_to_grayscale(x), factor)


def adjust_hue(x, shift):
    """RGB -> HSV, hue + shift (in turns), -> RGB; HSV -> RGB in its closed form v - c * clamp(min(k, 4 - k), 0, 1)."""
    r, g, b = x.unbind(1)
    v = x.amax(1)
    c = v - x.amin(1)
    safe_c = torch.where(c == 0, 1, c)
    hue = torch.where(v == r, (g - b) / safe_c, torch.where(v == g, 2 + (b - r) / safe_c, 4 + (r - g) / safe_c))
    hue = (hue + 6 * shift.view(-1, 1, 1)).unsqueeze(1)  # in sixths of a turn
    k = (torch.tensor([5.0, 3.0, 1.0], device=x.device).view(1, 3, 1, 1) + hue) % 6
    return v.unsqueeze(1) - c.unsqueeze(1) * torch.minimum(k, 4 - k).clamp(0, 1)


def solarize(x):
    return torch.where(x >= 128 / 255, 1 - x, x)


def gaussian_blur(x, sigma, radius=6):
    """torchvision's gaussian_blur (kernel 2 * radius + 1, reflect padding) with one sigma per image: a
    separable grouped convolution."""
    n, c, h, w = x.shape
    if n == 0:
        return x
    taps = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    kernel = torch.exp(-0.5 * (taps / sigma[:, None]) ** 2)
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(c, 0)
    x = F.pad(x.reshape(1, n * c, h, w), [radius] * 4, mode="reflect")
    x = F.conv2d(x, kernel[:, None, :, None], groups=n * c)
    return F.conv2d(x, kernel[:, None, None, :], groups=n * c).view(n, c, h, w)


class DeviceMultiCrop:
    """Decoded uint8 (B, 3, H, W) images on any device, padded by collate_images (`sizes` (B, 2) = true (h, w);
    None = whole) -> [global_1, global_2, local_1, ..., local_n] float (B, 3, s, s), ImageNet-normalised: what
    MultiCropTransform + normalize give, drawn from the same distributions per image and view, in one batched
    pass per crop size. All randomness comes from `generator` (torch's default if None) on the images' device.
    Departures from the PIL path: DEVICE_VIEWS_DEPARTURES."""

    def __init__(self, recipe: ViewRecipe):
        self.recipe = recipe

    def __call__(self, images, sizes=None, generator=None, memory_format=torch.contiguous_format):
        return [view.contiguous(memory_format=memory_format) for view, _ in self.sample(images, sizes, generator)]

    def sample(self, images, sizes=None, generator=None):
        """Like __call__, and also what was done to each view: a dict of per-image tensors box (left, top,
        width, height) in source pixels, flipped, jittered, order (of brightness, contrast, saturation, hue),
        factors (in that order), grayscale, blurred, sigma, solarized."""
        r, n, device = self.recipe, len(images), images.device
        if sizes is None:  # every image fills the batch tensor
            sizes = torch.tensor([images.shape[-2:]]).expand(n, 2)
        source, sizes = images.float(), sizes.to(device)
        blur_global_1, blur_global_2, blur_local = r.blur_p
        groups = [(r.global_size, r.global_scale, [blur_global_1, blur_global_2], [0.0, r.solarize_p])]
        if r.local_crops:
            groups.append((r.local_size, r.local_scale, [blur_local] * r.local_crops, [0.0] * r.local_crops))
        mean, std = (torch.tensor(v, device=device).view(1, 3, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD))
        views = []
        for size, scale, blur_p, solarize_p in groups:  # all views of one size at once, view-major
            boxes = crop_boxes(sizes.repeat(len(blur_p), 1), scale, generator=generator)
            x = resized_crops(source, torch.arange(n, device=device).repeat(len(blur_p)), boxes, size) / 255
            per_view = lambda p: torch.tensor(p, device=device).repeat_interleave(n)
            x, info = self.augment(x, per_view(blur_p), per_view(solarize_p), generator)
            info = {key: value.split(n) for key, value in dict(box=boxes, **info).items()}
            views += [(view, {key: value[i] for key, value in info.items()})
                      for i, view in enumerate(((x - mean) / std).split(n))]
        return views

    def augment(self, x, blur_p, solarize_p, generator):
        """MultiCropTransform.one_view after the crop, on float (N, 3, s, s) in [0, 1] with per-image blur and
        solarize probabilities: flip -> colour jitter (with p; 4 ops in a random order per image, each with
        its own factor) -> grayscale -> Gaussian blur, sigma ~ U(0.1, 2.0) px -> solarize (>= 128/255)."""
        r, n = self.recipe, len(x)
        rand = lambda *shape: torch.rand(shape or (n,), generator=generator, device=x.device)
        flipped = rand() < r.flip_p
        x[flipped] = x[flipped].flip(-1)
        jittered = rand() < r.jitter_p
        bright, contrast, saturation, hue = r.jitter
        low = torch.tensor([max(0, 1 - bright), max(0, 1 - contrast), max(0, 1 - saturation), -hue], device=x.device)
        high = torch.tensor([1 + bright, 1 + contrast, 1 + saturation, hue], device=x.device)
        factors, order = low + (high - low) * rand(n, 4), rand(n, 4).argsort(1)
        for step in range(4):  # each op runs on the images that do it at this step only
            for k, op in enumerate((adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)):
                pick = jittered & (order[:, step] == k)
                x[pick] = op(x[pick], factors[pick, k])
        grayscale = rand() < r.grayscale_p
        x[grayscale] = rgb_to_grayscale(x[grayscale]).expand(-1, 3, -1, -1)
        blurred, sigma = rand() < blur_p, 0.1 + 1.9 * rand()
        x[blurred] = gaussian_blur(x[blurred], sigma[blurred])
        solarized = rand() < solarize_p
        x[solarized] = solarize(x[solarized])
        return x, dict(flipped=flipped, jittered=jittered, order=order, factors=factors, grayscale=grayscale,
                       blurred=blurred, sigma=sigma, solarized=solarized)


def view_pipeline(recipe, views_on="loader"):
    """-> (the data set's transform, the loader's collate_fn, the device sampler or None). loader: the workers
    make every view (PIL) and ship uint8 crops. device: the workers only decode, and DeviceMultiCrop samples
    the views of the whole batch on the training device (departures from PIL: DEVICE_VIEWS_DEPARTURES)."""
    if views_on == "device":
        return T.PILToTensor(), collate_images, DeviceMultiCrop(recipe)
    return MultiCropTransform(recipe), None, None


def batch_to_crops(batch, device, memory_format=torch.contiguous_format, sampler=None):
    """A loader batch -> the [global_1, global_2, local_1, ...] crops on `device`, normalised: the loader's
    uint8 crops copied and normalised, or, with a device sampler, the decoded images' views sampled there."""
    if sampler is None:
        crops, _ = batch
        return [normalize(c, device, memory_format) for c in crops]
    images, sizes, _ = batch
    return sampler(images.to(device, non_blocking=True), sizes, memory_format=memory_format)


class Prefetcher:
    """Iterates a loader one batch ahead. On CUDA, batch i + 1's tensors (pinned by the loader) are copied on a
    side stream while step i computes on the default one, so the copy engine works beside the kernels; the
    default stream waits for the copy before it reads the batch. Elsewhere the batches pass through unchanged."""

    def __init__(self, loader, device):
        self.loader, self.device = loader, device

    def __len__(self):
        return len(self.loader)

    def _each(self, batch, fn):
        return [self._each(b, fn) if isinstance(b, (list, tuple)) else fn(b) for b in batch]

    def _copy(self, batch, stream):
        with torch.cuda.stream(stream):
            return self._each(batch, lambda t: t.to(self.device, non_blocking=True))

    def _ready(self, batch, stream):
        compute = torch.cuda.current_stream(self.device)
        compute.wait_stream(stream)  # the step reads the batch only once its copy is done
        self._each(batch, lambda t: t.record_stream(compute))  # and its memory is not reused while the step runs
        return batch

    def __iter__(self):
        if self.device.type != "cuda":
            yield from self.loader
            return
        stream, upcoming = torch.cuda.Stream(self.device), None
        for batch in self.loader:
            if upcoming is not None:
                current, upcoming = upcoming, self._copy(batch, stream)  # start the next copy, then hand out
                yield self._ready(current, stream)
            else:
                upcoming = self._copy(batch, stream)
        if upcoming is not None:
            yield self._ready(upcoming, stream)


# ----------------------------------------------------------------------------------------------
# Data sets: an image folder, a torchvision set, or the built-in synthetic demo
# ----------------------------------------------------------------------------------------------

DATA_HELP = ("an ImageFolder root (ImageNet layout: DIR/train), a flat folder of images, cifar10 | cifar100 | stl10 "
             "(torchvision, downloaded into ./data), or synthetic (the built-in demo set, no files)")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
TEXTURES = ["h_stripes", "v_stripes", "checker", "dots", "rings", "grid", "triangles", "crosses", "diagonal", "zigzag"]


class SyntheticTextures(torch.utils.data.Dataset):
    """The built-in demo set, made on the fly (no files): 10 classes, each a periodic pattern that FILLS the
    image, in the same two grey levels for every image. Why: multi-crop SSL learns what two crops of one image
    share. Here that can only be the pattern, since every crop (even a 5%-area local one) shows it; a per-image
    colour would be a better instance cue than the class, and the networks would learn colour instead (they
    did: kNN fell while the loss fell). What varies per image is what the augmentations vary too: the period
    (0.14-0.22 of the side), the phase, the stroke thickness and, for 'diagonal', the direction."""

    BACKGROUND, FOREGROUND = (30, 30, 30), (225, 225, 225)

    def __init__(self, num_images=640, size=64, transform=None, seed=0):
        self.num_images, self.size, self.transform, self.seed = num_images, size, transform, seed
        self.classes = TEXTURES

    def __len__(self):
        return self.num_images

    def render(self, index):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        rand = lambda: torch.rand((), generator=g).item()
        label, s, fg, name = index % len(TEXTURES), self.size, self.FOREGROUND, TEXTURES[index % len(TEXTURES)]
        image = Image.new("RGB", (s, s), self.BACKGROUND)
        draw = ImageDraw.Draw(image)
        p = s * (0.14 + 0.08 * rand())  # period in pixels
        ox, oy = p * rand(), p * rand()  # phase
        t = max(1, round(p * (0.35 + 0.15 * rand())))  # stripe thickness
        n = int(s / p) + 3
        for i in range(-1, n):
            for j in range(-1, n):
                x, y = round(ox + i * p - p), round(oy + j * p - p)  # integers: PIL needs x1 >= x0
                cx, cy, r = x + p / 2, y + p / 2, p * 0.42
                if name == "h_stripes" and i == 0:
                    draw.rectangle([0, y, s, y + t - 1], fill=fg)
                elif name == "v_stripes" and j == 0:
                    draw.rectangle([x, 0, x + t - 1, s], fill=fg)
                elif name == "checker" and (i + j) % 2 == 0:
                    draw.rectangle([x, y, x + p - 1, y + p - 1], fill=fg)
                elif name == "dots":
                    draw.ellipse([cx - 0.3 * p, cy - 0.3 * p, cx + 0.3 * p, cy + 0.3 * p], fill=fg)
                elif name == "grid":
                    w = max(1, round(p * 0.15))
                    draw.rectangle([x, y, x + w - 1, y + p], fill=fg)
                    draw.rectangle([x, y, x + p, y + w - 1], fill=fg)
                elif name == "triangles":
                    draw.polygon([(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)], fill=fg)
                elif name == "crosses":
                    a, w = p * 0.4, max(1, p * 0.12)
                    draw.rectangle([cx - a, cy - w, cx + a, cy + w], fill=fg)
                    draw.rectangle([cx - w, cy - a, cx + w, cy + a], fill=fg)
                elif name == "rings":
                    draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=fg, width=max(1, round(p * 0.12)))
        if name == "diagonal":
            direction = 1 if rand() < 0.5 else -1
            for k in range(-n, 2 * n):
                x0, w = ox + k * p, t * 1.2
                corners = [(x0, 0), (x0 + w, 0), (x0 + w - s, s), (x0 - s, s)] if direction > 0 else \
                    [(x0 - s, 0), (x0 - s + w, 0), (x0 + w, s), (x0, s)]
                draw.polygon(corners, fill=fg)
        elif name == "zigzag":
            for j in range(-1, n):
                xs = [ox + k * p / 2 - p for k in range(2 * n + 2)]
                draw.line([(x, oy + j * p + (p * 0.4 if k % 2 else 0)) for k, x in enumerate(xs)], fill=fg,
                          width=max(1, round(p * 0.18)))
        return image, label

    def __getitem__(self, index):
        image, label = self.render(index)
        return (self.transform(image) if self.transform else image), label


class ImageFiles(torch.utils.data.Dataset):
    """Images under `root`: an ImageFolder layout (root/<class>/<image>) or a flat folder of unlabelled
    images (label 0). An unreadable image (a broken file, a decompression bomb) is skipped with a warning
    naming it and the next image is used instead. The count of bad images lives in shared memory, so the
    1% limit means the same with any number of loader processes."""

    def __init__(self, root, transform=None):
        if not os.path.isdir(root):
            raise UserError(f"{root!r}: no such folder")
        self.root, self.transform = root, transform
        is_image = lambda name: name.lower().endswith(IMAGE_EXTENSIONS)
        subdirs = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
        self.samples, self.classes = [], []
        for c in subdirs:
            files = [os.path.join(d, f) for d, _, fs in sorted(os.walk(os.path.join(root, c), followlinks=True))
                     for f in sorted(fs) if is_image(f)]
            if files:
                self.samples += [(path, len(self.classes)) for path in files]
                self.classes.append(c)
        if not self.classes:  # a flat folder of unlabelled images
            self.classes = ["unlabelled"]
            self.samples = [(os.path.join(root, f), 0) for f in sorted(os.listdir(root)) if is_image(f)]
        if not self.samples:
            raise UserError(f"{root!r}: no image files ({', '.join(IMAGE_EXTENSIONS)}) in it or in its sub-folders")
        self.bad = torch.zeros(len(self.samples), dtype=torch.bool).share_memory_()  # seen by every loader process

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        for offset in range(len(self.samples)):
            path, label = self.samples[(index + offset) % len(self.samples)]
            try:
                with Image.open(path) as f:
                    image = f.convert("RGB")
            except (OSError, ValueError, Image.DecompressionBombError) as error:
                if not self.bad[(index + offset) % len(self.samples)]:
                    self.bad[(index + offset) % len(self.samples)] = True
                    warnings.warn(f"skipping unreadable image {path}: {error}")
                if self.bad.sum() > max(1, 0.01 * len(self.samples)):
                    raise RuntimeError(f"more than 1% of the images under {self.root} are unreadable "
                                       f"({int(self.bad.sum())} so far, e.g. {path}); fix the data set") from None
                continue
            return (self.transform(image) if self.transform else image), label
        raise RuntimeError(f"no readable image under {self.root}")


def build_dataset(data, transform=None, split="train", download=True):
    """--data value -> Dataset of (transform(image), label). split: "train" (every training image; STL-10
    includes its 100k unlabelled ones), "labelled" (with labels, for kNN banks and probes) or "val"."""
    if data == "synthetic":
        return SyntheticTextures(500 if split == "val" else 640, transform=transform, seed=1 if split == "val" else 0)
    if data in ("cifar10", "cifar100", "stl10"):
        cls = {"cifar10": torchvision.datasets.CIFAR10, "cifar100": torchvision.datasets.CIFAR100,
               "stl10": torchvision.datasets.STL10}[data]
        if data == "stl10":
            which = dict(split={"train": "train+unlabeled", "labelled": "train", "val": "test"}[split])
        else:
            which = dict(train=split != "val")
        try:
            return cls("data", download=download, transform=transform, **which)
        except Exception as error:  # offline and not on disk yet
            raise UserError(f"--data {data}: not in ./data and not downloadable ({type(error).__name__}: {error}); "
                            "download it once with internet access, or pass an ImageFolder path") from None
    return ImageFiles(data, transform)


def build_eval_datasets(eval_data, transform, train_transform=None, download=True):
    """-> (labelled train set, val set): a root with train/ and val/ image folders, or a named set. The
    train set uses train_transform when given (linear probe), else transform (kNN bank)."""
    if eval_data in ("synthetic", "cifar10", "cifar100", "stl10"):
        return (build_dataset(eval_data, train_transform or transform, "labelled", download),
                build_dataset(eval_data, transform, "val", download))
    for split in ("train", "val"):
        if not os.path.isdir(os.path.join(eval_data, split)):
            raise UserError(f"{eval_data!r} has no {split}/ folder: evaluation data needs ROOT/train and ROOT/val")
    return (ImageFiles(os.path.join(eval_data, "train"), train_transform or transform),
            ImageFiles(os.path.join(eval_data, "val"), transform))


# ----------------------------------------------------------------------------------------------
# The picture: sampled boxes on the source image, the augmented crops beside it
# ----------------------------------------------------------------------------------------------

BOX_COLORS = ["#e6194b", "#f58231", "#3cb44b", "#4363d8", "#911eb4", "#42d4f4",
              "#f032e6", "#bfef45", "#469990", "#9a6324", "#800000", "#000075"]


def draw_views(image, recipe, title="", panel=224):
    """One row: the source (boxes: thick = global, thin = local) then every view at its true relative
    size (a 128 px local is drawn 128/224 the size of a global crop)."""
    image = image.convert("RGB")
    views = MultiCropTransform(recipe).sample(image)
    scale = panel / max(image.size)
    source = image.resize((round(image.width * scale), round(image.height * scale)), Image.BICUBIC)
    draw = ImageDraw.Draw(source)
    for i, (_, info) in enumerate(views):
        left, top, w, h = (v * scale for v in info["box"])
        draw.rectangle([left, top, left + w, top + h], outline=BOX_COLORS[i % 12], width=3 if i < 2 else 1)
    pad, label_h, tiles = 6, 16, []
    for i, (tensor, info) in enumerate(views):
        side = round(panel * tensor.shape[-1] / recipe.global_size)
        framed = Image.new("RGB", (side + 4, side + 4), BOX_COLORS[i % 12])
        framed.paste(TF.to_pil_image(tensor).resize((side, side), Image.BICUBIC), (2, 2))
        name = ("g%d" % (i + 1) if i < 2 else "l%d" % (i - 1))
        tiles.append((framed, name + (" blur" if info["blurred"] else "") + (" sol" if info["solarized"] else "")))
    width = source.width + pad + sum(t.width + pad for t, _ in tiles)
    row = Image.new("RGB", (width, panel + 4 + 2 * label_h), "white")
    text = ImageDraw.Draw(row)
    text.text((2, 1), title, fill="black")
    row.paste(source, (0, label_h))
    x = source.width + pad
    for tile, label in tiles:
        row.paste(tile, (x, label_h))
        text.text((x, label_h + tile.height + 1), label, fill="black")
        x += tile.width + pad
    return row


def describe(recipe):
    alpha, beta = recipe.alpha_beta
    return (f"global {recipe.global_size}px scale {recipe.global_scale} | {recipe.local_crops} local "
            f"{recipe.local_size}px scale {recipe.local_scale} | loss weights gg {alpha:.3f} gl {beta:.3f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Draw the multi-crop views sampled from one image.")
    parser.add_argument("image", help="path of an image file")
    parser.add_argument("--method", default="dino", choices=["dino", "moco", "swav"])
    parser.add_argument("--vit", action="store_true", help="DINO's ViT recipe (10 locals)")
    parser.add_argument("--recipe", default="light", choices=["light", "baseline", "classic"])
    parser.add_argument("--compare", action="store_true", help="draw baseline and light, one row each")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="views.png")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    source = Image.open(args.image)
    rows = []
    for name in (["baseline", "light"] if args.compare else [args.recipe]):
        recipe = get_recipe(args.method, name, args.vit)
        rows.append(draw_views(source, recipe, f"{args.method} {name}: {describe(recipe)}"))
    sheet = Image.new("RGB", (max(r.width for r in rows), sum(r.height for r in rows)), "white")
    for i, r in enumerate(rows):
        sheet.paste(r, (0, sum(r.height for r in rows[:i])))
    (sheet.quantize(256) if args.out.lower().endswith(".png") else sheet).save(args.out)  # 256 colours: ~1/3 the size
    print(f"wrote {args.out}")
