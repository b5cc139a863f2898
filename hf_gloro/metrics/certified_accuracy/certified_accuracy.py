"""Certified accuracy of a certifiably robust classifier: clean accuracy, verified-robust accuracy (VRA) at ε
and at extra radii, rejection rate and median certified radius, from predictions and certified radii."""

import datasets
import evaluate

from hf_gloro.evaluation import certified_metrics

_DESCRIPTION = """
Certified accuracy of a classifier that returns, for every input, a prediction and a certified radius: the
largest distance (in the certificate's norm, L2 or L∞: pass `norm`) within which no perturbation of the
input can change the prediction (e.g. a GloRo net's `model.certify(x).radius`, in `model.config.norm`).

* `clean_accuracy`: fraction of predictions equal to the reference label;
* `vra`: verified-robust accuracy at `epsilon`, the fraction of inputs that are classified correctly **and**
  have a certified radius greater than `epsilon`; `vra@r` likewise for every radius in `extra_radii`;
* `rejection_rate`: fraction of inputs whose certified radius is at most `epsilon` (the certifier rejects);
* `median_certified_radius`: median of the certified radius, misclassified inputs counting as 0 (the radius
  at which VRA crosses 50%).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`): predicted labels.
    references (`list` of `int`): true labels.
    certified_radii (`list` of `float`): certified radius of each prediction (`inf` allowed).
    epsilon (`float`): the certifying radius (> 0).
    extra_radii (`list` of `float`, optional): further radii with a `vra@r` entry (`r` printed with `%.4g`).
    norm (`str`, optional): the norm of the radii and of `epsilon`, `"l2"` (default) or `"linf"`
        (`model.config.norm`); checked, the values do not depend on it.
Returns:
    `clean_accuracy`, `vra`, `rejection_rate`, `median_certified_radius` and one `vra@r` per extra radius
    (all floats).
Examples:
    >>> metric = evaluate.load("hf_gloro/metrics/certified_accuracy")
    >>> metric.compute(predictions=[0, 1, 2, 1], references=[0, 1, 1, 1],
    ...                certified_radii=[0.5, 0.1, 9.0, 0.3], epsilon=0.3, extra_radii=[0.4])
    {'clean_accuracy': 0.75, 'vra': 0.25, 'rejection_rate': 0.5, 'median_certified_radius': 0.2, 'vra@0.4': 0.25}
"""

_CITATION = """
@inproceedings{leino21gloro,
  title = {Globally-Robust Neural Networks},
  author = {Klas Leino and Zifan Wang and Matt Fredrikson},
  booktitle = {International Conference on Machine Learning (ICML)},
  year = {2021}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class CertifiedAccuracy(evaluate.Metric):
    """Clean and verified-robust accuracy from predictions and certified radii (see the module description)."""

    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({
                "predictions": datasets.Value("int64"),
                "references": datasets.Value("int64"),
                "certified_radii": datasets.Value("float64"),
            }),
            reference_urls=["https://arxiv.org/abs/2102.08452"],
        )

    def _compute(self, predictions, references, certified_radii, epsilon=None, extra_radii=(), norm="l2"):
        if epsilon is None:
            raise ValueError("certified accuracy needs the certifying radius: compute(..., epsilon=...)")
        return certified_metrics(predictions, references, certified_radii, epsilon, extra_radii or (), norm)
