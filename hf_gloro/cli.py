"""The ``hf-gloro`` command: certify images, verify a checkpoint's recorded bound, render a model card.

```
hf-gloro certify MODEL IMAGES... [--epsilon E] [--json] [--batch-size N] [--split S] [--limit N] [--resize] [--convert]
hf-gloro verify  MODEL [--rtol R] [--json]
hf-gloro card    MODEL --dataset D [--split S] [--output DIR] [--limit N] [--radii R...] [--training TEXT]
hf-gloro push    MODEL REPO_ID [--dataset D ...] [--remote-code] [--private]
```

MODEL is a local folder or a Hub repo id. IMAGES are image files, folders of images, or data sets: a local
folder in the Hub layout (parquet shards), ``parquet:/path/to/dir:split``, ``sklearn/digits`` or a Hub data set
name with ``--split`` (see :mod:`hf_gloro.inputs`). Images must have the model's size and colour mode: others are
refused unless ``--resize`` / ``--convert`` is given, and then each such row says that its certificate is about
the processed image. An unreadable file is reported on stderr and skipped. Errors print one line on stderr and
exit with status 2 (``verify`` exits 1 on a mismatch); ``--debug`` shows tracebacks.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path

PROGRESS_THRESHOLD = 256  # show a progress bar from this many images on


class CLIError(Exception):
    """An error reported as one line, without a traceback."""


# --- loading ------------------------------------------------------------------------------------------
def _load_model(reference: str, check_bound: bool = True):
    """``(model, processor)`` from a folder or Hub id; ``check_bound=False`` skips the recorded-bound check."""
    import hf_gloro
    from transformers import AutoImageProcessor

    from .image_processing import image_processor_for_config
    from .inputs import is_local_reference

    if is_local_reference(reference) and not os.path.isdir(os.path.expanduser(reference)):
        raise CLIError(f"model folder {reference!r} does not exist")
    reference = os.path.expanduser(reference)
    if os.path.isdir(reference) and not os.path.isfile(os.path.join(reference, "config.json")):
        raise CLIError(f"{reference!r} is not a saved model (no config.json)")
    try:
        config = hf_gloro.GloRoConfig.from_pretrained(reference)
    except (OSError, ValueError) as error:
        raise CLIError(f"cannot load a GloRo config from {reference!r}: {_first_line(error)}") from error
    if getattr(config, "model_type", None) != "gloro":
        raise CLIError(f"{reference!r} is not a GloRo model (model_type={config.model_type!r})")
    cls = hf_gloro.GloRoForImageClassification
    try:
        if check_bound:
            model = cls.from_pretrained(reference)
        else:  # the plain PreTrainedModel loader: no refusal, so that `verify` can report
            model = super(cls, cls).from_pretrained(reference)
    except hf_gloro.InconsistentCheckpointError as error:
        raise CLIError(f"{_first_line(error)} (run `hf-gloro verify {reference}` for details)") from error
    except (OSError, ValueError, RuntimeError) as error:
        raise CLIError(f"cannot load the model weights from {reference!r}: {_first_line(error)}") from error
    processor = image_processor_for_config(config)
    try:  # a saved processor wins if it produces what the model was certified for
        saved = AutoImageProcessor.from_pretrained(reference)
    except (OSError, ValueError):
        saved = None
    if isinstance(saved, hf_gloro.GloRoImageProcessor) and saved.num_channels == config.num_channels and \
            (saved.size or {}).get("height") == (saved.size or {}).get("width") == config.image_size:
        processor = saved
    return model.eval(), processor


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]


# --- commands ---------------------------------------------------------------------------------------------
def _certify(args) -> int:
    import torch
    from tqdm.auto import tqdm

    from .inputs import UnreadableImageError, collect_inputs, prepare_image

    model, processor = _load_model(args.model)
    config = model.config
    epsilon = float(config.epsilon if args.epsilon is None else args.epsilon)
    if not (math.isfinite(epsilon) and epsilon > 0):
        raise CLIError(f"--epsilon must be a finite number > 0, got {args.epsilon}")
    items = collect_inputs(args.images, args.split, args.limit, num_channels=config.num_channels,
                           image_size=config.image_size)
    rows, skipped = [], []
    certificate = None
    bar = tqdm(total=len(items), desc="certifying", unit="img", file=sys.stderr,
               disable=len(items) < PROGRESS_THRESHOLD or args.quiet)
    for start in range(0, len(items), args.batch_size):
        batch, images, notes = [], [], []
        for item in items[start : start + args.batch_size]:
            try:
                image = item.load()
            except UnreadableImageError as error:  # reported, skipped; the other images go on
                skipped.append({"source": item.name, "error": str(error)})
                continue
            image, note = prepare_image(image, config.num_channels, config.image_size, item.name,
                                        resize=args.resize, convert=args.convert)
            batch.append(item)
            images.append(image)
            notes.append(note)
        bar.update(len(items[start : start + args.batch_size]))
        if not batch:
            continue
        pixels = torch.as_tensor(processor(images=images, return_tensors="pt", do_resize=False)["pixel_values"],
                                 dtype=torch.float32)
        certificate = model.certify(pixels, epsilon)
        for item, note, prediction, certified, radius in zip(
            batch, notes, certificate.predictions.tolist(), certificate.certified.tolist(),
            certificate.radius.tolist()
        ):
            row = {"source": item.source, "index": item.index, "prediction": prediction,
                   "label": config.id2label.get(prediction, str(prediction)), "certified": bool(certified),
                   "radius": radius}
            if note is not None:
                row["preprocessing"] = note
            if item.label is not None:
                row["true_label"] = item.label
                row["correct"] = prediction == item.label
            rows.append(row)
    bar.close()
    if certificate is None:
        raise CLIError(skipped[0]["error"] if len(skipped) == 1 else f"none of the {len(skipped)} images could be read")
    for entry in skipped:
        print(f"hf-gloro: warning: {entry['error']}; skipped", file=sys.stderr)
    norm = getattr(certificate, "norm", "l2")
    summary = {"model": args.model, "epsilon": epsilon, "norm": norm,
               "lipschitz_constant": certificate.lipschitz_constant, "num_images": len(rows),
               "num_certified": sum(row["certified"] for row in rows), "skipped": skipped}
    if args.json:
        json.dump({**summary, "results": rows}, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        _print_table(rows, norm)
        processed = sum("preprocessing" in row for row in rows)
        print(f"{summary['num_certified']}/{len(rows)} certified at ε = {epsilon:g} ({_norm_label(norm)}); "
              f"Lipschitz bound {summary['lipschitz_constant']:.6g}"
              + (f"; {len(skipped)} unreadable file(s) skipped" if skipped else ""))
        if processed:
            print(f"* {processed} image(s) were resized or converted: their certificates are about the processed "
                  "images, not the original files")
    return 0


def _norm_label(norm: str) -> str:
    """``"L2"`` or ``"L∞"``: how tables and summaries name the threat model's norm."""
    return {"l2": "L2", "linf": "L∞"}.get(norm, norm)


