"""Saved models of every kind, loaded by one dispatch on the ``kind`` their ``model.json`` records.

Kinds: a ``FactorModel`` (no kind recorded: ALS, AutoRec, the bias baseline, implicit ALS), ``item_item`` (EASE's
``ItemItemModel``), ``knn`` (``ItemKNN``), ``blend`` (a ``Blend``) and ``reranker`` (the learning-to-rank
``Reranker``), whose members are loaded by this same function. The registered pyfuncs and the stages load through
it.
"""

from __future__ import annotations

from pathlib import Path

from pipeline import storage
from pipeline.models.blend import Blend
from pipeline.models.factor_model import FactorModel
from pipeline.models.item_item import ItemItemModel
from pipeline.models.neighbourhood import ItemKNN
from pipeline.models.reranker import Reranker

_LOADERS = {"factor": FactorModel.load, "item_item": ItemItemModel.load, "knn": ItemKNN.load,
            "blend": lambda folder: Blend.load(folder, load_model),
            "reranker": lambda folder: Reranker.load(folder, load_model)}


def model_kind(folder: Path) -> str:
    return storage.read_json(Path(folder) / "model.json").get("kind", "factor")


def load_model(folder: Path):
    """The model saved in ``folder``, whatever its kind."""
    kind = model_kind(folder)
    if kind not in _LOADERS:
        raise ValueError(f"{folder}: unknown model kind {kind!r} (known: {sorted(_LOADERS)})")
    return _LOADERS[kind](folder)
