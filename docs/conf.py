"""Sphinx configuration of the numba_bn site.

The site is built offline: no intersphinx, MathJax served from the build
(``sphinx-mathjax-offline``), the theme's own assets only. CI builds it with
``sphinx-build -W -n`` (warnings are errors, every reference must resolve)
and runs the pages' examples with ``sphinx-build -b doctest``.
"""
import datetime
import os
import sys

sys.path.insert(0, os.path.abspath(".."))
import numba_bn  # noqa: E402

project = "numba_bn"
author = "the numba_bn developers"
copyright = f"{datetime.date.today().year}, {author}"
release = version = numba_bn.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.doctest",
    "sphinx.ext.mathjax",
    "numpydoc",
    # Copies a MathJax 3 build into _static and points mathjax_path at it,
    # so that formulas render with no network.
    "sphinx-mathjax-offline",
]

exclude_patterns = ["_build", "scripts", "_data"]
templates_path = ["_templates"]
html_static_path = []

html_theme = "pydata_sphinx_theme"
html_title = f"numba_bn {release}"
html_theme_options = {
    "navigation_with_keys": False,
    "show_toc_level": 2,
    "footer_start": ["copyright"],
    "footer_end": ["sphinx-version"],
}
html_last_updated_fmt = None

autosummary_generate = True
numpydoc_show_class_members = False
numpydoc_class_members_toctree = False
numpydoc_xref_param_type = False
# Names in numpydoc's "Parameters" types that are prose, not objects.
nitpick_ignore = [
    ("py:class", "array"),
    ("py:class", "optional"),
    ("py:class", "array-like"),
]

# Examples in the guide pages run with ``sphinx-build -b doctest``; GPU ones
# carry ``:skipif: not gpu_usable``.
doctest_global_setup = """
import numpy as np
import numba_bn as nbn
try:
    import cupy
    from numba import config as _numba_config, cuda as _cuda
    gpu_usable = not _numba_config.ENABLE_CUDASIM and _cuda.is_available()
except ImportError:
    gpu_usable = False
"""
