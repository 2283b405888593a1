"""Speculating experts: predictors of the next layers' routing, estimators, calibration files."""
