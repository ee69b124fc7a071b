"""Deployment-tool baselines run on the same model and calibration data as quest's own methods."""