def _print_table(rows: list[dict], norm: str = "l2") -> None:
    has_truth = any("true_label" in row for row in rows)
    # L2 tables keep their historical header (the summary line names the norm); any other norm is in the header too
    radius = "radius" if norm == "l2" else f"radius ({_norm_label(norm)})"
    header = ["image", "prediction", "certified", radius] + (
        ["true", "correct"] if has_truth else [])
    table = []
    for row in rows:
        name = row["source"] if row["index"] is None else f"{row['source']}[{row['index']}]"
        name += " *" if "preprocessing" in row else ""
        line = [name, row["label"], "yes" if row["certified"] else "no", f"{row['radius']:.4f}"]
        if has_truth:
            line += [str(row.get("true_label", "")), "yes" if row.get("correct") else "no"]
        table.append(line)
    widths = [max(len(header[i]), *(len(line[i]) for line in table)) for i in range(len(header))]
    for line in [header, *table]:
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip())


def _verify(args) -> int:
    model, _ = _load_model(args.model, check_bound=False)
    recorded = model.config.lipschitz_constant
    recomputed = model.lipschitz_constant()
    report = {"model": args.model, "norm": model.config.norm, "recorded": recorded, "recomputed": recomputed,
              "rtol": args.rtol}
    if recorded is None:
        status, message = 1, "no recorded bound in config.json (lipschitz_constant is null): nothing to verify"
    else:
        difference = (recorded - recomputed) / recomputed
        report["relative_difference"] = difference
        if difference < -args.rtol:
            status, message = 1, ("MISMATCH: the recorded bound is below the bound the weights give; the recorded "
                                  "value is unsound (tampered config or weights changed after saving)")
        elif difference > args.rtol:
            status, message = 1, ("MISMATCH: the recorded bound is above the bound the weights give; the weights "
                                  "or the config changed after saving (certificates use the recomputed bound)")
        else:
            status, message = 0, "OK: the recorded bound matches the bound recomputed from the weights"
    report["ok"] = status == 0
    report["message"] = message
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"norm of the certificates:   {_norm_label(model.config.norm)} (bound from {_norm_label(model.config.norm)} "
              "to L2 features)")
        print(f"recorded Lipschitz bound:   {recorded!r}")
        print(f"recomputed from the weights: {recomputed!r}")
        if "relative_difference" in report:
            print(f"relative difference:        {report['relative_difference']:+.3e} (tolerance {args.rtol:g})")
        print(message)
    return status


