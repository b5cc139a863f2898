"""``pipeline("certified-image-classification")``: label/score plus certificates consistent with ``model.certify``."""

import pytest
import torch
from PIL import Image
from test_model_card import trained_mnist_checkpoint, write_mnist_pngs
from transformers import ViTConfig, ViTForImageClassification, pipeline

import hf_gloro
from hf_gloro.pipelines import TASK, CertifiedImageClassificationPipeline, register_pipeline


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, shared_data):
    return trained_mnist_checkpoint(tmp_path_factory.getbasetemp(), shared_data)


@pytest.fixture(scope="module")
def classifier(checkpoint):
    register_pipeline()
    return pipeline(TASK, model=str(checkpoint))


@pytest.fixture(scope="module")
def images(tmp_path_factory, shared_data):
    return [Image.open(path) for path, _ in write_mnist_pngs(tmp_path_factory.mktemp("pipe"), shared_data, 8)]


def _certify(model, images, epsilon=None, batch_size=None):
    """``model.certify`` on the processor's pixels, in the pipeline's batches.

    Float32 convolutions may round differently for different batch sizes, so bit-exact comparisons must
    batch the same way (the certificate covers the exact-arithmetic network, not this rounding).
    """
    pixels = hf_gloro.gloro_image_processor(1, 28)(images=[i.convert("RGB") for i in images],
                                                   return_tensors="pt")["pixel_values"]
    chunks = pixels.split(batch_size or len(pixels))
    certificates = [model.certify(chunk, epsilon) for chunk in chunks]
    certificate = certificates[0]
    for name in ("predictions", "certified", "radius"):
        setattr(certificate, name, torch.cat([getattr(c, name) for c in certificates]))
    with torch.no_grad():
        return certificate, torch.cat([model(chunk).logits for chunk in chunks])


def test_registered_task_builds_the_certified_pipeline(classifier):
    assert isinstance(classifier, CertifiedImageClassificationPipeline)
    assert isinstance(classifier.model, hf_gloro.GloRoForImageClassification)
    assert isinstance(classifier.image_processor, hf_gloro.GloRoImageProcessor)


@pytest.mark.parametrize("batch_size", [1, 3])
def test_results_match_model_certify(classifier, images, batch_size):
    results = classifier(images, batch_size=batch_size)
    certificate, logits = _certify(classifier.model, images, batch_size=batch_size)
    assert len(results) == len(images)
    for b, result in enumerate(results):
        (top,) = result  # default top_k=1
        assert set(top) == {"label", "score", "certified", "radius", "epsilon"}
        assert top["label"] == classifier.model.config.id2label[int(certificate.predictions[b])]
        assert top["certified"] == bool(certificate.certified[b])
        assert top["radius"] == float(certificate.radius[b])
        assert top["epsilon"] == classifier.model.config.epsilon
        assert top["score"] == pytest.approx(float(logits[b].softmax(-1).max()), rel=1e-6)
    # the trained model certifies some of these digits and not others
    assert 0 < sum(r[0]["certified"] for r in results) < len(images)


def test_epsilon_and_top_k(classifier, images):
    certificate, _ = _certify(classifier.model, images[:2], epsilon=1e-4, batch_size=1)
    results = classifier(images[:2], epsilon=1e-4, top_k=3)
    for b, result in enumerate(results):
        assert len(result) == 3 and [r["epsilon"] for r in result] == [1e-4] * 3
        assert result[0]["certified"] == bool(certificate.certified[b])
        # only the predicted label carries the certificate
        assert [r["certified"] for r in result[1:]] == [False, False]
        assert [r["radius"] for r in result[1:]] == [0.0, 0.0]
        assert result[0]["score"] >= result[1]["score"] >= result[2]["score"]
    with pytest.raises(ValueError, match="epsilon"):
        classifier(images[0], epsilon=0.0)


def test_single_image_path_and_non_gloro_models_are_refused(classifier, tmp_path, images):
    path = tmp_path / "digit.png"
    images[0].save(path)
    (top,) = classifier(str(path))
    certificate, _ = _certify(classifier.model, [images[0]])
    assert top["radius"] == float(certificate.radius[0])

    vit = ViTForImageClassification(ViTConfig(image_size=28, patch_size=7, num_channels=1, hidden_size=16,
                                              num_hidden_layers=1, num_attention_heads=2, intermediate_size=16))
    with pytest.raises(ValueError, match="needs a GloRo model"):
        CertifiedImageClassificationPipeline(model=vit, image_processor=classifier.image_processor)


def test_repo_with_remote_code_loads_without_a_trust_prompt(checkpoint, tmp_path, images):
    """With hf-gloro installed the local classes are used; pipeline() must not ask to trust the repo's code."""
    from hf_gloro.hub import save_certified_model

    model = hf_gloro.GloRoForImageClassification.from_pretrained(checkpoint)
    save_certified_model(model, tmp_path, remote_code=True)
    # Under pytest, reading stdin raises, so a trust prompt would surface as an error here.
    classifier = pipeline(TASK, model=str(tmp_path))
    assert type(classifier.model) is hf_gloro.GloRoForImageClassification
    certificate, _ = _certify(model, images[:1])
    assert classifier(images[0])[0]["radius"] == float(certificate.radius[0])


def test_wrong_size_or_mode_is_refused_unless_resize_or_convert(classifier, images, tmp_path):
    path = tmp_path / "big.png"
    images[0].resize((32, 32)).save(path)
    with pytest.raises(ValueError, match=f"image '{path}' is 32×32 but the model takes 28×28 images"):
        classifier(str(path))
    with pytest.raises(ValueError, match="is RGB but the model takes grayscale"):
        classifier(images[0].convert("RGB"))
    (top,) = classifier(str(path), resize=True)
    assert top["preprocessing"].startswith("resized from 32×32 to 28×28")
    assert "the certificate is about this processed image" in top["preprocessing"]
    certificate, _ = _certify(classifier.model, [Image.open(path).resize((28, 28), Image.BILINEAR)])
    assert top["radius"] == pytest.approx(float(certificate.radius[0]), rel=1e-5)
    (top,) = classifier(images[0].convert("RGB"), convert=True)
    assert top["preprocessing"].startswith("converted to L")
    assert "preprocessing" not in classifier(images[0])[0]


def test_folder_from_save_pretrained_works_with_both_pipelines(checkpoint, tmp_path, images):
    """`save_pretrained` writes the image processor next to the weights (hf_gloro.image_processing.
    image_processor_for_config), so both pipelines load the folder as it is."""
    model = hf_gloro.GloRoForImageClassification.from_pretrained(checkpoint)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "preprocessor_config.json").is_file()
    plain = pipeline("image-classification", model=str(tmp_path))
    certified = pipeline(TASK, model=str(tmp_path))
    certificate, logits = _certify(model, images[:2], batch_size=1)
    for b, image in enumerate(images[:2]):
        assert plain(image)[0]["label"] == model.config.id2label[int(certificate.predictions[b])]
        assert certified(image)[0]["radius"] == float(certificate.radius[b])
