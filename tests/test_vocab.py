"""Class vocabularies and templates: built-ins in label order, files one per line, plain "{}" format strings."""

from __future__ import annotations

import pytest
from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES

from kdcache.vocab import BUILTIN_CLASSES, load_classes, load_templates


def test_builtin_classes_in_label_order():
    names, src = load_classes("cifar10")
    # torchvision's CIFAR-10 order; the wording of the CIFAR-10 shards' captions
    assert names == ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    assert "cifar10" in src
    names, _ = load_classes("cifar100")
    assert len(names) == len(set(names)) == 100
    assert names[:3] == ["apple", "aquarium fish", "baby"] and names[-1] == "worm"
    assert names.index("maple tree") == 47 and names.index("willow tree") == 96  # torchvision fine-label indices
    names, _ = load_classes("imagenet")
    assert names == list(IMAGENET_CLASSNAMES) and len(names) == 1000


def test_classes_file(tmp_path):
    p = tmp_path / "c.txt"
    p.write_text("red\n\n  green  \nblue\n\n")
    names, src = load_classes(str(p))
    assert names == ["red", "green", "blue"] and str(p) in src
    p.write_text("red\nred\n")
    with pytest.raises(ValueError, match="repeats"):
        load_classes(str(p))


@pytest.mark.parametrize("spec", ["cifar11", "/no/such/classes.txt"])
def test_unknown_classes_list_builtins(spec):
    with pytest.raises(ValueError) as e:
        load_classes(spec)
    assert all(b in str(e.value) for b in BUILTIN_CLASSES)


def test_builtin_templates_are_format_strings():
    t, src = load_templates("openai")
    assert len(t) == len(OPENAI_IMAGENET_TEMPLATES) == 80
    assert [x.format("dog") for x in t] == [f("dog") for f in OPENAI_IMAGENET_TEMPLATES]
    t, src = load_templates(None, classes_spec="cifar10")
    assert [x.format("cat") for x in t] == [f("cat") for f in SIMPLE_IMAGENET_TEMPLATES]
    assert "default" in src and "simple" in src
    assert load_templates("photo")[0] == ["a photo of a {}."]


def test_templates_file(tmp_path):
    p = tmp_path / "t.txt"
    p.write_text("a photo of a {}.\n\nart of the {c}.\n")
    t, _ = load_templates(str(p))
    assert t == ["a photo of a {}.", "art of the {}."]
    for bad in ("no placeholder here", "two {} and {}", "a {name}", "{0} indexed"):
        p.write_text(bad + "\n")
        with pytest.raises(ValueError, match="placeholder"):
            load_templates(str(p))
    with pytest.raises(ValueError, match="openai"):
        load_templates("fancy")
