"""views.py's image folders: what unreadable and oversized images do to a run."""
import os
import warnings

import PIL.ImageFile
import pytest
import torch
import torchvision
from PIL import Image

import views


def write_images(folder, names, size=8):
    os.makedirs(folder, exist_ok=True)
    for k, name in enumerate(names):
        Image.new("RGB", (size, size), (k % 256, 7, 9)).save(os.path.join(folder, name))


def test_too_many_unreadable_images_in_a_loader_process_is_a_one_line_user_error(tmp_path):
    """Raised in a DataLoader worker, the error comes back to the main process as a UserError whose
    text is the worker's traceback; str() of it is the original message alone, so that the scripts'
    `print(f"error: {error}")` prints one line."""
    root = tmp_path / "imgs"
    write_images(root, [f"img_{k:03d}.png" for k in range(200)])
    for k in range(5):  # 5 of 205: over 1%
        (root / f"bad_{k}.jpg").write_bytes(b"garbage")
    dataset = views.ImageFiles(str(root), transform=torchvision.transforms.PILToTensor())
    loader = torch.utils.data.DataLoader(dataset, batch_size=8, num_workers=1)
    with warnings.catch_warnings(), pytest.raises(views.UserError) as info:
        warnings.simplefilter("ignore")
        for _ in loader:
            pass
    assert "Caught UserError in DataLoader worker process 0" in info.value.args[0]
    message = str(info.value)
    assert "\n" not in message and f"error: {info.value}" == f"error: {message}"
    assert message.startswith(f"more than 1% of the images under {root} are unreadable (3 so far")


def test_user_errors_raised_in_this_process_keep_their_message():
    assert str(views.UserError("--lr must be > 0")) == "--lr must be > 0"
    assert str(views.UserError("UserError: as written")) == "UserError: as written"


def test_images_over_the_pixel_limit_are_skipped_unread_and_named(tmp_path, monkeypatch):
    """An image of more than views.MAX_IMAGE_PIXELS is never decoded: it is skipped with a warning
    that names the file and its size, the next image is used instead, and it counts toward the 1%."""
    root = tmp_path / "imgs"
    write_images(root, [f"img_{k:03d}.png" for k in range(200)])
    write_images(root, ["img_100_huge.png"], size=40)
    monkeypatch.setattr(views, "MAX_IMAGE_PIXELS", 1000)  # 40 x 40 = 1600 pixels
    decoded = []
    load = PIL.ImageFile.ImageFile.load
    monkeypatch.setattr(PIL.ImageFile.ImageFile, "load",
                        lambda image: decoded.append(os.path.basename(image.filename)) or load(image))
    dataset = views.ImageFiles(str(root))
    huge = [os.path.basename(path) for path, _ in dataset.samples].index("img_100_huge.png")
    with pytest.warns(UserWarning, match=r"img_100_huge\.png: 40 x 40 pixels, more than"):
        image, _ = dataset[huge]
    assert image.size == (8, 8) and set(decoded) == {os.path.basename(dataset.samples[huge + 1][0])}
    assert dataset.bad.tolist() == [k == huge for k in range(len(dataset))]
    for k in range(3):  # 4 of 204 too large: over 1%
        write_images(root, [f"huge_{k}.png"], size=40)
    dataset = views.ImageFiles(str(root))
    with warnings.catch_warnings(), pytest.raises(views.UserError, match="more than 1%"):
        warnings.simplefilter("ignore")
        for k in range(len(dataset)):
            dataset[k]


def test_the_pixel_limit_lets_large_photos_through():
    assert 8000 * 6000 <= views.MAX_IMAGE_PIXELS < Image.MAX_IMAGE_PIXELS
