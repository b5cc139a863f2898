"""Every shipped recipe runs, and its recipe components work.

* ``test_every_shipped_recipe_runs``: parametrised over ``recipes/configs/*.yaml`` (a new config is covered
  automatically; one whose data set has no local slice below fails with a message saying so). Each runs
  ``recipes/train.py`` in-process for 2 optimizer steps with tiny widths on a small slice of local data in its Hub
  layout (MNIST, CIFAR-10 and the Tiny-ImageNet subset from ``../shared/data``; an ImageNet-style Hub data set of a
  few hundred 224×224 images with 1000 class names built here), then loads the saved folder with
  ``from_pretrained`` and certifies with it.
* One recipe under two processes (gloo, ``torch.distributed.run``), streamed: each rank reads its own shard.
* Components: Lookahead (timm) under the HF LR scheduler and across a checkpoint resume, seeded RandAugment,
  extra data mixed at a ratio (no repeats within an epoch, a clear error for another label space), streaming shards.
"""

from __future__ import annotations

import io
import json
import pathlib
import sys

import numpy as np
import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "recipes" / "configs").glob("*.yaml"))

#: Hub name in the configs → the local slice's folder name (what ``hf_gloro.data.KNOWN_DATASETS`` resolves).
SLICES = {"ylecun/mnist": "mnist", "uoft-cs/cifar10": "cifar10", "zh-plus/tiny-imagenet": "tiny_imagenet_subset",
          "ILSVRC/imagenet-1k": "imagenet-1k", "sklearn/digits": None}

#: validation_size override per data set (the slices hold a few hundred images).
VALIDATION = {"ylecun/mnist": 40, "uoft-cs/cifar10": 40, "zh-plus/tiny-imagenet": 200, "ILSVRC/imagenet-1k": 40}


def _recipe():
    sys.path.insert(0, str(ROOT / "recipes"))
    try:
        import train
    finally:
        sys.path.remove(str(ROOT / "recipes"))
    return train


def _stratified_rows(labels: np.ndarray, per_class: int, classes=None) -> np.ndarray:
    classes = np.unique(labels) if classes is None else classes
    return np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in classes])


def _slice_parquet(source: pathlib.Path, target: pathlib.Path, per_class: int) -> None:
    import pyarrow.parquet as pq

    table = pq.read_table(source)
    rows = _stratified_rows(np.asarray(table.column("label")), per_class)
    target.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table.take(rows), target)  # schema (with the Hub's feature metadata) kept


def _imagenet_style(shared: pathlib.Path, target: pathlib.Path, classes: int = 20, per_class: int = 8,
                    size: int = 224) -> None:
    """An ImageNet-1k-style Hub data set: ``image`` (JPEG at ``size``²) + ``label`` (ClassLabel, 1000 names),
    ``train`` and ``validation`` splits, from Tiny-ImageNet images of ``classes`` classes."""
    import datasets
    import pyarrow.parquet as pq
    from PIL import Image

    table = pq.read_table(shared / "tiny_imagenet_subset" / "train-00000-of-00001.parquet")
    labels = np.asarray(table.column("label"))
    wnids = json.loads(table.schema.metadata[b"huggingface"])["info"]["features"]["label"]["names"]
    names = list(wnids) + [f"n{90000000 + i:08d}" for i in range(1000 - len(wnids))]
    images = table.column("image").to_pylist()
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})
    target.mkdir(parents=True, exist_ok=True)
    chosen = np.arange(classes) * 7  # spread over the label space
    for split, offset, count in (("train", 0, per_class), ("validation", per_class, 2)):
        rows = np.concatenate([np.flatnonzero(labels == c)[offset:offset + count] for c in chosen])
        encoded = []
        for row in rows:
            image = Image.open(io.BytesIO(images[row]["bytes"])).convert("RGB").resize((size, size), Image.BILINEAR)
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=90)
            encoded.append({"bytes": buffer.getvalue(), "path": None})
        # Shuffled rows, as a Hub training split would be (the streamed validation is the first rows).
        order = np.random.default_rng(0).permutation(len(rows))
        part = datasets.Dataset.from_dict({"image": [encoded[i] for i in order],
                                           "label": [int(labels[rows[i]]) for i in order]}, features=features)
        part.to_parquet(str(target / f"{split}-00000-of-00001.parquet"))


