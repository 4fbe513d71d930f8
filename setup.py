"""For tools that still look for setup.py (`python setup.py --version`, older IDE helpers).

Everything is declared in pyproject.toml; this file adds nothing of its own.
"""

from setuptools import setup

setup()
