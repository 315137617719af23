"""Multi-crop view sampling: the paper's contribution (SSLight, Tan, Saleh, Martinez, ICLR 2023).

The paper changes no SSL objective. For small networks it changes only how views are sampled and
how the loss pairs are weighted (spec §0):

    global crops   scale (0.14 or 0.25, 1)    ->  (0.3, 1)
    local crops    scale (0.05, 0.14 or 0.25) ->  (0.05, 0.3)
    local size     96 px                      ->  128 px
    loss weights   plain average over pairs   ->  0.4 * mean(global-global) + 0.6 * mean(global-local)

Everything else (number of crops, colour augmentation, optimiser) is identical between the
`baseline` and the `light` recipe. This file holds the recipes as data (`RECIPES`), a
transform that turns one PIL image into [global_1, global_2, local_1 .. local_n] tensors, and a
picture of what is sampled:

    python views.py photo.jpg --method dino --recipe light --compare --out views.png
"""
import argparse
import dataclasses
from dataclasses import dataclass

import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image, ImageDraw, ImageFilter, ImageOps

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
REFERENCE_GLOBAL_SIZE = 224  # crop sizes in the recipes are for 224 px global crops


@dataclass(frozen=True)
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
    interpolation: str = "bicubic"  # the paper's code uses bicubic crops for all methods (§1.1)

    @property
    def alpha_beta(self):
        """Weights of the averaged global-global and global-local loss terms.

        Baseline = the original methods' plain average over all pairs. In DINO and SwAV each of
        the 2 global views is paired with the other global view (2 gg pairs) and with every local
        (2 * n gl pairs); in MoCo the key g1 is paired with g2 (1) and every local (n). Either way
        alpha = n_gg / (n_gg + n_gl) = 1 / (1 + n_local): 1/7 for 6 locals, 1/11 for 10 (§1.3)."""
        if self.loss_weights is not None:
            return tuple(self.loss_weights)
        n = self.local_crops
        return (1.0 / (1 + n), n / (1.0 + n))


_DINO_JITTER = dict(jitter=(0.4, 0.4, 0.2, 0.1), blur_p=(1.0, 0.1, 0.5), solarize_p=0.2)
# SwAV's own augmentation: strong jitter, blur 0.5 on every view, no solarize (spec §1.2).
_SWAV_JITTER = dict(jitter=(0.8, 0.8, 0.8, 0.2), blur_p=(0.5, 0.5, 0.5), solarize_p=0.0)

# Spec §1.1 / §1.2. Keys: (method, recipe). DINO has a CNN and a ViT variant.
RECIPES = {
    ("dino_cnn", "baseline"): ViewRecipe((0.14, 1.0), (0.05, 0.14), 6, 96, **_DINO_JITTER),
    ("dino_cnn", "light"): ViewRecipe((0.3, 1.0), (0.05, 0.3), 6, 128, loss_weights=(0.4, 0.6), **_DINO_JITTER),
    ("dino_vit", "baseline"): ViewRecipe((0.25, 1.0), (0.05, 0.25), 10, 96, **_DINO_JITTER),
    ("dino_vit", "light"): ViewRecipe((0.3, 1.0), (0.05, 0.3), 10, 128, loss_weights=(0.4, 0.6), **_DINO_JITTER),
    ("moco", "baseline"): ViewRecipe((0.14, 1.0), (0.05, 0.14), 6, 96, **_DINO_JITTER),
    ("moco", "light"): ViewRecipe((0.3, 1.0), (0.05, 0.3), 6, 128, loss_weights=(0.4, 0.6), **_DINO_JITTER),
    # The original 2-view MoCo-v2 "aug+" (official_repos §1.2): RandomResizedCrop(0.2, 1) bilinear,
    # jitter (0.4, 0.4, 0.4, 0.1), blur p 0.5 on both views, no solarize, no local crops.
    ("moco", "classic"): ViewRecipe((0.2, 1.0), (0.05, 0.2), 0, 96, loss_weights=(1.0, 0.0),
                                    jitter=(0.4, 0.4, 0.4, 0.1), blur_p=(0.5, 0.5, 0.5),
                                    solarize_p=0.0, interpolation="bilinear"),
    ("swav", "baseline"): ViewRecipe((0.14, 1.0), (0.05, 0.14), 6, 96, **_SWAV_JITTER),
    ("swav", "light"): ViewRecipe((0.3, 1.0), (0.05, 0.3), 6, 128, loss_weights=(0.4, 0.6), **_SWAV_JITTER),
}