def _evaluation_data(args, model):
    """``(dataset, description, dataset_id)`` for ``card``/``push``; ``sklearn/digits`` is carved as the run that
    trained the model carved it (its ``training_recipe.json``), so the card reports the run's test split."""
    from .inputs import dataset_id, load_dataset_spec
    from .model_card import read_training_record

    options = {"image_size": model.config.image_size}
    record, _ = read_training_record(args.model) if os.path.isdir(args.model) else (None, None)
    if record and record.get("data_args", {}).get("dataset_name") == args.dataset:
        options.update(test_size=record["data_args"].get("test_size", 0.2),
                       seed=record.get("training_args", {}).get("seed", 0))
    dataset, description = load_dataset_spec(args.dataset, args.split, **options)
    return dataset, description, args.dataset_id or dataset_id(args.dataset, description)


def _training_text(args) -> str | None:
    """``--training`` (text or a file), else the recipe record found in the model folder."""
    from .model_card import describe_training, read_training_record

    if args.training:
        return Path(args.training).read_text(encoding="utf-8") if os.path.isfile(args.training) else args.training
    if os.path.isdir(args.model):
        record, results = read_training_record(args.model)
        if record:
            return describe_training(record, results)
    return None


def _card(args) -> int:
    from .evaluation import evaluate_for_card
    from .model_card import write_model_card

    model, _ = _load_model(args.model)
    output = args.output
    if output is None:
        if not os.path.isdir(args.model):
            raise CLIError("--output is required when MODEL is a Hub repo id")
        output = args.model
    dataset, description, dataset_id = _evaluation_data(args, model)
    try:
        evaluation = evaluate_for_card(
            model, dataset, dataset_id=dataset_id, dataset_split=args.split, epsilon=args.epsilon,
            radii=args.radii, batch_size=args.batch_size, limit=args.limit, progress=not args.quiet,
        )
    except ValueError as error:
        raise CLIError(f"cannot evaluate on {description}: {_first_line(error)}") from error
    write_model_card(model, output, evaluation, repo_id=args.repo_id or args.model, training=_training_text(args),
                     license=args.license)
    metrics = evaluation.metrics()
    print(f"wrote {os.path.join(output, 'README.md')} and the certified-accuracy plot: clean accuracy "
          f"{metrics['clean_accuracy']:.2%}, VRA {metrics['vra']:.2%} at ε = {evaluation.epsilon:g} "
          f"({_norm_label(evaluation.norm)}) "
          f"({evaluation.num_examples} images of {description})")
    return 0


def _push(args) -> int:
    from .evaluation import evaluate_for_card
    from .hub import push_certified_model

    model, processor = _load_model(args.model)
    evaluation = None
    if args.dataset:
        dataset, _, dataset_id = _evaluation_data(args, model)
        evaluation = evaluate_for_card(model, dataset, dataset_id=dataset_id, dataset_split=args.split,
                                       radii=args.radii, batch_size=args.batch_size, limit=args.limit,
                                       progress=not args.quiet)
    training = _training_text(args)
    try:
        info = push_certified_model(model, args.repo_id, evaluation=evaluation, image_processor=processor,
                                    remote_code=args.remote_code, private=args.private or None,
                                    training=training, license=args.license)
    except OSError as error:  # huggingface_hub's HTTP errors are OSErrors
        raise CLIError(f"push to {args.repo_id!r} failed: {_first_line(error)}") from error
    print(f"pushed {args.model} to {info.commit_url}")
    return 0