@pytest.fixture(scope="module")
def data_root(shared_data, tmp_path_factory) -> pathlib.Path:
    root = tmp_path_factory.mktemp("recipe-data")
    for name, train_name, test_name, per_train, per_test in (
            ("mnist", "train", "test", 12, 4), ("cifar10", "train", "test", 12, 4),
            ("tiny_imagenet_subset", "train", "valid", 2, 1)):
        _slice_parquet(shared_data / name / f"{train_name}-00000-of-00001.parquet",
                       root / name / f"{train_name}-00000-of-00001.parquet", per_train)
        _slice_parquet(shared_data / name / f"{test_name}-00000-of-00001.parquet",
                       root / name / f"{test_name}-00000-of-00001.parquet", per_test)
    _imagenet_style(shared_data, root / "imagenet-1k")
    return root


def _config(path: pathlib.Path) -> dict:
    import yaml

    with open(path) as handle:
        return yaml.safe_load(handle)


def _tiny_backbone(config: dict) -> dict | None:
    """Tiny widths of the config's own architecture (the stem, patchify stem and MLP depth are kept)."""
    kwargs = config.get("backbone_kwargs") or {}
    kwargs = dict(json.loads(kwargs) if isinstance(kwargs, str) else kwargs)
    backbone = config.get("backbone", "gloro_2c2f")
    if backbone.startswith("liresnet"):
        kwargs.update(width=8, depth=2, neck_features=16, mlp_depth=min(int(kwargs.get("mlp_depth", 0)), 2))
        return kwargs
    if backbone == "gloro_8c2f":
        return dict(kwargs, convs=[[8, 3, 1], [8, 4, 2], [8, 3, 1], [8, 4, 2], [8, 3, 1], [8, 4, 2]], dense=[32])
    return kwargs or None


def _smoke_arguments(path: pathlib.Path, data_root: pathlib.Path, output: pathlib.Path) -> list[str]:
    config = _config(path)
    dataset = config.get("dataset_name", "ylecun/mnist")
    if dataset not in SLICES:
        pytest.fail(f"{path.name}: no local slice for data set {dataset!r}; add one to tests/test_recipes.py")
    args = [str(path), "--output_dir", str(output), "--max_steps", "2", "--per_device_train_batch_size", "8",
            "--per_device_eval_batch_size", "64", "--eval_strategy", "no", "--save_strategy", "no",
            "--load_best_model_at_end", "false", "--dataloader_num_workers", "0", "--max_test_samples", "24",
            "--converge_max_iterations", "60", "--converge_tolerance", "1e-4", "--logging_steps", "1",
            "--disable_tqdm", "true", "--torch_threads", "1", "--shuffle_buffer_size", "32"]
    if SLICES[dataset] is not None:
        args += ["--dataset_dir", str(data_root), "--validation_size", str(VALIDATION[dataset])]
    kwargs = _tiny_backbone(config)
    if kwargs:
        args += ["--backbone_kwargs", json.dumps(kwargs)]
    return args


