"""Images in, views out: the multi-crop views of SSLight (Tan, Saleh, Martinez, ICLR 2023).

The paper changes no SSL objective. For small networks it changes only how views are sampled and
how the loss pairs are weighted (paper Sec. 3.3; SSLight's src/config/exp_yamls):

    global crops   scale (0.14 or 0.25, 1)    ->  (0.3, 1)
    local crops    scale (0.05, 0.14 or 0.25) ->  (0.05, 0.3)
    local size     96 px                      ->  128 px
    loss weights   plain average over pairs   ->  0.4 mean(global-global) + 0.6 mean(global-local)

Run as a script (python views.py photo.jpg --compare), it draws the views sampled from one image.
"""
import argparse
import dataclasses
import functools
import math
import os
import re
import warnings

import torch
import torch.nn.functional as F
import torchvision
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image, ImageDraw, ImageFilter, ImageOps

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class UserError(Exception):
    """A mistake in the command line or the data: the scripts print it in one line and exit 2."""

    def __str__(self):
        # Raised in a DataLoader worker, it comes back as UserError("Caught UserError in DataLoader
        # worker process 0.\nOriginal Traceback ...\nviews.UserError: <message>"): keep <message>.
        message = super().__str__()
        if message.startswith("Caught UserError"):
            message = re.sub(r"^([\w.]+\.)?UserError: ", "", message.strip().splitlines()[-1])
        return message


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
    interpolation: str = "bicubic"  # SSLight's src/data/transforms.py, for all three methods

    @property
    def alpha_beta(self):
        """Weights of the mean global-global and global-local terms. Baseline: the plain average
        over all pairs (DINO, SwAV: 2 gg and 2n gl pairs; MoCo, key g1: 1 and n), so alpha =
        n_gg / (n_gg + n_gl) = 1 / (1 + n_local): 1/7 for 6 locals, 1/11 for 10."""
        if self.loss_weights is not None:
            return tuple(self.loss_weights)
        n = self.local_crops
        return (1.0 / (1 + n), n / (1.0 + n))


# DINO's photometric augmentation (SSLight uses it for MoCo too), and SwAV's own.
DINO_AUGMENT = dict(jitter=(0.4, 0.4, 0.2, 0.1), blur_p=(1.0, 0.1, 0.5), solarize_p=0.2)
SWAV_AUGMENT = dict(jitter=(0.8, 0.8, 0.8, 0.2), blur_p=(0.5, 0.5, 0.5), solarize_p=0.0)
# The paper's views: the same for every method and backbone, but for the number of locals.
LIGHT = dict(global_scale=(0.3, 1.0), local_scale=(0.05, 0.3), local_size=128,
             loss_weights=(0.4, 0.6))

# Keys: (method, recipe). DINO has a CNN and a ViT variant (SSLight's src/config/exp_yamls).
RECIPES = {
    ("dino_cnn", "baseline"): ViewRecipe((0.14, 1.0), (0.05, 0.14), 6, 96, **DINO_AUGMENT),
    ("dino_cnn", "light"): ViewRecipe(local_crops=6, **LIGHT, **DINO_AUGMENT),
    ("dino_vit", "baseline"): ViewRecipe((0.25, 1.0), (0.05, 0.25), 10, 96, **DINO_AUGMENT),
    ("dino_vit", "light"): ViewRecipe(local_crops=10, **LIGHT, **DINO_AUGMENT),
    ("moco", "baseline"): ViewRecipe((0.14, 1.0), (0.05, 0.14), 6, 96, **DINO_AUGMENT),
    ("moco", "light"): ViewRecipe(local_crops=6, **LIGHT, **DINO_AUGMENT),
    # The 2-view MoCo-v2 "aug+" as published (official MoCo main_moco.py)
    ("moco", "classic"): ViewRecipe((0.2, 1.0), (0.05, 0.2), 0, 96, loss_weights=(1.0, 0.0),
                                    jitter=(0.4, 0.4, 0.4, 0.1), blur_p=(0.5, 0.5, 0.5),
                                    solarize_p=0.0, interpolation="bilinear"),
    ("swav", "baseline"): ViewRecipe((0.14, 1.0), (0.05, 0.14), 6, 96, **SWAV_AUGMENT),
    ("swav", "light"): ViewRecipe(local_crops=6, **LIGHT, **SWAV_AUGMENT),
}


MAX_CROP, MAX_LOCAL_CROPS = 1024, 32  # far above any recipe's (224 / 128 px, 6 or 10 locals)