def get_recipe(method, recipe="light", arch="resnet18", **overrides):
    """The recipe of `method` (dino / moco / swav) and `recipe` (light / baseline / classic), with
    any field overridden. Overriding global_size alone rescales local_size by the same ratio,
    so 112 px global crops get 48 (baseline) or 64 (light) px local crops."""
    key = method
    if method == "dino":
        key = "dino_vit" if arch.startswith("vit") else "dino_cnn"
    if (key, recipe) not in RECIPES:
        valid = sorted(r for m, r in RECIPES if m == key)
        if not valid:
            raise ValueError(f"unknown method {method!r}; valid: dino, moco, swav")
        raise ValueError(f"no recipe {recipe!r} for {method}; valid: {', '.join(valid)}")
    base = RECIPES[(key, recipe)]
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if "global_size" in overrides and "local_size" not in overrides:
        ratio = overrides["global_size"] / REFERENCE_GLOBAL_SIZE
        overrides["local_size"] = max(1, round(base.local_size * ratio))
    for name in ("global_scale", "local_scale", "loss_weights", "jitter", "blur_p"):
        if name in overrides:
            overrides[name] = tuple(overrides[name])
    return dataclasses.replace(base, **overrides)


class MultiCropTransform:
    """PIL image -> [global_1, global_2, local_1, ..., local_n] normalised float tensors.

    One pipeline is shared by all views; only blur (g1 / g2 / locals) and solarize (g2 only)
    differ per view. Order inside a view (spec §1.2): crop -> flip -> colour jitter (with p) ->
    grayscale -> Gaussian blur -> solarize -> tensor -> normalise. All randomness comes from
    torch's RNG, so torch.manual_seed (and DataLoader worker seeding) makes it reproducible."""

    def __init__(self, recipe: ViewRecipe):
        self.recipe = recipe
        self.interpolation = T.InterpolationMode(recipe.interpolation)
        self.color_jitter = T.ColorJitter(*recipe.jitter)

    def view_specs(self):
        """(size, scale, blur_p, solarize_p) of each view, in output order."""
        r = self.recipe
        blur_g1, blur_g2, blur_local = r.blur_p
        specs = [(r.global_size, r.global_scale, blur_g1, 0.0),
                 (r.global_size, r.global_scale, blur_g2, r.solarize_p)]
        return specs + [(r.local_size, r.local_scale, blur_local, 0.0)] * r.local_crops

    def __call__(self, image):
        return [view for view, _ in self.sample(image)]

    def sample(self, image):
        """Like __call__ but also returns, per view, what was done: the crop box (left, top,
        width, height) in source pixels and whether it was blurred / solarised."""
        image = image.convert("RGB")
        return [self._one_view(image, *spec) for spec in self.view_specs()]

    def _one_view(self, image, size, scale, blur_p, solarize_p):
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
            radius = 0.1 + 1.9 * torch.rand(()).item()
            view = view.filter(ImageFilter.GaussianBlur(radius=radius))
        solarized = bool(torch.rand(()) < solarize_p)
        if solarized:
            view = ImageOps.solarize(view, threshold=128)
        tensor = TF.normalize(TF.to_tensor(view), IMAGENET_MEAN, IMAGENET_STD)
        return tensor, dict(box=(left, top, w, h), blurred=blurred, solarized=solarized)


