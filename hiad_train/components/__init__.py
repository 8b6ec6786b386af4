"""Maths shared by detectors, one concept per module (k-NN, coreset, Gaussian statistics, flows, ...)."""
