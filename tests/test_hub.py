"""Push to and pull from a Hub: the real ``huggingface_hub`` client against ``tests/hub_server.py``.

``HF_ENDPOINT`` is read when ``huggingface_hub`` is imported, and this test process imported it long ago
(and runs with ``HF_HUB_OFFLINE=1``), so pushing and pulling happen in subprocesses with their own
environment: the endpoint of the local Hub, Xet disabled, and a fresh ``HF_HOME`` (an empty cache) each.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from huggingface_hub import ModelCard
from PIL import Image
from hub_server import LocalHub
from test_model_card import trained_mnist_checkpoint, write_mnist_pngs

from hf_gloro import GloRoForImageClassification, gloro_image_processor
from hf_gloro.data import images_to_pixels, load_image_dataset
from hf_gloro.hub import remote_code_sources, save_certified_model

PLAIN_REPO = "gloro-org/mnist-gloro"
REMOTE_REPO = "gloro-org/mnist-gloro-remote-code"

PUSH = """
import json, os, sys
from huggingface_hub import constants
assert constants.ENDPOINT == os.environ["HF_ENDPOINT"], constants.ENDPOINT
assert not constants.HF_HUB_OFFLINE
import hf_gloro
from hf_gloro.data import load_image_dataset
from hf_gloro.hub import push_certified_model
from hf_gloro.model_card import evaluate_for_card

checkpoint, data, plain, remote = sys.argv[1:5]
model = hf_gloro.GloRoForImageClassification.from_pretrained(checkpoint)
test = load_image_dataset("ylecun/mnist", "test", data)
evaluation = evaluate_for_card(model, test, dataset_id="ylecun/mnist", limit=128, radii=[0.15, 0.3, 0.6])
training = "40 Adam steps (lr 3e-3, batch 64) on 2,048 MNIST training images, eps = 0.3."
# First push with remote code, then without: the second commit must remove the bundled files.
push_certified_model(model, plain, evaluation=evaluation, training=training, remote_code=True)
info = push_certified_model(model, plain, evaluation=evaluation, training=training)
push_certified_model(model, remote, evaluation=evaluation, training=training, remote_code=True)
# transformers' own push keeps an existing README: the GloRo card must survive it.
model.push_to_hub(plain, commit_message="push_to_hub after the card")
# The command line: push a saved folder with an evaluation of 64 test images.
import contextlib, io
from hf_gloro.cli import main
with contextlib.redirect_stdout(io.StringIO()) as cli_out:
    status = main(["push", checkpoint, plain + "-cli", "--dataset", f"parquet:{data}/mnist:test",
                   "--dataset-id", "ylecun/mnist", "--limit", "64", "--quiet"])
assert status == 0 and cli_out.getvalue().startswith("pushed "), (status, cli_out.getvalue())
json.dump({"commit": info.oid, "commit_url": info.commit_url,
           "metrics": evaluation.metrics(), "curve": evaluation.curve()}, sys.stdout)
"""

PULL_WITH_PACKAGE = """
import json, os, sys, torch
import hf_gloro
from hf_gloro.pipelines import register_pipeline
from huggingface_hub import HfApi, ModelCard, hf_hub_download
from transformers import AutoImageProcessor, AutoModelForImageClassification, pipeline

repo, inputs, output, png = sys.argv[1:5]
assert not os.listdir(os.environ["HF_HOME"]), "the cache must start empty"
model = AutoModelForImageClassification.from_pretrained(repo)  # no trust_remote_code
processor = AutoImageProcessor.from_pretrained(repo)
x = torch.load(inputs)
out, cert = model(x), model.certify(x)
register_pipeline()
result = pipeline("certified-image-classification", model=repo)(png)[0]
card = ModelCard.load(repo)
curve = json.load(open(hf_hub_download(repo, "certified_accuracy.json")))
cli_card = ModelCard.load(repo + "-cli")
import contextlib, io
from hf_gloro.cli import main
with contextlib.redirect_stdout(io.StringIO()) as verify_out:
    verify_status = main(["verify", repo])
with contextlib.redirect_stdout(io.StringIO()) as certify_out:
    certify_status = main(["certify", repo, png, "--json"])
