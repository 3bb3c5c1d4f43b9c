"""The feature catalog: per-feature examples, statistics and labels of a checkpoint's SAE.

Modules: ``format`` (the folder layout and :class:`Catalog`, its reader), ``accumulate``
(mergeable per-shard statistics), ``worker`` (model + SAE over windows), ``build`` (the Ray
builder), ``write`` (the merged statistics to files), ``labels`` (labels without a language
model, and their detection scores), ``explain`` (explanations by an OpenAI-compatible endpoint).
"""

from saescope.training.catalog.build import build_catalog
from saescope.training.catalog.explain import Explainer, ExplainerError, OpenAIExplainer
from saescope.training.catalog.format import (
    CATALOG_DIR,
    Catalog,
    CatalogError,
    Example,
    Histogram,
    size_formula,
)
from saescope.training.catalog.labels import FeatureLabel

__all__ = [
    "CATALOG_DIR",
    "Catalog",
    "CatalogError",
    "Example",
    "Explainer",
    "ExplainerError",
    "FeatureLabel",
    "Histogram",
    "OpenAIExplainer",
    "build_catalog",
    "size_formula",
]
