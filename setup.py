# Thin shim for tools that still call setup.py; everything else lives in pyproject.toml. The license
# is set here so that the setuptools of a stock image builds it offline (pyproject's PEP 639 string
# form needs setuptools >= 77; this works from 64, the first with PEP 660 editable installs).
from setuptools import setup

setup(license="Apache-2.0")