def get_recipe(method, recipe="light", vit=False, **overrides):
    """`recipe` (light / baseline / classic) of `method` (dino / moco / swav), fields overridden
    (None = keep); global_size alone rescales local_size alike (112 px -> 48 / 64 px locals)."""
    key = ("dino_vit" if vit else "dino_cnn") if method == "dino" else method
    if (key, recipe) not in RECIPES:
        valid = sorted(r for m, r in RECIPES if m == key)
        raise UserError(f"no recipe {recipe!r} for {method}; valid: {', '.join(valid) or 'none'}")
    base = RECIPES[(key, recipe)]
    overrides = {k: tuple(v) if isinstance(v, list) else v
                 for k, v in overrides.items() if v is not None}
    if "global_size" in overrides and "local_size" not in overrides:
        ratio = overrides["global_size"] / base.global_size
        overrides["local_size"] = max(1, round(base.local_size * ratio))
    recipe = dataclasses.replace(base, **overrides)
    for name, (low, high) in (("global", recipe.global_scale), ("local", recipe.local_scale)):
        if not 0 < low <= high <= 1:
            raise UserError(f"--{name}-scale {low} {high}: need 0 < MIN <= MAX <= 1")
    if recipe.global_size < 16 or (recipe.local_crops and recipe.local_size < 8):
        raise UserError(f"crops of {recipe.global_size} px (global) / {recipe.local_size} px "
                        "(local) are too small: use --global-size >= 16 (locals >= 8 px)")
    if max(recipe.global_size, recipe.local_size) > MAX_CROP:  # a typo, not a setting
        raise UserError(f"crops of {recipe.global_size} / {recipe.local_size} px: at most "
                        f"{MAX_CROP} px (the paper's are 224 / 128)")
    alpha, beta = recipe.alpha_beta  # nan fails every comparison: checked as "not in range"
    if not (0 <= recipe.local_crops <= MAX_LOCAL_CROPS and 0 <= alpha < math.inf
            and 0 <= beta < math.inf and alpha + beta > 0):
        raise UserError(f"--local-crops must be in [0, {MAX_LOCAL_CROPS}], and --loss-weights "
                        "ALPHA BETA (the weights of the mean global-global and global-local "
                        "terms) finite, >= 0 and not both 0")
    return recipe


VIEW_FLAGS = ("global_size", "local_size", "local_crops", "global_scale", "local_scale",
              "loss_weights")


def recipe_from_flags(method, flags, vit=False, patch_size=16):
    """--recipe with the view flags of `flags` (the parsed args, or a run's resolved config)."""
    recipe = get_recipe(method, flags.recipe, vit, **{k: getattr(flags, k) for k in VIEW_FLAGS})
    if vit and (recipe.global_size % patch_size
                or recipe.local_crops and recipe.local_size % patch_size):
        raise UserError(f"a ViT needs crops in multiples of its {patch_size} px patches, not "
                        f"{recipe.global_size} / {recipe.local_size} px (--global-size 224, 112)")
    return recipe


def resolved_view_flags(recipe):
    """The values the recipe's view flags resolved to, for a run's config (and its resume check)."""
    return {k: recipe.alpha_beta if k == "loss_weights" else getattr(recipe, k) for k in VIEW_FLAGS}


def add_view_args(parser):
    v = parser.add_argument_group("views (paper Sec. 3.3)")
    v.add_argument("--recipe", default="light",
                   help="light (the paper's): scales (0.3,1)/(0.05,0.3), 128 px locals, weights "
                        "0.4/0.6; baseline (the original's): (0.14,1)/(0.05,0.14) (ViT: 0.25), 96 "
                        "px, plain average; classic (MoCo only): the 2-view MoCo-v2 as published")
    v.add_argument("--global-size", type=int, default=None, help="224; scales the locals alike")
    v.add_argument("--local-size", type=int, default=None, help="light 128, baseline 96 (at 224)")
    v.add_argument("--local-crops", type=int, default=None, help="6 for CNNs, 10 for ViT-Tiny")
    for name, light in (("global", "0.3 1"), ("local", "0.05 0.3")):
        v.add_argument(f"--{name}-scale", type=float, nargs=2, default=None,
                       metavar=("MIN", "MAX"), help="light " + light)
    v.add_argument("--loss-weights", type=float, nargs=2, default=None, metavar=("ALPHA", "BETA"),
                   help="weights of the averaged global-global / global-local terms: light 0.4 "
                        "0.6; baseline 1/(1+n_local), n_local/(1+n_local) = a plain average")
    v.add_argument("--views-on", default="loader", choices=["loader", "device"],
                   help="loader: PIL crops in the loader processes (the paper's pipeline); device: "
                        "the loader only decodes, the views are made in batches on the GPU (or "
                        "CPU), not yet measured on a GPU. Departures: " + DEVICE_VIEWS_DEPARTURES)
    return parser


class MultiCropTransform:
    """PIL image -> [global_1, global_2, local_1, ..., local_n] uint8 (3, H, W) tensors, for
    `normalize` on the device. One pipeline for all views (SSLight's src/data/transforms.py): only
    the blur (g1 / g2 / locals) and solarize (g2 only) probabilities differ per view."""

    def __init__(self, recipe: ViewRecipe):
        self.recipe = recipe
        self.interpolation = T.InterpolationMode(recipe.interpolation)
        self.color_jitter = T.ColorJitter(*recipe.jitter)

    def view_specs(self):
        """(size, scale, blur_p, solarize_p) of each view, in output order."""
        r = self.recipe
        return ([(r.global_size, r.global_scale, r.blur_p[0], 0.0),
                 (r.global_size, r.global_scale, r.blur_p[1], r.solarize_p)]
                + [(r.local_size, r.local_scale, r.blur_p[2], 0.0)] * r.local_crops)

    def __call__(self, image):
        return [view for view, _ in self.sample(image)]

    def sample(self, image):
        """Like __call__, and also what was done per view: the crop box (left, top, width, height)
        in source pixels and whether it was blurred / solarised."""
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
            view = view.filter(ImageFilter.GaussianBlur(0.1 + 1.9 * torch.rand(()).item()))
        solarized = bool(torch.rand(()) < solarize_p)
        if solarized:
            view = ImageOps.solarize(view, threshold=128)
        info = dict(box=(left, top, w, h), blurred=blurred, solarized=solarized)
        return TF.pil_to_tensor(view), info


