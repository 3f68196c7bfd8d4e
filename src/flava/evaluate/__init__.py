"""FLAVA evaluation: metrics, feature extraction, zero-shot retrieval and classification, linear
probes, fine-tuning and the suite that runs them into a report."""
