"""views.ImageFiles on the folders people really have: labels by class name between train/ and
val/, macOS's hidden files, links, files that are not images, a data set's root given for its
train split. The rule: every image PIL can open trains as what it shows, every file is counted
once, and nothing under --data is dropped without a word."""
import os
import warnings

import pytest
import torch
from PIL import Image

import dino
import linear_eval as le
import views

COLOURS = {"blue": (20, 20, 220), "green": (20, 200, 20), "red": (220, 20, 20)}


def solid_images(folder, colour, names):
    os.makedirs(folder, exist_ok=True)
    for k, name in enumerate(names):
        shade = tuple(min(255, c + 10 * k) for c in colour)
        Image.new("RGB", (40, 40), shade).save(os.path.join(folder, name))


def colour_split(root, classes, n=3):
    for name in classes:
        solid_images(os.path.join(root, name), COLOURS[name], [f"{k}.png" for k in range(n)])


def names_and_labels(dataset):
    return [(os.path.relpath(path, dataset.root), label) for path, label in dataset.samples]


def quietly(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


class MeanColour(torch.nn.Module):
    """A backbone whose features are the mean colour: kNN is exact on solid-colour classes, so a
    label that does not follow the class name shows as a wrong answer."""
    feat_dim, is_vit = 3, False

    def forward(self, images):
        return images.mean((2, 3))


# ---- Item 1: class labels by name between the splits ----

def test_val_labels_are_train_class_names_whichever_split_lacks_a_class(tmp_path):
    colour_split(tmp_path / "lacks" / "train", ["blue", "green", "red"])
    colour_split(tmp_path / "lacks" / "val", ["green", "red"], n=2)
    (tmp_path / "lacks" / "val" / "blue").mkdir()  # val's copy of the class is empty
    with pytest.warns(UserWarning, match=r"val: 1 class folders hold no images .*: blue$"):
        train, val = views.build_eval_datasets(str(tmp_path / "lacks"), None)
    assert train.classes == val.classes == ["blue", "green", "red"]
    assert [label for _, label in val.samples] == [1, 1, 2, 2]  # by position: 0, 0, 1, 1

    colour_split(tmp_path / "adds" / "train", ["green", "red"])
    colour_split(tmp_path / "adds" / "val", ["blue", "green", "red"], n=1)
    with pytest.raises(views.UserError, match=r"'.*adds/val' has 1 class folder\(s\) that train "
                                              r"has not, so no label: blue$"):
        views.build_eval_datasets(str(tmp_path / "adds"), None)


def test_an_empty_train_class_folder_keeps_its_label_and_is_named(tmp_path):
    colour_split(tmp_path / "train", ["blue", "red"])
    (tmp_path / "train" / "green").mkdir()
    (tmp_path / "train" / "green" / "._0.png").write_bytes(b"\0\5\26\7")  # hidden: not an image
    colour_split(tmp_path / "val", ["blue", "green", "red"], n=1)
    with pytest.warns(UserWarning, match=r"train: 1 class folders hold no images .*: green$"):
        train, val = views.build_eval_datasets(str(tmp_path), None)
    assert train.classes == ["blue", "green", "red"]
    assert {label for _, label in train.samples} == {0, 2}
    assert names_and_labels(val) == [("blue/0.png", 0), ("green/0.png", 1), ("red/0.png", 2)]


def test_a_flat_val_or_train_split_is_refused_with_the_way_to_sort_it(tmp_path):
    colour_split(tmp_path / "train", ["blue", "red"])
    solid_images(tmp_path / "val", COLOURS["red"], ["ILSVRC2012_val_00000001.JPEG"])
    (tmp_path / "val" / "LOC_val_solution.csv").write_text("ImageId,PredictionString\n")
    with pytest.raises(views.UserError) as info:
        quietly(views.build_eval_datasets, str(tmp_path), None)
    message = str(info.value)
    assert "holds no class folders" in message and "valprep.sh" in message and "\n" not in message
    solid_images(tmp_path / "flat_train" / "train", COLOURS["red"], ["0.png"])
    colour_split(tmp_path / "flat_train" / "val", ["red"])
    with pytest.raises(views.UserError, match="train' holds no class folders"):
        views.build_eval_datasets(str(tmp_path / "flat_train"), None)


def test_linear_eval_and_the_knn_monitor_score_by_class_name(tmp_path, monkeypatch):
    """End to end: val lacks train's first class. Matched by position every answer was wrong
    (0 %); by name the mean colour finds every class."""
    colour_split(tmp_path / "train", ["blue", "green", "red"])
    colour_split(tmp_path / "val", ["green", "red"], n=2)
    monkeypatch.setattr(le, "backbone_from", lambda *unused: MeanColour())
    for mode in ("knn", "fast-linear"):
        le.main(["--mode", mode, "--checkpoint", "none", "--data", str(tmp_path), "--global-size",
                 "32", "--workers", "0", "--batch-size", "4", "--lr", "0.1",
                 "--output", str(tmp_path / f"{mode}.json")])
        result = le.json.loads((tmp_path / f"{mode}.json").read_text())
        assert (result["final_top1"], result["val_images"]) == (100.0, 4), mode
    bank_set, val_set = views.build_eval_datasets(str(tmp_path), views.eval_transform(32))
    monitor = dino.knn_monitor(MeanColour(), bank_set, val_set, 4, 0, torch.device("cpu"), 0, 1,
                               torch.autocast("cpu", enabled=False))
    assert monitor["knn_top1"] == 100.0


# ---- Item 2 and the rule: hidden files, links, files that are not images, the layouts ----

def test_macos_hidden_files_and_folders_are_not_images(tmp_path):
    """A folder copied from a Mac: an AppleDouble ._name beside every image, .DS_Store files, and
    from its zip a __MACOSX folder. None is an image, and none is named as skipped."""
    root = tmp_path / "photos"
    colour_split(root, ["blue", "red"], n=2)
    for folder, _, files in list(os.walk(root)):
        for name in files:
            open(os.path.join(folder, "._" + name), "wb").write(b"\0\5\26\7Mac OS X")
        open(os.path.join(folder, ".DS_Store"), "wb").write(b"\0\0\0\1Bud1")
    solid_images(root / "red" / ".thumbnails", COLOURS["blue"], ["0.png"])  # a blue thumbnail
    solid_images(root / "__MACOSX" / "red", COLOURS["red"], ["0.png"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dataset = views.ImageFiles(str(root))
    assert dataset.classes == ["blue", "red"]
    assert names_and_labels(dataset) == [("blue/0.png", 0), ("blue/1.png", 0), ("red/0.png", 1),
                                         ("red/1.png", 1)]
    flat = tmp_path / "flat"
    solid_images(flat, COLOURS["red"], ["0.png"])
    (flat / "._0.png").write_bytes(b"\0\5\26\7Mac OS X")
    assert names_and_labels(views.ImageFiles(str(flat))) == [("0.png", 0)]


def test_upper_case_nested_and_non_image_files(tmp_path):
    """Extensions in any case are images; images in sub-folders of a class are the class's; other
    files (ImageNet's .xml boxes, notes) are skipped, counted in one warning."""
    root = tmp_path / "data"
    solid_images(root / "blue", COLOURS["blue"], ["0.JPEG", "1.JPG", "2.Png"])
    solid_images(root / "red" / "day" / "noon", COLOURS["red"], ["0.jpeg"])
    for name in ("blue/0.xml", "blue/1.xml", "red/day/notes.txt", "labels.csv"):
        (root / name).write_text("not an image")
    with pytest.warns(UserWarning) as caught:
        dataset = views.ImageFiles(str(root))
    assert [str(w.message) for w in caught] == [
        f"{root}: skipping 4 files that are not images by their extension "
        f"({' '.join(views.IMAGE_EXTENSIONS)}), e.g. {root}/labels.csv"]
    assert names_and_labels(dataset) == [("blue/0.JPEG", 0), ("blue/1.JPG", 0), ("blue/2.Png", 0),
                                         ("red/day/noon/0.jpeg", 1)]
    red = dataset[3][0].getpixel((0, 0))  # a JPEG: about (220, 20, 20)
    assert dataset[2][0].getpixel((0, 0)) == (40, 40, 240) and red[0] > 200 > 40 > max(red[1:])


def test_every_file_is_counted_once_through_links(tmp_path):
    """A folder linked twice into its class, a link to the folder above (a loop, which os.walk
    with followlinks=True follows ~40 levels deep) and a link to a file of another class: each
    real file is one sample, and a linked file has the label of the class folder it lies in."""
    root = tmp_path / "data"
    colour_split(root, ["blue", "red"], n=2)
    solid_images(tmp_path / "pool" / "more_red", COLOURS["red"], ["9.png"])  # outside the root
    os.symlink(tmp_path / "pool" / "more_red", root / "red" / "extra")
    os.symlink(tmp_path / "pool" / "more_red", root / "red" / "extra_again")
    os.symlink(root / "red", root / "red" / "loop")
    os.symlink(root / "red" / "0.png", root / "blue" / "9.png")
    with pytest.warns(UserWarning, match=r"data: 1 images reached by more than one path"):
        dataset = views.ImageFiles(str(root))
    assert sorted(names_and_labels(dataset)) == [
        ("blue/0.png", 0), ("blue/1.png", 0), ("blue/9.png", 1), ("red/1.png", 1),
        ("red/extra/9.png", 1)]
    assert dataset[[p for p, _ in dataset.samples].index(str(root / "blue/9.png"))][1] == 1


def test_a_data_set_root_or_images_beside_class_folders_are_refused(tmp_path):
    """root/train and root/val given as --data would train as 2 classes: the error says to pass
    root/train. Images beside class folders have no class: refused, not dropped."""
    colour_split(tmp_path / "imagenet" / "train", ["blue", "red"], n=1)
    colour_split(tmp_path / "imagenet" / "val", ["blue", "red"], n=1)
    (tmp_path / "imagenet" / "LOC_synset_mapping.txt").write_text("n01440764 tench")
    with pytest.raises(views.UserError, match=r"holds train/, val/ folders, not classes: pass "
                                              r".*imagenet/train$"):
        quietly(views.build_dataset, str(tmp_path / "imagenet"))
    assert len(quietly(views.build_dataset, str(tmp_path / "imagenet" / "train"))) == 2
    solid_images(tmp_path / "imagenet" / "train", COLOURS["red"], ["stray.png"])
    with pytest.raises(views.UserError, match="holds images beside its class folders"):
        views.build_dataset(str(tmp_path / "imagenet" / "train"))


def test_an_unreadable_folder_is_a_user_error(tmp_path, monkeypatch):
    colour_split(tmp_path / "data", ["blue", "red"], n=1)
    scandir = os.scandir

    def refuse_red(path):
        if os.path.basename(path) == "red":
            raise PermissionError(13, "Permission denied")
        return scandir(path)

    monkeypatch.setattr(os, "scandir", refuse_red)
    with pytest.raises(views.UserError, match=r"cannot read the folder '.*red': Permission denied"):
        views.ImageFiles(str(tmp_path / "data"))