def eval_transform(global_size=224):
    """Resize(256) + CenterCrop(224), bicubic, scaled to other sizes (SSLight) -> uint8."""
    return T.Compose([T.Resize(round(global_size * 256 / 224), T.InterpolationMode.BICUBIC),
                      T.CenterCrop(global_size), T.PILToTensor()])


def probe_transform(global_size=224):
    """The linear probe's augmentation (SSLight): RandomResizedCrop (bicubic) + flip -> uint8."""
    return T.Compose([T.RandomResizedCrop(global_size, interpolation=T.InterpolationMode.BICUBIC),
                      T.RandomHorizontalFlip(), T.PILToTensor()])


@functools.lru_cache
def imagenet_stats(device):
    """ImageNet mean and std as (1, 3, 1, 1) tensors on `device`, and the scale and shift with
    x * scale + shift = (x / 255 - mean) / std. Made once per device, not copied there per step."""
    mean, std = (torch.tensor(v, device=device).view(1, 3, 1, 1)
                 for v in (IMAGENET_MEAN, IMAGENET_STD))
    return mean, std, 1 / (255 * std), -mean / std


def normalize(images, device, memory_format=torch.contiguous_format):
    """uint8 (B, 3, H, W) -> float32 ImageNet-normalised on `device`, where the loader's batches
    come in 1 byte per pixel, not 4: one copy, then one fused multiply-add."""
    images = images.to(device, non_blocking=True)
    _, _, scale, shift = imagenet_stats(images.device)
    return torch.addcmul(shift, images, scale).contiguous(memory_format=memory_format)


# --- Views on the device (--views-on device): the loader only decodes, the views are made here ---

DEVICE_VIEWS_DEPARTURES = (
    "bilinear crops (averaging ceil(crop / size)^2 samples per pixel when shrinking), not PIL's "
    "bicubic; a true Gaussian blur (13 taps, reflect padding), not PIL's box approximation; float "
    "colour ops, where PIL rounds to uint8 after each op (hue differs most: PIL shifts it by whole "
    "1/256 turns); images decoded to at most 512 px on their longer side (at --global-size 224, "
    "scaled with it), not at full size")


def decode_side(global_size):
    """The longer side, in pixels, the device path decodes an image to at most: 512 at 224 px
    crops, scaled with global_size. ImageNet's typical 500 x 375 passes unchanged, and the global
    crops lose nothing: the smallest (0.3 of the area) of a 512 x 384 source is ~243 px of source
    for 224 px out. What the cap costs is the detail a big source gives the smallest local crops:
    a 0.05-scale crop is ~99 px of a 512 x 384 source for 128 px out (97 px on a 500 x 375 one),
    where the full 2,400 x 1,800 source gives ~465 px. What it buys: a batch is at most
    B x 3 x cap x cap bytes (50 MB for 64 images at 512) whatever the sources, where one
    2,400 x 1,800 image among 64 made the padded batch 829 MB, and a big JPEG decodes at 1/2 to
    1/8 scale."""
    return round(global_size * 512 / 224)


class BoundedDecode:
    """The device path's loader transform: an image -> uint8 (3, h, w) of what it shows, its longer
    side at most `max_side` (decode_image). ImageFiles reads `max_side` to decode a JPEG at reduced
    scale; images a data set hands over decoded (synthetic, CIFAR, STL) are capped here."""

    def __init__(self, max_side):
        self.max_side = max_side

    def __call__(self, image):
        return TF.pil_to_tensor(decode_image(image, self.max_side))


def collate_images(batch):
    """(uint8 (C, h, w) image, label) pairs of any sizes -> (uint8 (B, C, H, W), long (B, 2) true
    (h, w), labels). The padding repeats each image's last row and column, so that a bilinear crop
    at an image's edge reads what it would read on the image alone."""
    images, labels = zip(*batch)
    sizes = torch.tensor([image.shape[1:] for image in images])
    out = images[0].new_empty((len(images), images[0].shape[0], *sizes.max(0).values.tolist()))
    for k, (image, (h, w)) in enumerate(zip(images, sizes.tolist())):
        out[k, :, :h, :w] = image
        out[k, :, :h, w:] = image[:, :, w - 1:]
        out[k, :, h:] = out[k, :, h - 1:h]
    return out, sizes, torch.utils.data.default_collate(labels)


# From here on, nothing makes the host wait for the device: no boolean-mask indexing (the host
# counts the selected elements), no .item(), no tensor made from Python numbers per call (a
# blocking copy). An op drawn for some images runs on all, and torch.where keeps it where drawn.

