"""Calibration microbenchmarks: measure a machine with PyTorch and write a moesim hardware profile.

Depends on torch only (PyYAML optional) so the folder can be copied to a GPU cluster and run as
``python calibrate/run_calibration.py`` or under ``torchrun``. See ``README.md``.
"""
