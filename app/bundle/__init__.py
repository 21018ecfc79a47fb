"""The model bundle: the only contract between training (``model/``) and serving (``app/``).

This package is deliberately torch-free so that both halves can import it.
"""

from app.bundle.manifest import (
    GRAPH_ROLES,
    MANIFEST_FILE,
    SCHEMA_VERSION,
    BundleManifest,
    GraphFile,
    GraphSpec,
    ImagePreprocessing,
    ParityReport,
    TensorSpec,
    TextPreprocessing,
    VariantQuality,
)
from app.bundle.verify import load_bundle_manifest, sha256_file

__all__ = [
    "GRAPH_ROLES",
    "MANIFEST_FILE",
    "SCHEMA_VERSION",
    "BundleManifest",
    "GraphFile",
    "GraphSpec",
    "ImagePreprocessing",
    "ParityReport",
    "TensorSpec",
    "TextPreprocessing",
    "VariantQuality",
    "load_bundle_manifest",
    "sha256_file",
]
