"""Sphinx configuration of the sklearn-maf documentation.

Build (offline, warnings as errors) from the repository root with::

    python -m sphinx -W --keep-going -b html docs docs/_build/html

The gallery runs every ``examples/plot_*.py``; set ``SKLEARN_MAF_FAST=1`` for a
quick build with small data and few epochs (the pictures are then rough).
Links to the scikit-learn, numpy and torch documentation need the network, so
intersphinx is only switched on with ``SKLEARN_MAF_DOCS_INTERSPHINX=1``.
"""

import os
import sys
import warnings

# Document the package of this checkout, not another installed copy.
ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, ROOT)

import sklearn_maf  # noqa: E402

project = "sklearn-maf"
author = "the sklearn-maf developers"
copyright = "2025, the sklearn-maf developers"
release = sklearn_maf.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "numpydoc",
    "sphinx_gallery.gen_gallery",
]
if os.environ.get("SKLEARN_MAF_DOCS_INTERSPHINX", "") not in ("", "0"):
    extensions.append("sphinx.ext.intersphinx")
    intersphinx_mapping = {
        "python": ("https://docs.python.org/3", None),
        "numpy": ("https://numpy.org/doc/stable", None),
        "sklearn": ("https://scikit-learn.org/stable", None),
        "torch": ("https://docs.pytorch.org/docs/stable", None),
    }

templates_path = ["_templates"]
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]
default_role = "literal"

# API reference: one page per public object, from the numpydoc docstrings, with
# the inherited scikit-learn methods (get_params, set_params, ...) listed too.
autosummary_generate = True
autodoc_default_options = {"members": True, "inherited-members": True}
autodoc_typehints = "none"
numpydoc_show_class_members = False
numpydoc_class_members_toctree = False

# The gallery: examples/plot_*.py only (examples/quickstart.py is the README's
# demo, a plain script).
sphinx_gallery_conf = {
    "examples_dirs": os.path.join(ROOT, "examples"),
    "gallery_dirs": "auto_examples",
    "filename_pattern": r"/plot_",
    "ignore_pattern": r"^(?!plot_).*\.py$",  # matched against the file name
    "doc_module": ("sklearn_maf",),
    "backreferences_dir": os.path.join("modules", "generated"),
    "within_subsection_order": "FileNameSortKey",
    "remove_config_comments": True,
    "abort_on_example_error": False,
    "show_memory": False,
}

# Matplotlib in the gallery renders without a display.
os.environ.setdefault("MPLBACKEND", "Agg")
warnings.filterwarnings(
    "ignore",
    category=UserWarning,
    message="(Matplotlib is currently using agg|FigureCanvasAgg is non-interactive)",
)

html_theme = "pydata_sphinx_theme"
html_title = f"sklearn-maf {release}"
html_static_path = ["_static"]
html_theme_options = {
    "navbar_end": ["navbar-icon-links"],
    "show_prev_next": False,
    "secondary_sidebar_items": ["page-toc"],
    "footer_start": ["copyright"],
    "footer_end": [],
}
html_context = {"default_mode": "light"}
html_show_sourcelink = False
