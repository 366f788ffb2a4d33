"""The model organisms load by alias and do their tasks: their answers depend on the image."""

import torch

import interp
from interp.organisms import llava as org_llava
from interp.organisms import vit as org_vit


def test_organism_vit_classifies_its_task():
    model = interp.load_model("organism-vit")
    images, labels = org_vit.dataset(200, org_vit.TEST_SEED)
    with torch.no_grad():
        logits = model.hf(**model.prepare(images=images)).logits
    assert (logits.argmax(-1) == labels).float().mean() >= 0.97


def test_organism_llava_answers_from_the_image():
    model = interp.load_model("organism-llava")
    assert model.family.name == "llava" and model.head_counts() == (4, 2)
    items = org_llava.test_set()[:200]
    acc = org_llava.evaluate(model.hf, model.processor, items)
    assert acc["image"] >= 0.9 and acc["text"] >= 0.9, acc
    assert acc["blank/image"] <= 0.6, acc  # a blank image leaves the image questions near chance


def test_organism_llava_runs_through_an_analysis(tmp_path):
    """The visual sinks analysis runs on it from the alias, with its own processor and prompt."""
    result = interp.score("organism-llava", "sinks", samples=2, prompt="what colour is the square", store=tmp_path)
    assert result.heads["image_mass"].between(0, 1).all() and len(result.heads) == 16