# --- entry point ------------------------------------------------------------------------------------------
def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-gloro", description="Certified (GloRo) image classifiers.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    commands = parser.add_subparsers(dest="command", required=True)

    certify = commands.add_parser("certify", help="predict and certify images")
    certify.add_argument("model", help="model folder or Hub repo id")
    certify.add_argument("images", nargs="+",
                         help="image files, folders, parquet:/dir:split, a data set folder or a Hub data set name")
    certify.add_argument("--epsilon", type=float,
                         help="certifying radius in the model's norm, config.norm: L2 or L∞ (default: the model's ε)")
    certify.add_argument("--json", action="store_true", help="print JSON instead of a table")
    certify.add_argument("--batch-size", type=_positive_int, default=64)
    certify.add_argument("--split", default="test", help="split of data set inputs (default: test)")
    certify.add_argument("--limit", type=_positive_int, help="at most this many images per data set")
    certify.add_argument("--resize", action="store_true",
                         help="certify resized copies of images of another size (the certificate is then about "
                              "the resized image)")
    certify.add_argument("--convert", action="store_true",
                         help="certify converted copies of images of another colour mode (e.g. RGB for a "
                              "grayscale model)")
    certify.add_argument("--quiet", action="store_true", help="no progress bar")
    certify.set_defaults(handler=_certify)

    verify = commands.add_parser("verify", help="recompute the guaranteed bound and compare with config.json")
    verify.add_argument("model", help="model folder or Hub repo id")
    verify.add_argument("--rtol", type=float, default=1e-6, help="relative tolerance (default 1e-6)")
    verify.add_argument("--json", action="store_true")
    verify.set_defaults(handler=_verify)

    card = commands.add_parser("card", help="evaluate and (re)write README.md and the certified-accuracy plot")
    card.add_argument("model", help="model folder or Hub repo id")
    card.add_argument("--dataset", required=True,
                      help="parquet:/dir:split, a data set folder, sklearn/digits or a Hub name")
    _add_card_arguments(card)
    card.add_argument("--output", help="folder to write to (default: MODEL when it is a folder)")
    card.add_argument("--epsilon", type=float,
                      help="certifying radius for the card, in the model's norm (default: the model's ε)")
    card.add_argument("--repo-id", help="repo id shown in the card's code snippets")
    card.add_argument("--quiet", action="store_true")
    card.set_defaults(handler=_card)

    push = commands.add_parser("push", help="push weights, config, processor, card and plot in one commit")
    push.add_argument("model", help="saved model folder")
    push.add_argument("repo_id", help="Hub repo to create or update (org/name)")
    push.add_argument("--dataset", help="evaluate on this data set for the card (as in `card`)")
    _add_card_arguments(push)
    push.add_argument("--private", action="store_true")
    push.add_argument("--remote-code", action="store_true",
                      help="also ship self-contained model code (loads with trust_remote_code=True, no hf-gloro)")
    push.add_argument("--quiet", action="store_true")
    push.set_defaults(handler=_push)
    return parser


def _add_card_arguments(parser: argparse.ArgumentParser) -> None:
    """The evaluation and card options shared by `card` and `push`."""
    parser.add_argument("--split", default="test")
    parser.add_argument("--dataset-id", help="data set name for the model-index (default: --dataset)")
    parser.add_argument("--radii", type=float, nargs="+", help="radii with a VRA entry (default: ε/2, ε, 2ε)")
    parser.add_argument("--limit", type=_positive_int, help="evaluate at most this many images")
    parser.add_argument("--batch-size", type=_positive_int, default=256)
    parser.add_argument("--training", help="training recipe and data (text, or a file to read it from; default: "
                                            "the training_recipe.json a recipe run wrote into MODEL)")
    parser.add_argument("--license")


def _quiet_libraries() -> None:
    """Silence library warnings and download/loading bars: the command prints its own output."""
    import datasets
    import huggingface_hub
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    huggingface_hub.utils.disable_progress_bars()
    datasets.utils.logging.set_verbosity_error()
    datasets.disable_progress_bars()


def main(argv: Sequence[str] | None = None) -> int:
    from .inputs import InputError

    args = build_parser().parse_args(argv)
    if not args.debug:
        _quiet_libraries()
    try:
        return args.handler(args)
    except (CLIError, InputError) as error:
        message = str(error)
    except KeyboardInterrupt:
        return 130
    except Exception as error:  # anything unexpected: still one line, unless --debug
        if args.debug:
            raise
        message = f"{type(error).__name__}: {_first_line(error)} (rerun with --debug for the traceback)"
    print(f"hf-gloro: error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