@pytest.mark.slow
@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_shipped_recipe_runs(path, data_root, tmp_path):
    import hf_gloro  # noqa: F401
    from transformers import AutoModelForImageClassification

    from hf_gloro.lipschitz import CholeskyOrthogonalLinear, LipschitzConv2d

    train = _recipe()
    output = tmp_path / path.stem
    threads = torch.get_num_threads()
    try:
        summary = train.main(_smoke_arguments(path, data_root, output))
    finally:
        torch.set_num_threads(threads)
    assert summary["global_step"] == 2
    assert 0.0 <= summary["test_vra"] <= summary["test_clean_accuracy"] <= 1.0
    for name in ("model.safetensors", "config.json", "preprocessor_config.json", "README.md",
                 "training_recipe.json", "test_results.json"):
        assert (output / name).is_file(), name

    config = _config(path)
    model = AutoModelForImageClassification.from_pretrained(str(output)).eval()
    assert model.config.backbone == config["backbone"]
    assert model.config.lipschitz_constant >= model.lipschitz_constant() * (1 - 1e-12)
    if config.get("image_std"):
        assert list(model.normalization._values[1]) == [float(s) for s in config["image_std"]]
    kwargs = model.config.backbone_kwargs or {}
    leaves = model.certification_chain()
    if kwargs.get("patch_size"):  # the ImageNet patchify stem: kernel = stride = patch, no padding
        stem = next(leaf for leaf in leaves if isinstance(leaf, LipschitzConv2d))
        assert stem.kernel_size == stem.stride == (kwargs["patch_size"],) * 2 and stem.padding == (0, 0)
    if kwargs.get("mlp_depth"):
        assert any(isinstance(leaf, CholeskyOrthogonalLinear) for leaf in leaves)
    size, channels = model.config.image_size, model.config.num_channels
    pixels = torch.rand(4, channels, size, size, generator=torch.Generator().manual_seed(0))
    certificate = model.certify(pixels)
    assert certificate.certified.dtype == torch.bool and certificate.radius.shape == (4,)
    assert torch.isfinite(certificate.radius).all() and (certificate.radius >= 0).all()
    assert certificate.lipschitz_constant == pytest.approx(model.lipschitz_constant())


