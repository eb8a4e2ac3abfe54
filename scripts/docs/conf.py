# Sphinx configuration of the docs site when Quarto is not installed (scripts/docs/build.py runs
# `sphinx-build -c scripts/docs _proc/site _docs`). The navigation comes from _quarto.yml (build.py
# writes it as the landing page's hidden toctrees); notebooks arrive executed and nbdev-processed.
project = "ftkit"
author = "ftkit developers"
copyright = "ftkit developers"
extensions = ["myst_nb", "sphinx_copybutton"]
root_doc = "index"
exclude_patterns = ["_build", "**.ipynb_checkpoints"]
source_suffix = {".md": "myst-nb", ".ipynb": "myst-nb"}

nb_execution_mode = "off"            # build.py executed the notebooks already (nbdev's way, cached)
nb_output_stderr = "remove"          # warnings and progress bars from libraries are not documentation
nb_merge_streams = True
myst_enable_extensions = ["colon_fence", "deflist", "html_image"]
myst_heading_anchors = 3
myst_all_links_external = True       # links are written as relative .html URLs; the docs test checks each resolves
suppress_warnings = ["myst.header", "mystnb.unknown_mime_type", "misc.highlighting_failure", "toc.not_included"]
highlight_language = "python"
pygments_style = "friendly"

html_theme = "furo"
html_title = "ftkit"
import os as _os
html_static_path = [_os.path.join(_os.environ.get("FTKIT_DOCS_SRC", _os.path.join(_os.path.dirname(__file__), "..", "..", "_proc", "site")), "_static")]
html_css_files = ["ftkit.css"]
html_show_sourcelink = False
html_copy_source = False
html_theme_options = {"navigation_with_keys": True}
copybutton_exclude = ".linenos, .gp, .go"
