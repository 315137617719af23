"""views.py's decode: image files of every kind PIL opens train, on both paths, as what a viewer
shows: CMYK and grey JPEGs and a PNG named .JPEG (ImageNet's train set has these), palette, 16-bit,
transparent and 1-bit PNGs, EXIF-rotated photos. Each image is made here with PIL, 16 x 16 unless
said."""
import os

import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image

import views

SIZE = 16
PLAIN = dict(global_scale=(1.0, 1.0), local_crops=0, flip_p=0.0, jitter_p=0.0, grayscale_p=0.0,
             blur_p=(0.0, 0.0, 0.0), solarize_p=0.0)


def shown(path):
    """uint8 (3, h, w) of the image at `path` as each path trains on it: the loader path's first
    global view (no augmentation, the whole image at its own size, so PIL's resize is a copy) and
    what the device path's loader hands to the sampler."""
    recipe = views.get_recipe("dino", "light", global_size=SIZE, **PLAIN)
    out = {}
    for views_on in ("loader", "device"):
        transform, _, _ = views.view_pipeline(recipe, views_on)
        image, _ = views.ImageFiles(os.path.dirname(path), transform)[0]
        out[views_on] = image[0] if views_on == "loader" else image
    return out


def save(tmp_path, image, name, **options):
    folder = tmp_path / name.replace(".", "_")
    folder.mkdir()
    image.save(folder / name, **options)
    return str(folder / name)


def assert_colour(image, rgb, tolerance=0):
    expected = torch.tensor(rgb, dtype=torch.int).view(3, 1, 1)
    assert (image.int() - expected).abs().max() <= tolerance, image[:, 0, 0].tolist()


@pytest.mark.parametrize("mode, colour, shows", [
    ("CMYK", (0, 255, 255, 0), (255, 0, 0)),  # passed before: PIL reads Adobe's inverted CMYK
    ("L", 90, (90, 90, 90)),                  # passed before
    ("RGB", (30, 120, 200), (30, 120, 200))])  # passed before
def test_jpegs_of_any_colour_space_train_as_their_colour(tmp_path, mode, colour, shows):
    path = save(tmp_path, Image.new(mode, (SIZE, SIZE), colour), "photo.JPEG", quality=100)
    if mode == "CMYK":
        assert Image.open(path).info.get("adobe"), "PIL writes CMYK JPEGs as Photoshop does"
    for image in shown(path).values():
        assert image.shape == (3, SIZE, SIZE)
        assert_colour(image, shows, tolerance=3)  # JPEG's rounding


def test_a_png_named_jpeg_trains_as_its_pixels(tmp_path):  # passed before
    path = save(tmp_path, Image.new("RGB", (SIZE, SIZE), (10, 200, 30)), "x.JPEG", format="PNG")
    for image in shown(path).values():
        assert_colour(image, (10, 200, 30))


