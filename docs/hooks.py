"""mkdocs hooks: the benchmark result pages of bench/results become pages of the site under results/.

The documentation links result files as ``../bench/results/<name>.md``, which is where they live in the
repository (so the links work on a code host); in the site the same files are served from ``results/``.
"""

from __future__ import annotations

import re
from pathlib import Path

from mkdocs.structure.files import File

_LINK = re.compile(r"\]\(\.\./bench/results/")


def on_files(files, config):
    root = Path(config.config_file_path).resolve().parent
    for path in sorted((root / "bench" / "results").iterdir()):
        if path.suffix in (".md", ".png"):
            files.append(File(f"results/{path.name}", src_dir=str(root / "bench"), dest_dir=config.site_dir,
                              use_directory_urls=config.use_directory_urls))
    return files


def on_page_markdown(markdown, page, config, files):
    return _LINK.sub("](results/", markdown)
