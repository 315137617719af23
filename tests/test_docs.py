"""The documentation: it speaks of the project only, its relative links resolve, and the Imagenette
recipe of docs/data.md runs as written."""
import os
import re
import subprocess

import pytest
from PIL import Image

from conftest import ROOT

# Words that describe how the work was done rather than the project: a user
# cannot know what they refer to. "round" counts as such a word only as a stage of work ("this
# round", "round's"), not as a verb (bf16 rounds) or Python's round().
PROCESS_WORDS = [r"\bsessions?\b",
                 r"\bround's\b|\b(this|that|an earlier|the previous|the next) round\b",
                 r"\baim(s|ed|ing)?\b", r"\bgoals?\b", r"\blent\b", r"\bthe card\b",
                 r"reader's edition", r"\bCI-class\b", r"\bearlier machines?\b"]


def tracked_text_files():
    listed = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout
    if not listed:
        pytest.skip("not a git checkout")
    for path in listed.split():
        if path == "tests/test_docs.py" or not os.path.isfile(os.path.join(ROOT, path)):
            continue
        try:
            yield path, open(os.path.join(ROOT, path), encoding="utf-8").read()
        except UnicodeDecodeError:  # a picture
            continue


def test_no_process_words_in_the_project():
    found = [f"{path}:{text.count(chr(10), 0, m.start()) + 1}: {m.group(0)!r}"
             for path, text in tracked_text_files() for word in PROCESS_WORDS
             for m in re.finditer(word, text, re.IGNORECASE)]
    assert not found, "process words:\n" + "\n".join(found)


def test_relative_links_of_the_docs_resolve():
    docs = ["README.md"] + [os.path.join("docs", f) for f in os.listdir(os.path.join(ROOT, "docs"))]
    broken = []
    for doc in docs:
        for target in re.findall(r"\]\(([^)#\s]+)[^)]*\)", open(os.path.join(ROOT, doc)).read()):
            if "://" not in target and not os.path.exists(
                    os.path.join(ROOT, os.path.dirname(doc), target)):
                broken.append(f"{doc}: {target}")
    assert not broken, broken


def imagenette_recipe():
    text = open(os.path.join(ROOT, "docs", "data.md")).read()
    section = text[text.index("## Imagenette at 112 px"):]
    return re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)


def test_the_imagenette_recipe_makes_112_px_images(tmp_path, monkeypatch):
    sizes = {"train/n01440764/a.JPEG": ((480, 320), "RGB"),
             "train/n01440764/b.JPEG": ((320, 427), "L"),
             "val/n02102040/c.JPEG": ((320, 320), "CMYK"),
             "val/n02102040/d.jpg": ((500, 333), "RGB")}
    for path, (size, mode) in sizes.items():
        os.makedirs(tmp_path / "imagenette2-320" / os.path.dirname(path), exist_ok=True)
        Image.new(mode, size, 90).save(tmp_path / "imagenette2-320" / path)
    (tmp_path / "imagenette2-320" / "train" / "n01440764" / "notes.txt").write_text("not an image")
    monkeypatch.chdir(tmp_path)
    exec(imagenette_recipe(), {})
    out = tmp_path / "data" / "imagenette2-112"
    made = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert made == sorted(sizes)
    for path, ((w, h), mode) in sizes.items():
        image = Image.open(out / path)
        assert min(image.size) == 112 and image.format == "JPEG", (path, image.size)
        assert abs(image.width / image.height - w / h) < 0.01, (path, image.size)
        assert image.mode == ("RGB" if mode == "CMYK" else mode)