def test_palette_and_1_bit_pngs_show_their_colours_and_transparency_shows_white(tmp_path):
    """Palette without transparency and 1-bit passed before; the transparent palette colour
    (red hidden under it) came out red."""
    palette = [0, 0, 255, 255, 0, 0] + [0] * 762  # 0 blue, 1 red
    image = Image.new("P", (SIZE, SIZE), 0)
    image.putpalette(palette)
    image.paste(1, (0, 0, SIZE, SIZE // 2))  # top half red
    opaque = save(tmp_path, image, "opaque.png")
    clear = save(tmp_path, image, "clear.png", transparency=1)  # red is transparent
    bits = Image.new("1", (SIZE, SIZE), 0)
    bits.paste(1, (0, 0, SIZE, SIZE // 2))
    one_bit = save(tmp_path, bits, "bits.png")
    white = (255, 255, 255)
    for path, top, bottom in [(opaque, (255, 0, 0), (0, 0, 255)), (clear, white, (0, 0, 255)),
                              (one_bit, white, (0, 0, 0))]:
        for image in shown(path).values():
            assert_colour(image[:, :SIZE // 2], top)
            assert_colour(image[:, SIZE // 2:], bottom)


def test_16_bit_greys_are_scaled_to_8_bits_not_clipped_to_white(tmp_path):
    """Failed before: every pixel of the gradient came out 255. PNGs open as I;16; the TIFF as I,
    the mode older PILs gave 16-bit PNGs."""
    ramp = Image.linear_gradient("L").resize((SIZE, SIZE))  # 0 at the top to 255 at the bottom
    ramp16 = ramp.convert("I").point(lambda v: 257 * v)  # 0 to 65535
    paths = [save(tmp_path, ramp16.convert("I;16"), "ramp16.png"),
             save(tmp_path, ramp16, "ramp.tif")]
    expected = TF.pil_to_tensor(ramp).expand(3, -1, -1)
    assert expected[:, 0].max() < 10 and expected[:, -1].min() > 245
    assert [Image.open(path).mode for path in paths] == ["I;16", "I"]
    for path in paths:
        for image in shown(path).values():
            assert torch.equal(image, expected)


def test_transparent_pixels_are_composited_on_white(tmp_path):
    """Failed before: the half-transparent red came out full red, the hidden green and grey came
    out where a viewer shows white."""
    rgba = Image.new("RGBA", (SIZE, SIZE), (0, 255, 0, 0))  # green under alpha 0
    rgba.paste((200, 0, 0, 128), (0, 0, SIZE, SIZE // 2))  # half-transparent red on top
    grey = Image.new("LA", (SIZE, SIZE), (100, 0))
    grey.paste((100, 255), (0, 0, SIZE, SIZE // 2))  # opaque on top, transparent below
    a = 128 / 255
    red_on_white = (round(200 * a + 255 * (1 - a)), round(255 * (1 - a)), round(255 * (1 - a)))
    for path, top, bottom in [(save(tmp_path, rgba, "rgba.png"), red_on_white, (255, 255, 255)),
                              (save(tmp_path, grey, "la.png"), (100, 100, 100), (255, 255, 255))]:
        for image in shown(path).values():
            assert_colour(image[:, :SIZE // 2], top, tolerance=1)
            assert_colour(image[:, SIZE // 2:], bottom)


def test_an_exif_rotated_photo_trains_upright(tmp_path):
    """Failed before: trained on the pixels as stored. Stored 16 x 12, left half red, right half
    blue, EXIF orientation 6 (the camera turned a quarter clockwise): a viewer shows it 12 wide
    and 16 high, red on top. On the loader path the 3:4 image is the whole first view."""
    stored = Image.new("RGB", (SIZE, 12), (255, 0, 0))
    stored.paste((0, 0, 255), (SIZE // 2, 0, SIZE, 12))
    exif = stored.getexif()
    exif[0x0112] = 6  # Orientation
    path = save(tmp_path, stored, "turned.jpg", exif=exif, quality=100)
    out = shown(path)
    assert out["device"].shape == (3, SIZE, 12)
    for image in out.values():
        assert_colour(image[:, :5], (255, 0, 0), tolerance=8)
        assert_colour(image[:, -5:], (0, 0, 255), tolerance=8)


def test_a_broken_exif_block_leaves_the_image_trainable(tmp_path):
    """PIL's EXIF parser raises SyntaxError on a PNG's broken EXIF block; the pixels are fine."""
    path = save(tmp_path, Image.new("RGB", (SIZE, SIZE), (5, 6, 7)), "x.png",
                exif=b"Exif\x00\x00not a tiff header")
    for image in shown(path).values():
        assert_colour(image, (5, 6, 7))


def test_float_images_are_skipped_and_named(tmp_path):
    """Failed before: a float TIFF in [0, 1] trained as black. Float pixels have no agreed range:
    the image is skipped with a warning that names it, for the next one."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.new("F", (SIZE, SIZE), 0.5).save(folder / "a_float.tif")
    Image.new("RGB", (SIZE, SIZE), (1, 2, 3)).save(folder / "b.png")
    transform, _, _ = views.view_pipeline(views.get_recipe("dino", "light"), "device")
    with pytest.warns(UserWarning, match=r"a_float\.tif: 32-bit float pixels"):
        image, _ = views.ImageFiles(str(folder), transform)[0]
    assert_colour(image, (1, 2, 3))
