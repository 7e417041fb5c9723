"""Baseline unlearning methods (ESD, UCE, SPM), each in one file, installed as ``duobench.baselines``."""
