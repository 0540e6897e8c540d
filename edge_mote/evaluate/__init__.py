"""Behaviour evaluation: detectors (decision and phrase level), quality metrics, and the MoTE protocol."""
