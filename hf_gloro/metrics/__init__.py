"""``evaluate`` metric modules shipped with hf-gloro (Hub "metric module" layout, one folder each).

```python
>>> import evaluate
>>> from hf_gloro.metrics import CERTIFIED_ACCURACY
>>> metric = evaluate.load(CERTIFIED_ACCURACY)
>>> metric.compute(predictions=[0, 1], references=[0, 0], certified_radii=[0.5, 0.1], epsilon=0.3)
{'clean_accuracy': 0.5, 'vra': 0.5, 'rejection_rate': 0.5, 'median_certified_radius': 0.25}
```
"""

from pathlib import Path

#: Path of the certified-accuracy metric module, for ``evaluate.load``.
CERTIFIED_ACCURACY = str(Path(__file__).resolve().parent / "certified_accuracy")

__all__ = ["CERTIFIED_ACCURACY"]