def crop_boxes(sizes, scale, ratio=(3 / 4, 4 / 3), generator=None, tries=10):
    """torchvision's RandomResizedCrop.get_params for N images at once: sizes (N, 2) = (h, w) ->
    float (N, 4) boxes (left, top, width, height) in whole pixels."""
    rand = lambda *shape: torch.rand(len(sizes), *shape, generator=generator, device=sizes.device)
    height, width = sizes.float().unbind(1)
    area = (height * width)[:, None] * (scale[0] + (scale[1] - scale[0]) * rand(tries))
    log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_low + (log_high - log_low) * rand(tries))
    w, h = (area * aspect).sqrt().round(), (area / aspect).sqrt().round()
    fits = (w > 0) & (w <= width[:, None]) & (h > 0) & (h <= height[:, None])
    first, found = fits.int().argmax(1, keepdim=True), fits.any(1)
    in_ratio = width / height  # if no try fits: the whole image cut to the nearest allowed ratio
    fallback_w = torch.where(in_ratio > ratio[1], (height * ratio[1]).round(), width)
    fallback_h = torch.where(in_ratio < ratio[0], (width / ratio[0]).round(), height)
    w = torch.where(found, w.gather(1, first)[:, 0], fallback_w)
    h = torch.where(found, h.gather(1, first)[:, 0], fallback_h)
    free_y, free_x = height - h, width - w  # the fallback is centred
    top = torch.where(found, (rand() * (free_y + 1)).floor().minimum(free_y), free_y // 2)
    left = torch.where(found, (rand() * (free_x + 1)).floor().minimum(free_x), free_x // 2)
    return torch.stack([left, top, w, h], 1)


def resized_crops(images, index, boxes, size):
    """images[index[k]] cut to boxes[k] (left, top, width, height), resized to (size, size), float:
    bilinear, averaging ceil(box side / size)^2 samples per pixel when shrinking (roi_align)."""
    rois = torch.cat([index[:, None].float(), boxes[:, :2], boxes[:, :2] + boxes[:, 2:]], 1)
    return torchvision.ops.roi_align(images.float(), rois, size, aligned=True)


# torchvision.transforms.functional's tensor ops on float (N, 3, H, W) in [0, 1], a factor per image
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
    """RGB -> HSV, hue + shift (in turns), -> RGB (v - c * clamp(min(k, 4 - k), 0, 1))."""
    r, g, b = x.unbind(1)
    v = x.amax(1)
    c = v - x.amin(1)
    safe_c = torch.where(c == 0, 1, c)
    hue = torch.where(v == r, (g - b) / safe_c,
                      torch.where(v == g, 2 + (b - r) / safe_c, 4 + (r - g) / safe_c))
    hue = (hue + 6 * shift.view(-1, 1, 1)).unsqueeze(1)  # in sixths of a turn
    k = (torch.arange(5.0, 0.0, -2.0, device=x.device).view(1, 3, 1, 1) + hue) % 6  # 5, 3, 1
    return v.unsqueeze(1) - c.unsqueeze(1) * torch.minimum(k, 4 - k).clamp(0, 1)


def solarize(x):
    return torch.where(x >= 128 / 255, 1 - x, x)


def gaussian_blur(x, sigma, radius=6):
    """torchvision's gaussian_blur (2 * radius + 1 taps, reflect padding), a sigma per image."""
    n, c, h, w = x.shape
    if n == 0:
        return x
    taps = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    kernel = torch.exp(-0.5 * (taps / sigma[:, None]) ** 2)
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(c, 0)
    x = F.pad(x.reshape(1, n * c, h, w), [radius] * 4, mode="reflect")
    x = F.conv2d(x, kernel[:, None, :, None], groups=n * c)
    return F.conv2d(x, kernel[:, None, None, :], groups=n * c).view(n, c, h, w)


def augment(x, drawn):
    """MultiCropTransform.one_view after the crop, on float (N, 3, s, s) in [0, 1], as drawn."""
    where = lambda key, done, undone: torch.where(drawn[key].view(-1, 1, 1, 1), done, undone)
    x = where("flipped", x.flip(-1), x)
    jittered = x
    for step in range(4):  # image i does op o = order[i, step] with factor factors[i, o]
        op = drawn["order"][:, step]
        factor = drawn["factors"].gather(1, op[:, None])[:, 0]
        out = adjust_hue(jittered, factor)
        for k, adjust in enumerate((adjust_brightness, adjust_contrast, adjust_saturation)):
            out = torch.where(op.view(-1, 1, 1, 1) == k, adjust(jittered, factor), out)
        jittered = out
    x = where("jittered", jittered, x)
    x = where("grayscale", rgb_to_grayscale(x).expand_as(x), x)
    x = where("blurred", gaussian_blur(x, drawn["sigma"]), x)
    return where("solarized", solarize(x), x)


class DeviceMultiCrop:
    """uint8 (B, 3, H, W) images padded by collate_images (`sizes` (B, 2) = true (h, w); None =
    whole) -> [global_1, global_2, local_1, ...] float (B, 3, s, s): MultiCropTransform + normalize,
    in one batched pass per crop size on the images' device. Departures: DEVICE_VIEWS_DEPARTURES."""

    def __init__(self, recipe: ViewRecipe):
        self.recipe = recipe
        specs = MultiCropTransform(recipe).view_specs()  # (size, scale, blur_p, solarize_p)
        self.groups = [specs[:2], specs[2:]] if recipe.local_crops else [specs[:2]]  # by size
        b, c, s, h = recipe.jitter  # the range of each factor, as in T.ColorJitter
        self.jitter_ranges = [(max(0, 1 - b), 1 + b), (max(0, 1 - c), 1 + c),
                              (max(0, 1 - s), 1 + s), (-h, h)]

    def __call__(self, images, sizes=None, generator=None, memory_format=torch.contiguous_format):
        views = self.sample(images, sizes, generator)
        return [view.contiguous(memory_format=memory_format) for view, _ in views]

    def sample(self, images, sizes=None, generator=None):
        """Like __call__, and also what was done to each view: its part of `draw`'s record."""
        if sizes is None:  # every image fills the batch tensor
            sizes = torch.stack([torch.full((len(images),), side, device=images.device)
                                 for side in images.shape[-2:]], 1)
        return self.apply(images, self.draw(sizes.to(images.device, non_blocking=True), generator))

    def draw(self, sizes, generator=None):
        """Every random choice for images of true sizes (B, 2) = (h, w), on their device: per crop
        size a dict of tensors with a row per view and image (view-major)."""
        r, b = self.recipe, len(sizes)
        rand = lambda *shape: torch.rand(shape, generator=generator, device=sizes.device)
        uniform = lambda n: torch.stack([low + (high - low) * u for (low, high), u
                                         in zip(self.jitter_ranges, rand(n, 4).unbind(1))], 1)
        drawn = []
        for views in self.groups:  # drawn in this order, keyword by keyword
            n = len(views) * b
            drawn.append(dict(
                box=crop_boxes(sizes.repeat(len(views), 1), views[0][1], generator=generator),
                flipped=rand(n) < r.flip_p, jittered=rand(n) < r.jitter_p,
                factors=uniform(n), order=rand(n, 4).argsort(1), grayscale=rand(n) < r.grayscale_p,
                blurred=torch.cat([rand(b) < blur_p for _, _, blur_p, _ in views]),
                sigma=0.1 + 1.9 * rand(n),  # px, as the PIL path's radius
                solarized=torch.cat([rand(b) < solarize_p for *_, solarize_p in views])))
        return drawn

    def apply(self, images, drawn):
        """The views of uint8 `images` made as `drawn` says -> [(view, its record)] in order."""
        b, device = len(images), images.device
        mean, std, _, _ = imagenet_stats(device)
        source, out = images.float(), []
        for views, record in zip(self.groups, drawn):
            index = torch.arange(b, device=device).repeat(len(views))
            x = augment(resized_crops(source, index, record["box"], views[0][0]) / 255, record)
            parts = {key: value.split(b) for key, value in record.items()}
            out += [(view, {key: value[i] for key, value in parts.items()})
                    for i, view in enumerate(((x - mean) / std).split(b))]
        return out


def view_pipeline(recipe, views_on="loader", max_side=None):
    """-> (the data set's transform, the loader's collate_fn, the device sampler or None): the
    loader processes make the views (PIL, from the full-size image), or only decode, to at most
    max_side (None: decode_side(recipe.global_size)), and DeviceMultiCrop makes them."""
    if views_on == "device":
        max_side = max_side or decode_side(recipe.global_size)
        return BoundedDecode(max_side), collate_images, DeviceMultiCrop(recipe)
    return MultiCropTransform(recipe), None, None


def batch_to_crops(batch, device, memory_format=torch.contiguous_format, sampler=None):
    """A loader batch -> the [global_1, global_2, local_1, ...] crops on `device`, normalised: the
    loader's uint8 crops, or with a device sampler the views of the decoded images, made there."""
    if sampler is None:
        crops, _ = batch
        return [normalize(c, device, memory_format) for c in crops]
    images, sizes, _ = batch
    return sampler(images.to(device, non_blocking=True), sizes, memory_format=memory_format)


class Prefetcher:
    """Iterates a loader one batch ahead. On CUDA, batch i + 1's tensors (pinned by the loader) are
    copied on a side stream while step i computes, and step i waits for batch i's copies only.
    Elsewhere batches pass through unchanged, as do the leaves of a batch that are not tensors."""

    def __init__(self, loader, device):
        self.loader, self.device = loader, device

    def __len__(self):
        return len(self.loader)

    def _each(self, batch, fn):
        if isinstance(batch, (list, tuple)):
            return [self._each(b, fn) for b in batch]
        return fn(batch) if isinstance(batch, torch.Tensor) else batch

    def _ready(self, batch, copied):
        compute = torch.cuda.current_stream(self.device)
        compute.wait_event(copied)  # the step reads the batch once its copies are done
        self._each(batch, lambda t: t.record_stream(compute))  # memory kept until the step is done
        return batch

    def __iter__(self):
        if self.device.type != "cuda":
            yield from self.loader
            return
        side, upcoming = torch.cuda.Stream(self.device), None
        for batch in self.loader:
            with torch.cuda.stream(side):  # batch i + 1's copies, queued before batch i goes out
                batch = self._each(batch, lambda t: t.to(self.device, non_blocking=True))
            current, upcoming = upcoming, (batch, side.record_event())  # the event: copies done
            if current is not None:
                yield self._ready(*current)
        if upcoming is not None:
            yield self._ready(*upcoming)


# --- Data sets: an image folder, a torchvision set, or the built-in synthetic demo ---

DATA_HELP = ("an ImageFolder root (DIR/train), a flat folder of images, cifar10 | cifar100 | stl10 "
             "(torchvision, downloaded into ./data), or synthetic (built in, no files)")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
# Larger images are skipped as unreadable, known from the header before anything is decoded. PIL
# refuses only images over 179 megapixels, and a 12000 x 12000 PNG of 17 KB under that costs its
# loader process 1.6 GB. 50 megapixels (150 MB as RGB) keeps the photos of 48-megapixel cameras.
MAX_IMAGE_PIXELS = 50_000_000
TEXTURES = ["h_stripes", "v_stripes", "checker", "dots", "rings", "grid", "triangles", "crosses",
            "diagonal", "zigzag"]


class SyntheticTextures(torch.utils.data.Dataset):
    """The built-in demo set, made on the fly: 10 classes, each a periodic pattern that FILLS the
    image in the same two grey levels, so that what two crops of an image share is the class, not
    a colour (README, "the data set"). Per image vary the period, phase, thickness and direction."""

    BACKGROUND, FOREGROUND = (30, 30, 30), (225, 225, 225)

    def __init__(self, num_images=640, size=64, transform=None, seed=0):
        self.num_images, self.size, self.transform, self.seed = num_images, size, transform, seed
        self.classes = TEXTURES

    def __len__(self):
        return self.num_images

    def render(self, index):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        rand = lambda: torch.rand((), generator=g).item()
        label, s, fg = index % len(TEXTURES), self.size, self.FOREGROUND
        name = TEXTURES[label]
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
                    draw.polygon([(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)],
                                 fill=fg)
                elif name == "crosses":
                    a, w = p * 0.4, max(1, p * 0.12)
                    draw.rectangle([cx - a, cy - w, cx + a, cy + w], fill=fg)
                    draw.rectangle([cx - w, cy - a, cx + w, cy + a], fill=fg)
                elif name == "rings":
                    draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=fg,
                                 width=max(1, round(p * 0.12)))
        if name == "diagonal":
            direction = 1 if rand() < 0.5 else -1
            for k in range(-n, 2 * n):
                x0, w = ox + k * p, t * 1.2
                if direction > 0:
                    draw.polygon([(x0, 0), (x0 + w, 0), (x0 + w - s, s), (x0 - s, s)], fill=fg)
                else:
                    draw.polygon([(x0 - s, 0), (x0 - s + w, 0), (x0 + w, s), (x0, s)], fill=fg)
        elif name == "zigzag":
            for j in range(-1, n):
                xs = [ox + k * p / 2 - p for k in range(2 * n + 2)]
                draw.line([(x, oy + j * p + (p * 0.4 if k % 2 else 0)) for k, x in enumerate(xs)],
                          fill=fg, width=max(1, round(p * 0.18)))
        return image, label

    def __getitem__(self, index):
        image, label = self.render(index)
        return (self.transform(image) if self.transform else image), label


def hidden(name):
    """Files and folders the system made, not the user: .DS_Store, macOS's AppleDouble ._x.jpg
    (a few bytes beside every image copied from a Mac), the __MACOSX folder of its zip files."""
    return name.startswith(".") or name == "__MACOSX"


def list_folder(folder):
    """-> (sub-folders, [(path, real path)] of the files) of `folder`, sorted, hidden ones left
    out. A file's real path is where its links lead, so that a file is counted once."""
    try:
        entries = sorted((e for e in os.scandir(folder) if not hidden(e.name)),
                         key=lambda e: e.name)
    except OSError as error:  # unreadable: its images would be missing without a word
        raise UserError(f"cannot read the folder {folder!r}: {error.strerror or error}") from None
    real = os.path.realpath(folder)
    return ([e.path for e in entries if e.is_dir()],
            [(e.path, os.path.realpath(e.path) if e.is_symlink() else os.path.join(real, e.name))
             for e in entries if not e.is_dir()])


def scan_folder(top):
    """-> [(path, real path)] of the files at any depth under `top`, folder by folder in sorted
    order. Links are followed, but each real folder is entered once: a folder linked twice is read
    once, and a link to a folder above it (a loop) ends there instead of repeating its files."""
    files, seen, stack = {}, set(), [top]
    while stack:
        folder = stack.pop()
        real = os.path.realpath(folder)
        if real in seen:
            continue
        seen.add(real)
        subfolders, files[folder] = list_folder(folder)
        stack += reversed(subfolders)  # the first in sorted order is entered first
    return [file for folder in sorted(files) for file in files[folder]]


class ImageFiles(torch.utils.data.Dataset):
    """Images under `root`: root/<class>/<image>, or a flat folder (label 0). An unreadable image
    (broken, a bomb, over MAX_IMAGE_PIXELS) is skipped with a warning, for the next one. The count
    of bad images is in shared memory: the 1% limit is per run, with any number of loaders."""

    def __init__(self, root, transform=None, classes=None):
        """Images at any depth below a class folder are the class's. Labels go by class name: the
        k-th of `classes` (the train split's, for a val split), else of this folder's own, sorted,
        those without images included, so that a class missing from one split shifts nothing."""
        if not os.path.isdir(root):
            raise UserError(f"{root!r}: no such folder")
        self.root, self.transform = root, transform
        is_image = lambda path: path.lower().endswith(IMAGE_EXTENSIONS)
        subfolders, loose = list_folder(root)
        folders = {os.path.basename(f): scan_folder(f) for f in subfolders}
        found = loose + [file for files in folders.values() for file in files]
        others = [path for path, _ in found if not is_image(path)]
        images = {name: [f for f in files if is_image(f[0])] for name, files in folders.items()}
        self.flat = not any(images.values())
        if self.flat:  # a flat folder of unlabelled images (its sub-folders hold none)
            images = {"unlabelled": [f for f in loose if is_image(f[0])]}
        elif any(is_image(path) for path, _ in loose):  # of no class: ask, rather than drop them
            raise UserError(f"{root!r} holds images beside its class folders: move them into a "
                            "class folder (<class>/<image>), or into a folder of their own")
        elif "train" in folders and set(folders) <= {"train", "val", "test"}:
            # Classes named train and val are a data set's root, given for its train split.
            raise UserError(f"{root!r} holds {'/, '.join(folders)}/ folders, not classes: pass "
                            f"{os.path.join(root, 'train')}")
        if classes is not None and self.flat:
            raise UserError(
                f"{root!r} holds no class folders, so its images have no labels: sort them into "
                "<class>/<image> folders named as train's (ImageNet's flat val/: run valprep.sh of "
                "the PyTorch ImageNet example in it, or move each file by LOC_val_solution.csv)")
        self.classes = list(images if classes is None else classes)
        label = {name: k for k, name in enumerate(self.classes)}
        unknown = [name for name, files in images.items() if files and name not in label]
        if unknown:
            raise UserError(f"{root!r} has {len(unknown)} class folder(s) that train has not, so "
                            f"no label: {', '.join(unknown[:5])}{' ...' * (len(unknown) > 5)}")
        # A file reached by several paths (links) is counted once, with the label of the class
        # folder it really lies in (a real folder before a linked one), else of its first path.
        owner = {}  # real folder -> label of the class folder it is in, None if outside them all
        for name in sorted(images, key=lambda name: os.path.islink(os.path.join(root, name))):
            if name in label and not self.flat:
                owner.setdefault(os.path.realpath(os.path.join(root, name)), label[name])
        chosen = {}
        for name, files in images.items():
            for path, real in files:
                folder = real.rpartition(os.sep)[0]
                if folder not in owner:  # the folders up to a known one, or to / (None)
                    chain = [folder]
                    while chain[-1] not in owner and os.path.dirname(chain[-1]) != chain[-1]:
                        chain.append(os.path.dirname(chain[-1]))
                    owner.update(dict.fromkeys(chain, owner.get(chain[-1])))
                chosen.setdefault(real, (path, label[name] if owner[folder] is None
                                         else owner[folder]))
        self.samples = sorted(chosen.values(), key=lambda sample: sample[1])  # stable: by class
        # Said once per kind, not once per file: ImageNet's train/ alone has 1.28M files.
        empty = [] if self.flat else [name for name, files in images.items() if not files]
        duplicates = len(found) - len(others) - len(self.samples)
        if duplicates:
            warnings.warn(f"{root}: {duplicates} images reached by more than one path (links) "
                          "are counted once")
        if others:
            warnings.warn(f"{root}: skipping {len(others)} files that are not images by their "
                          f"extension ({' '.join(IMAGE_EXTENSIONS)}), e.g. {others[0]}")
        if empty:
            warnings.warn(f"{root}: {len(empty)} class folders hold no images (their labels are "
                          f"kept: labels go by class name): {', '.join(empty[:5])}")
        if not self.samples:
            raise UserError(f"{root!r}: no image files ({', '.join(IMAGE_EXTENSIONS)}) under it")
        self.bad = torch.zeros(len(self.samples), dtype=torch.bool).share_memory_()

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        for offset in range(len(self.samples)):
            k = (index + offset) % len(self.samples)
            path, label = self.samples[k]
            try:
                with Image.open(path) as f:  # reads the header only
                    if f.width * f.height > MAX_IMAGE_PIXELS:
                        raise ValueError(f"{f.width} x {f.height} pixels, more than "
                                         f"views.MAX_IMAGE_PIXELS = {MAX_IMAGE_PIXELS}")
                    # Decoded here, not in the transform, to be skipped if it fails; a transform
                    # with a max_side (BoundedDecode) gets a big JPEG decoded at reduced scale.
                    image = decode_image(f, getattr(self.transform, "max_side", None))
            except (OSError, ValueError, Image.DecompressionBombError) as error:
                if not self.bad[k]:
                    self.bad[k] = True
                    warnings.warn(f"skipping unreadable image {path}: {error}")
                if self.bad.sum() > max(1, 0.01 * len(self.samples)):
                    raise UserError(f"more than 1% of the images under {self.root} are unreadable "
                                    f"({int(self.bad.sum())} so far, e.g. {path})") from None
                continue
            return (self.transform(image) if self.transform else image), label
        raise UserError(f"no readable image under {self.root}")


BACKGROUND = (255, 255, 255)  # under transparent pixels: a viewer's white page
EXIF_ORIENTATION = 0x0112


def decode_image(image, max_side=None):
    """A PIL image, opened from a file or decoded -> a new RGB image of what a viewer shows, its
    longer side at most max_side (None: full size, the paper's pipeline). convert("RGB") alone
    would train on something else: a photo as stored, not as the camera was turned (EXIF); 16-bit
    greys clipped to white; the colour hidden under transparent pixels. What cannot be shown as
    RGB raises ValueError or OSError, for ImageFiles to skip."""
    if max_side and max(image.size) > max_side:
        # A no-op but on a JPEG not yet decoded: its decoder works at 1/2, 1/4 or 1/8 scale, the
        # smallest that keeps twice the final size (as PIL's thumbnail, reducing_gap=2), which the
        # antialiased resize below takes down as well as it would the full-size image.
        scale = 2 * max_side / max(image.size)
        image.draft("RGB", (round(image.width * scale), round(image.height * scale)))
    try:
        turned = image.getexif().get(EXIF_ORIENTATION, 1) != 1  # the camera was turned
    except SyntaxError:  # PIL's word for a broken EXIF block (a PNG's, a WebP's): pixels are fine
        turned = False
    if turned:
        image = ImageOps.exif_transpose(image)
    if image.mode == "F":
        raise ValueError("32-bit float pixels, in no agreed range of values")
    if image.mode.startswith("I"):  # 16-bit greys (I;16*, and I as older PILs read 16-bit PNGs)
        image = image.convert("I").point(lambda v: v / 257 + 0.5).convert("L")
    if image.mode.endswith(("A", "a")) or "transparency" in image.info:
        background = Image.new("RGBA", image.size, BACKGROUND)
        image = Image.alpha_composite(background, image.convert("RGBA"))
    image = image.convert("RGB")  # a new image also when it was RGB: the caller closes the file
    if max_side and max(image.size) > max_side:
        scale = max_side / max(image.size)
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image = image.resize(size, Image.BICUBIC)  # antialiased: the filter widens as it shrinks
    return image


def build_dataset(data, transform=None, split="train", download=True):
    """--data value -> Dataset of (transform(image), label). split: "train" (STL-10's includes its
    100k unlabelled images), "labelled" (for kNN banks and probes) or "val"."""
    if data == "synthetic":
        val = split == "val"
        return SyntheticTextures(500 if val else 640, transform=transform, seed=int(val))
    if data in ("cifar10", "cifar100", "stl10"):
        stl10_splits = {"train": "train+unlabeled", "labelled": "train", "val": "test"}
        which = dict(split=stl10_splits[split]) if data == "stl10" else dict(train=split != "val")
        try:  # torchvision.datasets.CIFAR10, CIFAR100 or STL10
            return getattr(torchvision.datasets, data.upper())(
                "data", download=download, transform=transform, **which)
        except Exception as error:  # offline and not on disk yet
            raise UserError(f"--data {data}: not in ./data and not downloadable ({error}); "
                            "download it once with internet, or pass an ImageFolder path") from None
    return ImageFiles(data, transform)


def build_eval_datasets(eval_data, transform, train_transform=None, download=True):
    """-> (labelled train set, val set): a root with train/ and val/ image folders, or a named set.
    The train set uses train_transform when given (linear probe), else transform (kNN bank)."""
    if eval_data in ("synthetic", "cifar10", "cifar100", "stl10"):
        return (build_dataset(eval_data, train_transform or transform, "labelled", download),
                build_dataset(eval_data, transform, "val", download))
    for split in ("train", "val"):
        if not os.path.isdir(os.path.join(eval_data, split)):
            raise UserError(f"{eval_data!r} has no {split}/ folder (need ROOT/train, ROOT/val)")
    train = ImageFiles(os.path.join(eval_data, "train"), train_transform or transform)
    if train.flat:
        raise UserError(f"{os.path.join(eval_data, 'train')!r} holds no class folders: labelled "
                        "images go in train/<class>/<image> and val/<class>/<image>")
    # val's labels are train's class names: a class missing from either split shifts nothing
    return train, ImageFiles(os.path.join(eval_data, "val"), transform, train.classes)


# --- The picture: sampled boxes on the source image, the augmented crops beside it ---

BOX_COLORS = ["#e6194b", "#f58231", "#3cb44b", "#4363d8", "#911eb4", "#42d4f4",
              "#f032e6", "#bfef45", "#469990", "#9a6324", "#800000", "#000075"]


def draw_views(image, recipe, title="", panel=224):
    """One row: the source (boxes: thick = global, thin = local) then every view at its true
    relative size (a 128 px local is drawn 128/224 the size of a global crop)."""
    image = image.convert("RGB")
    views = MultiCropTransform(recipe).sample(image)
    scale, pad, label_h = panel / max(image.size), 6, 16
    source = image.resize((round(image.width * scale), round(image.height * scale)), Image.BICUBIC)
    sides = [round(panel * tensor.shape[-1] / recipe.global_size) for tensor, _ in views]
    row = Image.new("RGB", (source.width + pad + sum(side + 4 + pad for side in sides),
                            panel + 4 + 2 * label_h), "white")
    draw, boxes, x = ImageDraw.Draw(row), ImageDraw.Draw(source), source.width + pad
    draw.text((2, 1), title, fill="black")
    for i, ((tensor, info), side) in enumerate(zip(views, sides)):
        left, top, w, h = (v * scale for v in info["box"])
        boxes.rectangle([left, top, left + w, top + h], outline=BOX_COLORS[i % 12],
                        width=3 if i < 2 else 1)
        draw.rectangle([x, label_h, x + side + 3, label_h + side + 3], fill=BOX_COLORS[i % 12])
        row.paste(TF.to_pil_image(tensor).resize((side, side), Image.BICUBIC), (x + 2, label_h + 2))
        name = ("g%d" % (i + 1) if i < 2 else "l%d" % (i - 1))
        name += (" blur" if info["blurred"] else "") + (" sol" if info["solarized"] else "")
        draw.text((x, label_h + side + 5), name, fill="black")
        x += side + 4 + pad
    row.paste(source, (0, label_h))
    return row


def describe(recipe):
    alpha, beta = recipe.alpha_beta
    return (f"global {recipe.global_size}px scale {recipe.global_scale} | {recipe.local_crops} "
            f"local {recipe.local_size}px scale {recipe.local_scale} | loss weights gg "
            f"{alpha:.3f} gl {beta:.3f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Draw the multi-crop views sampled from an image.")
    parser.add_argument("image", help="path of an image file")
    parser.add_argument("--method", default="dino", choices=["dino", "moco", "swav"])
    parser.add_argument("--vit", action="store_true", help="DINO's ViT recipe (10 locals)")
    parser.add_argument("--recipe", default="light", choices=["light", "baseline", "classic"])
    parser.add_argument("--compare", action="store_true", help="baseline and light, a row each")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="views.png")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    source = decode_image(Image.open(args.image))
    rows = []
    for name in (["baseline", "light"] if args.compare else [args.recipe]):
        recipe = get_recipe(args.method, name, args.vit)
        rows.append(draw_views(source, recipe, f"{args.method} {name}: {describe(recipe)}"))
    sheet = Image.new("RGB", (max(r.width for r in rows), sum(r.height for r in rows)), "white")
    for i, r in enumerate(rows):
        sheet.paste(r, (0, sum(r.height for r in rows[:i])))
    # 256 colours: about a third of the size
    (sheet.quantize(256) if args.out.lower().endswith(".png") else sheet).save(args.out)
    print(f"wrote {args.out}")