@pytest.mark.slow
def test_streamed_recipe_under_two_processes(data_root, tmp_path):
    """cifar10_liresnet streamed under torch.distributed.run (2 gloo ranks, disjoint shards), Lookahead-NAdam and
    RandAugment included; the saved model loads and certifies."""
    from test_distributed import _launch

    output = tmp_path / "two"
    args = _smoke_arguments(ROOT / "recipes" / "configs" / "cifar10_liresnet.yaml", data_root, output)
    result = _launch(ROOT / "recipes" / "train.py", *args, "--streaming", "true", "--max_steps", "3", timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "terminate called" not in result.stderr
    assert "world size 2" in result.stderr + result.stdout and "train streamed" in result.stderr + result.stdout
    import hf_gloro  # noqa: F401
    from transformers import AutoModelForImageClassification

    model = AutoModelForImageClassification.from_pretrained(str(output)).eval()
    recorded = json.loads((output / "training_recipe.json").read_text())
    assert recorded["training_args"]["timm_optimizer"] == "lookahead_nadam"
    assert json.loads((output / "trainer_state.json").read_text())["global_step"] == 3
    assert model.certify(torch.rand(2, 3, 32, 32)).radius.shape == (2,)


# --- components ---------------------------------------------------------------------------------------------

def test_streamed_shards_are_disjoint_and_cover_the_stream(data_root):
    train = _recipe()
    _, data_args, _ = train.parse_arguments([str(ROOT / "recipes" / "configs" / "cifar10_liresnet.yaml"),
                                             "--dataset_dir", str(data_root), "--validation_size", "20",
                                             "--max_test_samples", "8", "--output_dir", "/tmp/unused",
                                             "--streaming", "true", "--max_steps", "1"])
    data_args.shuffle_buffer_size = 16
    seen = []
    for rank in (0, 1):
        stream, validation, test, names, collator = train.build_streaming_datasets(data_args, 0, rank, 2)
        assert names[0] == "airplane" and len(validation) == 20 and len(test) == 8
        seen.append([np.asarray(row["image"]).tobytes() for row in stream])
        batch = collator([row for _, row in zip(range(4), stream)])
        assert batch["pixel_values"].shape == (4, 3, 32, 32) and batch["pixel_values"].dtype == torch.float32
    first, second = set(seen[0]), set(seen[1])
    assert first and second and not first & second  # disjoint shards
    assert len(first) + len(second) == 120 - 20  # together: the split minus the validation rows
    validation_pixels = {bytes(row) for row in validation.with_format(None)["pixels"]}
    assert len(validation_pixels) == 20


def test_lookahead_follows_the_lr_schedule_and_resumes_exactly(tmp_path):
    from gloro_helpers import model_snapshot, tiny_model, tiny_trainer

    common = dict(timm_optimizer="lookahead_nadam", timm_optimizer_kwargs='{"lookahead_alpha": 0.5, "lookahead_k": 3}',
                  lr_scheduler_type="cosine", max_steps=8, save_steps=4, eval_strategy="no",
                  load_best_model_at_end=False)
    straight = tiny_trainer(str(tmp_path / "a"), augment=True, **common)
    straight.train()
    optimizer = straight.optimizer.optimizer  # accelerate's wrapper → timm Lookahead
    from timm.optim import Lookahead

    assert isinstance(optimizer, Lookahead) and type(optimizer._base_optimizer).__name__ == "NAdam"
    assert optimizer.param_groups[0]["lookahead_k"] == 3
    # The HF scheduler set the inner optimizer's LR (shared param_groups): cosine ends at 0.
    assert optimizer._base_optimizer.param_groups[0]["lr"] == pytest.approx(straight.lr_scheduler.get_last_lr()[0])
    assert optimizer._base_optimizer.param_groups[0]["lr"] < 1e-3 * straight.args.learning_rate
    head = straight.model.head.weight
    slow = optimizer._base_optimizer.state[head]["lookahead_slow_buff"]  # in the state dict checkpoints save
    # Slow weights were pulled at step 6 (timm starts them at the first sync, step 3); two fast steps since.
    assert not torch.equal(slow, head.detach())
    resumed = tiny_trainer(str(tmp_path / "b"), augment=True, **common)
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-4"))
    resumed_optimizer = resumed.optimizer.optimizer
    assert resumed_optimizer.param_groups[0]["lookahead_step"] == 8
    torch.testing.assert_close(resumed_optimizer._base_optimizer.state[resumed.model.head.weight]["lookahead_slow_buff"],
                               slow, rtol=1e-5, atol=1e-6)
    a, b = model_snapshot(straight.model), model_snapshot(resumed.model)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=name)
    assert not torch.equal(a["head.weight"], tiny_model().head.weight.detach())  # it trained


def test_randaugment_is_seeded_per_example_and_epoch():
    from hf_gloro.data import PixelsTransform, uint8_to_unit

    images = np.random.default_rng(0).integers(0, 256, (16, 3, 12, 12), dtype=np.uint8)
    batch = {"pixels": [image.tobytes() for image in images], "label": [0] * 16, "index": list(range(16))}
    transform = PixelsTransform(3, 12, seed=3, augmentation="randaugment", augmentation_probability=0.5)
    first = transform(batch)["pixel_values"]
    torch.manual_seed(123)  # the global generator does not matter ...
    assert torch.equal(transform(batch)["pixel_values"], first)
    # ... an example's result does not depend on its batch (prefetching, workers, resumption) ...
    half = {key: value[8:] for key, value in batch.items()}
    assert torch.equal(transform(half)["pixel_values"], first[8:])
    changed = ~(first == uint8_to_unit(torch.from_numpy(images))).flatten(1).all(1)
    assert 2 <= int(changed.sum()) <= 14  # p = 0.5: some images augmented, some not
    transform.set_epoch(1)  # ... and the next epoch draws anew
    assert not torch.equal(transform(batch)["pixel_values"], first)
    with pytest.raises(ValueError, match="unknown augmentation"):
        PixelsTransform(3, 12, augmentation="randaugmnt")