torch.save({"class": type(model).__module__ + "." + type(model).__name__,
            "processor": type(processor).__name__, "logits": out.logits, "gloro_logits": out.gloro_logits,
            "predictions": cert.predictions, "certified": cert.certified, "radius": cert.radius,
            "bound": cert.lipschitz_constant, "recorded": model.config.lipschitz_constant,
            "files": sorted(HfApi().list_repo_files(repo)), "pipeline": result,
            "eval_results": [(r.metric_type, r.metric_value, r.metric_args) for r in card.data.eval_results],
            "curve": curve, "cli_eval_results": [(r.metric_type, r.metric_value) for r in cli_card.data.eval_results],
            "verify": (verify_status, verify_out.getvalue()), "certify": (certify_status, certify_out.getvalue())},
           output)
"""

PULL_REMOTE_CODE = """
import importlib.abc, os, sys

class _NoHfGloro(importlib.abc.MetaPathFinder):  # as if hf-gloro were not installed
    def find_spec(self, name, path, target=None):
        if name == "hf_gloro" or name.startswith("hf_gloro."):
            raise ModuleNotFoundError(f"No module named {name!r}")

sys.meta_path.insert(0, _NoHfGloro())
import torch
from transformers import AutoImageProcessor, AutoModelForImageClassification

repo, inputs, output = sys.argv[1:4]
assert not os.listdir(os.environ["HF_HOME"]), "the cache must start empty"
try:
    AutoModelForImageClassification.from_pretrained(repo, trust_remote_code=False)
    raise SystemExit("loaded without hf_gloro and without trust_remote_code")
except ValueError:
    pass
model = AutoModelForImageClassification.from_pretrained(repo, trust_remote_code=True)
processor = AutoImageProcessor.from_pretrained(repo, trust_remote_code=True)
x = torch.load(inputs)
out, cert = model(x), model.certify(x)
assert not any(name == "hf_gloro" or name.startswith("hf_gloro.") for name in sys.modules)
torch.save({"class": type(model).__module__ + "." + type(model).__name__,
            "processor": type(processor).__module__ + "." + type(processor).__name__,
            "logits": out.logits, "gloro_logits": out.gloro_logits, "predictions": cert.predictions,
            "certified": cert.certified, "radius": cert.radius, "bound": cert.lipschitz_constant}, output)