def eval_transform(global_size=224):
    """Resize(256) + CenterCrop(224), bicubic, scaled for other global sizes (spec §1.2, §4.1)."""
    resize = round(global_size * 256 / 224)
    return T.Compose([T.Resize(resize, interpolation=T.InterpolationMode.BICUBIC),
                      T.CenterCrop(global_size), T.ToTensor(),
                      T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


# ----------------------------------------------------------------------------------------------
# The picture: sampled boxes on the source image, augmented crops beside it
# ----------------------------------------------------------------------------------------------

BOX_COLORS = ["#e6194b", "#f58231", "#3cb44b", "#4363d8", "#911eb4", "#42d4f4",
              "#f032e6", "#bfef45", "#469990", "#9a6324", "#800000", "#000075"]


def _to_pil(tensor):
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return TF.to_pil_image((tensor * std + mean).clamp(0, 1))


def draw_views(image, recipe, title="", panel=224):
    """One row: the source (boxes: thick = global, thin = local) then every view at its true
    relative size (a 128 px local is drawn 128/224 the size of a global crop)."""
    image = image.convert("RGB")
    views = MultiCropTransform(recipe).sample(image)
    scale = panel / max(image.size)
    source = image.resize((round(image.width * scale), round(image.height * scale)), Image.BICUBIC)
    draw = ImageDraw.Draw(source)
    for i, (_, info) in enumerate(views):
        left, top, w, h = (v * scale for v in info["box"])
        draw.rectangle([left, top, left + w, top + h], outline=BOX_COLORS[i % len(BOX_COLORS)],
                       width=3 if i < 2 else 1)
    pad, label_h = 6, 16
    tiles = []
    for i, (tensor, info) in enumerate(views):
        side = round(panel * tensor.shape[-1] / recipe.global_size)
        tile = _to_pil(tensor).resize((side, side), Image.BICUBIC)
        framed = Image.new("RGB", (side + 4, side + 4), BOX_COLORS[i % len(BOX_COLORS)])
        framed.paste(tile, (2, 2))
        tiles.append((framed, ("g%d" % (i + 1) if i < 2 else "l%d" % (i - 1))
                      + (" blur" if info["blurred"] else "") + (" sol" if info["solarized"] else "")))
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


def stack_rows(rows):
    sheet = Image.new("RGB", (max(r.width for r in rows), sum(r.height for r in rows)), "white")
    y = 0
    for r in rows:
        sheet.paste(r, (0, y))
        y += r.height
    return sheet


def describe(recipe):
    alpha, beta = recipe.alpha_beta
    return (f"global {recipe.global_size}px scale {recipe.global_scale} | {recipe.local_crops} local "
            f"{recipe.local_size}px scale {recipe.local_scale} | loss weights gg {alpha:.3f} gl {beta:.3f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Draw the multi-crop views sampled from one image.")
    parser.add_argument("image", help="path of an image file")
    parser.add_argument("--method", default="dino", choices=["dino", "moco", "swav"])
    parser.add_argument("--arch", default="resnet18", help="vit_* selects DINO's ViT recipe (10 locals)")
    parser.add_argument("--recipe", default="light", choices=["light", "baseline", "classic"])
    parser.add_argument("--compare", action="store_true", help="draw baseline and light, one row each")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="views.png")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    source = Image.open(args.image)
    names = ["baseline", "light"] if args.compare else [args.recipe]
    rows = []
    for name in names:
        recipe = get_recipe(args.method, name, args.arch)
        rows.append(draw_views(source, recipe, f"{args.method} {name}: {describe(recipe)}"))
    sheet = stack_rows(rows)
    if args.out.lower().endswith(".png"):  # 256 colours: ~1/3 of the RGB file size, hardly visible
        sheet = sheet.quantize(256)
    sheet.save(args.out)
    print(f"wrote {args.out}")
