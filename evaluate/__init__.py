"""twinview.evaluate: frozen-feature extraction, kNN, retrieval, verification, diagnostics, reports."""