"""


def _env(hub: LocalHub, home) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_ENDPOINT")}
    home.mkdir(parents=True, exist_ok=True)
    env.update(HF_ENDPOINT=hub.endpoint, HF_HUB_DISABLE_XET="1", HF_HOME=str(home), HF_TOKEN="hf_local_test",
               HF_DATASETS_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_ETAG_TIMEOUT="30",
               OMP_NUM_THREADS="1", NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost")
    return env


def _python(script: str, args, env) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(script), *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(process: subprocess.Popen, timeout: float = 240) -> str:
    stdout, stderr = process.communicate(timeout=timeout)
    assert process.returncode == 0, f"subprocess failed:\n{stderr[-4000:]}"
    return stdout


@pytest.fixture(scope="module")
def round_trip(tmp_path_factory, shared_data):
    """Push both repos, then pull each in a fresh cache (in parallel); return everything the tests compare."""
    root = tmp_path_factory.mktemp("hub")
    checkpoint = trained_mnist_checkpoint(tmp_path_factory.getbasetemp(), shared_data)
    (png, _), = write_mnist_pngs(root / "png", shared_data, count=1)
    torch.manual_seed(1)
    digits = load_image_dataset("ylecun/mnist", "test", str(shared_data))[:12]["image"]
    x = torch.cat([torch.rand(4, 1, 28, 28), images_to_pixels(digits, 1, 28)])  # noise and real digits
    torch.save(x, root / "inputs.pt")
    with LocalHub() as hub:
        pushed = json.loads(_finish(_python(PUSH, [checkpoint, shared_data, PLAIN_REPO, REMOTE_REPO],
                                            _env(hub, root / "home-push"))))
        plain = _python(PULL_WITH_PACKAGE, [PLAIN_REPO, root / "inputs.pt", root / "plain.pt", png],
                        _env(hub, root / "home-plain"))
        remote = _python(PULL_REMOTE_CODE, [REMOTE_REPO, root / "inputs.pt", root / "remote.pt"],
                         _env(hub, root / "home-remote"))
        _finish(plain)
        _finish(remote)
        state = hub.state
    local = GloRoForImageClassification.from_pretrained(checkpoint)
    return {
        "local": local, "x": x, "pushed": pushed, "state": state, "png": png,
        "plain": torch.load(root / "plain.pt", weights_only=False),
        "remote": torch.load(root / "remote.pt", weights_only=False),
    }


def _assert_bit_exact(local, x, pulled):
    out, cert = local(x), local.certify(x)
    assert torch.equal(pulled["logits"], out.logits)
    assert torch.equal(pulled["gloro_logits"], out.gloro_logits)
    assert torch.equal(pulled["predictions"], cert.predictions)
    assert torch.equal(pulled["certified"], cert.certified)
    assert torch.equal(pulled["radius"], cert.radius)
    assert pulled["bound"] == cert.lipschitz_constant == local.lipschitz_constant()


def test_pull_with_the_package_is_bit_exact_without_remote_code(round_trip):
    pulled, local = round_trip["plain"], round_trip["local"]
    assert pulled["class"] == "hf_gloro.modeling_gloro.GloRoForImageClassification"
    assert pulled["processor"] == "GloRoImageProcessor"
    _assert_bit_exact(local, round_trip["x"], pulled)
    assert pulled["recorded"] == local.lipschitz_constant()
    # Some inputs certified and some not, so equality of `certified` is informative.
    assert 0 < int(pulled["certified"].sum()) < len(round_trip["x"])


def test_remote_code_pull_works_without_hf_gloro_and_is_bit_exact(round_trip):
    pulled = round_trip["remote"]
    assert pulled["class"].startswith("transformers_modules.") and pulled["class"].endswith(
        "modeling_gloro.GloRoForImageClassification")
    assert pulled["processor"].endswith("image_processing.GloRoImageProcessor")
    _assert_bit_exact(round_trip["local"], round_trip["x"], pulled)


def test_repo_files_card_and_plot_survive_the_round_trip(round_trip):
    pulled, pushed = round_trip["plain"], round_trip["pushed"]
    expected = {"README.md", "config.json", "model.safetensors", "preprocessor_config.json",
                "certified_accuracy.png", "certified_accuracy.json", "certified_accuracy.csv"}
    # The second push removed the remote-code files of the first; transformers' push kept our card.
    assert set(pulled["files"]) == expected
    metrics = {(t, (a or {}).get("epsilon")): v for t, v, a in pulled["eval_results"]}
    assert metrics[("accuracy", None)] == pushed["metrics"]["clean_accuracy"]
    assert metrics[("verified_robust_accuracy", 0.3)] == pushed["metrics"]["vra"]
    assert metrics[("verified_robust_accuracy", 0.6)] == pushed["metrics"]["vra@0.6"]
    assert all(a["norm"] == "l2" for t, _, a in pulled["eval_results"] if t == "verified_robust_accuracy")
    assert pulled["curve"]["radius"] == pushed["curve"]["radius"]
    assert pulled["curve"]["certified_accuracy"] == pushed["curve"]["certified_accuracy"]


def test_remote_code_repo_ships_the_bundle_and_auto_map(round_trip):
    repo = round_trip["state"].repos[REMOTE_REPO]
    files = repo.head().files
    assert set(remote_code_sources()) <= set(files)
    config = json.loads(files["config.json"])
    assert config["auto_map"]["AutoModelForImageClassification"] == "modeling_gloro.GloRoForImageClassification"
    assert json.loads(files["preprocessor_config.json"])["auto_map"]["AutoImageProcessor"].startswith(
        "image_processing.")
    assert b"trust_remote_code=True" in files["README.md"]


def test_pipeline_from_the_hub_carries_the_certificate(round_trip):
    result, local = round_trip["plain"]["pipeline"], round_trip["local"]
    processor = gloro_image_processor(1, 28)  # what the repo ships; the pipeline preprocesses with it
    with Image.open(round_trip["png"]) as image:
        cert = local.certify(processor(images=image.convert("RGB"), return_tensors="pt")["pixel_values"])
    assert result["label"] == local.config.id2label[int(cert.predictions[0])]
    assert result["certified"] == bool(cert.certified[0]) and result["radius"] == float(cert.radius[0])


def test_the_client_used_the_hub_routes(round_trip):
    state, pushed = round_trip["state"], round_trip["pushed"]
    requests = state.requests
    for expected in ("POST /api/repos/create", "POST /api/validate-yaml",
                     f"POST /api/models/{PLAIN_REPO}/preupload/main", f"POST /api/models/{PLAIN_REPO}/commit/main",
                     f"GET /api/models/{PLAIN_REPO}/tree/main", f"GET /api/models/{PLAIN_REPO}",
                     f"HEAD /{PLAIN_REPO}/resolve/", f"GET /{PLAIN_REPO}/resolve/"):
        assert any(r.startswith(expected) for r in requests), (expected, sorted(set(requests)))
    commits = state.repos[PLAIN_REPO].commits
    # push (remote code), push (plain), model.push_to_hub: three commits, the card unchanged by the last.
    assert len(commits) == 3 and pushed["commit"] == commits[1].oid
    assert commits[2].files["README.md"] == commits[1].files["README.md"]
    assert pushed["commit_url"].startswith("http://127.0.0.1:")


def test_local_folder_has_everything_and_refuses_mismatched_processors(tmp_path, round_trip):
    local = round_trip["local"]
    card = save_certified_model(local, tmp_path, repo_id="me/x")
    assert {p.name for p in tmp_path.iterdir()} == {"README.md", "config.json", "model.safetensors",
                                                     "preprocessor_config.json"}
    assert ModelCard.load(tmp_path / "README.md").text == card.text
    with pytest.raises(ValueError, match="certified for 1×28×28"):
        save_certified_model(local, tmp_path / "bad", image_processor=gloro_image_processor(1, 32))


def test_command_line_push_verify_and_certify_by_repo_id(round_trip):
    pulled, local = round_trip["plain"], round_trip["local"]
    status, out = pulled["verify"]
    assert status == 0 and f"recomputed from the weights: {local.lipschitz_constant()!r}" in out
    status, out = pulled["certify"]
    row = json.loads(out)["results"][0]
    assert status == 0 and row["radius"] == pulled["pipeline"]["radius"]
    assert row["certified"] == pulled["pipeline"]["certified"]
    # `hf-gloro push` evaluated 64 images: clean accuracy and VRA at ε/2, ε, 2ε in the model-index.
    kinds = [kind for kind, _ in pulled["cli_eval_results"]]
    assert kinds == ["accuracy"] + ["verified_robust_accuracy"] * 3
    files = round_trip["state"].repos[PLAIN_REPO + "-cli"].head().files
    assert {"model.safetensors", "config.json", "preprocessor_config.json", "certified_accuracy.png"} <= set(files)


def test_remote_code_module_is_stdlib_only_and_ships_only_model_code():
    """``hf_gloro.remote_code`` imports nothing outside the standard library (so modeling can use it without the Hub
    client), and the bundle holds the model's own code only: no Hub, card, evaluation, CLI or training modules."""
    import ast
    import pathlib

    import hf_gloro.remote_code as remote_code

    tree = ast.parse(pathlib.Path(remote_code.__file__).read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.module and node.level == 0}
    assert imported and imported <= set(sys.stdlib_module_names) | {"__future__"}, imported
    files = set(remote_code.remote_code_sources())
    assert {"modeling_gloro.py", "configuration_gloro.py", "image_processing.py"} <= files
    shipped_modules = {name.removesuffix(".py") for name in files}
    assert not shipped_modules & {"hub", "model_card", "evaluation", "cli", "trainer", "pipelines", "inputs", "data"}
    from hf_gloro.hub import write_remote_code  # the re-export modeling_gloro still uses

    assert write_remote_code is remote_code.write_remote_code