def test_extra_data_is_mixed_at_the_ratio_without_repeats(tmp_path):
    import datasets

    from hf_gloro.data import MixedTrainingSet, PixelsTransform, add_index_column, uint8_arrays_dataset

    rng = np.random.default_rng(0)
    real = add_index_column(uint8_arrays_dataset(rng.integers(0, 256, (10, 1, 4, 4)), [0, 1] * 5, ["a", "b"]))
    extra = uint8_arrays_dataset(np.full((25, 1, 4, 4), 7) + np.arange(25)[:, None, None, None],
                                 [1] * 25, ["a", "b"])
    extra = add_index_column(extra, offset=10)
    transform = PixelsTransform(1, 4, seed=0, horizontal_flip=True)
    mixed = MixedTrainingSet(real.with_transform(transform), extra.with_transform(transform), ratio=3.0, seed=0)
    assert len(mixed) == 10 + 30
    epoch0 = mixed.extra_indices(0)
    assert len(epoch0) == 30 and len(set(epoch0[:25].tolist())) == 25  # a full pass before any repeat
    epochs = np.concatenate([mixed.extra_indices(e) for e in range(5)])  # 150 draws = 6 passes of 25
    assert all(sorted(epochs[25 * k:25 * (k + 1)].tolist()) == list(range(25)) for k in range(6))
    mixed.set_epoch(1)
    assert transform.epoch == 1
    items = mixed.__getitems__(list(range(8, 14)))
    assert [int(item["labels"]) for item in items][2:] == [1, 1, 1, 1]
    assert isinstance(datasets.Dataset, type)

    # Another label space is refused with one line naming the problem (through the recipe's CLI).
    folder = tmp_path / "other"
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["x", "y", "z"])})
    from PIL import Image

    other = datasets.Dataset.from_dict({"image": [Image.new("L", (8, 8))] * 4, "label": [0, 1, 2, 0]},
                                       features=features)
    folder.mkdir()
    other.to_parquet(str(folder / "train-00000-of-00001.parquet"))
    train = _recipe()
    with pytest.raises(train.RecipeError, match=r"different label space: 3 classes vs 10"):
        train.main([str(ROOT / "recipes" / "configs" / "offline_default.yaml"), "--extra_train_dataset",
                    str(folder), "--output_dir", str(tmp_path / "out"), "--max_steps", "1"])


def test_extra_data_recipe_trains(tmp_path):
    """offline_default with an extra folder in the same label space, ratio 2: the epoch holds 3× the rows."""
    import datasets
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.round(digits.images[:60] * 255 / 16).astype(np.uint8)
    from PIL import Image

    features = datasets.Features({"image": datasets.Image(),
                                  "label": datasets.ClassLabel(names=[str(i) for i in range(10)])})
    folder = tmp_path / "extra"
    folder.mkdir()
    datasets.Dataset.from_dict({"image": [Image.fromarray(i) for i in images],
                                "label": digits.target[:60].tolist()}, features=features).to_parquet(
        str(folder / "train-00000-of-00001.parquet"))
    train = _recipe()
    threads = torch.get_num_threads()
    try:
        summary = train.main([str(ROOT / "recipes" / "configs" / "offline_default.yaml"), "--extra_train_dataset",
                              str(folder), "--extra_train_ratio", "2.0", "--max_train_samples", "40",
                              "--num_train_epochs", "1", "--per_device_train_batch_size", "40",
                              "--eval_strategy", "no", "--save_strategy", "no", "--load_best_model_at_end", "false",
                              "--output_dir", str(tmp_path / "out"), "--disable_tqdm", "true",
                              "--crop_padding", "1"])
    finally:
        torch.set_num_threads(threads)
    assert summary["global_step"] == 3  # (40 real + 80 extra) / 40
