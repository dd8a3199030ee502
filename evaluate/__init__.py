"""twinview.evaluate: frozen-feature extraction and kNN evaluation."""
